"""Learning on data with planted structure: the model must recover it, and refuse to
register anything when training goes wrong."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from factories import make_dataset, small_settings

from batch.jobs import bootstrap_job, nightly_job
from batch.trainer import EmptyTrainingDataError, bootstrap, nightly
from common.data.dataset import Dataset
from common.data.events import Events
from common.data.synthetic import SyntheticConfig, SyntheticData, generate
from common.evaluation.baselines import PopularityScorer
from common.evaluation.offline import evaluate_scorer, temporal_split
from common.evaluation.prequential import prequential
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.settings import Settings, load_settings
from common.model.bundle import Features, ModelBundle
from common.model.registry import Registry
from common.model.training import Trainer, TrainingDivergedError

# 20 interest clusters of 50 items each; users click inside their cluster 90% of the time.
PLANTED = SyntheticConfig(n_users=1000, n_items=1000, n_clusters=20, n_days=8,
                          events_per_day=5000, p_in_cluster=0.9, zipf_exponent=0.8,
                          drift_per_day=0.05, seed=0)
# The same world with a fifth of the users changing interest every day.
DRIFTING = dataclasses.replace(PLANTED, drift_per_day=0.2)


@pytest.fixture(scope="module")
def planted() -> SyntheticData:
    return generate(PLANTED)


@pytest.fixture(scope="module")
def drifting() -> SyntheticData:
    return generate(DRIFTING)


def _settings(home: Path | None = None, **env: str) -> Settings:
    base = {"RECSTREAM_TRAIN_BATCH_SIZE": "256", "RECSTREAM_TRAIN_THREADS": "2"}
    if home is not None:
        base["RECSTREAM_HOME"] = str(home)
    return load_settings({**base, **env})


def _recall50(bundle: ModelBundle, ds: Dataset, train: Events, test: Events,
              histories: Events | None = None) -> float:
    """Recall@50 on ``test``, users' histories as of ``histories`` (default: ``train``)."""
    catalog = ds.catalog()
    scorer = TwoTowerScorer(bundle, Features.build(bundle, ds.users, ds.items), catalog,
                            seen=train if histories is None else histories)
    return evaluate_scorer(scorer, catalog, train, test)["recall@50"]


def test_two_tower_recall_is_3x_popularity_on_planted_clusters(planted: SyntheticData) -> None:
    ds = planted.dataset
    train, test = temporal_split(ds.events, int(planted.day_start_ms[-1]), 1)
    settings = _settings()
    bundle, _ = bootstrap(settings.model, settings.train, ds, train)
    model_recall = _recall50(bundle, ds, train, test)
    popularity = evaluate_scorer(PopularityScorer(train, ds.catalog()), ds.catalog(), train,
                                 test)["recall@50"]
    print(f"planted clusters: two-tower recall@50 {model_recall:.3f}, "
          f"popularity {popularity:.3f}")
    assert model_recall >= 3 * popularity


def test_nightly_update_beats_the_champion_on_the_next_day(drifting: SyntheticData) -> None:
    ds, starts = drifting.dataset, drifting.day_start_ms
    settings = _settings()
    bundle, _ = bootstrap(settings.model, settings.train, ds,
                          ds.events.between(None, int(starts[-2])))
    train, test = temporal_split(ds.events, int(starts[-1]), 1)
    # Nightly-only: the champion with the histories of its cutoff; the nightly's version
    # with those of its own (the day it trained on is in them).
    champion = _recall50(bundle, ds, train, test, ds.events.between(None, int(starts[-2])))
    nightly(settings.train, bundle, ds, ds.events.between(int(starts[-2]), int(starts[-1])))
    updated = _recall50(bundle, ds, train, test)
    print(f"next-day recall@50: champion {champion:.3f}, after nightly {updated:.3f}")
    assert updated > champion + 0.02


def test_bootstrap_is_deterministic_for_a_seed(planted: SyntheticData) -> None:
    ds = planted.dataset
    history = ds.events.between(None, int(planted.day_start_ms[1]))
    settings = _settings()
    a, _ = bootstrap(settings.model, settings.train, ds, history, epochs=1)
    b, _ = bootstrap(settings.model, settings.train, ds, history, epochs=1)
    for key, value in a.model.state_dict().items():
        assert np.array_equal(value.numpy(), b.model.state_dict()[key].numpy()), key


def test_unknown_users_and_items_still_get_finite_scores() -> None:
    ds = make_dataset()
    settings = small_settings()
    bundle, _ = bootstrap(settings.model, settings.train, ds, ds.events, epochs=1)
    catalog = np.asarray([*ds.catalog(), "brand-new-item"], dtype=object)
    scorer = TwoTowerScorer(bundle, Features.build(bundle, ds.users, ds.items), catalog)
    scores = scorer.score(["u1", "never-seen-user"])
    assert scores.shape == (2, len(catalog)) and np.isfinite(scores).all()


def test_diverging_loss_stops_training_and_registers_nothing(tmp_path: Path) -> None:
    settings = small_settings(RECSTREAM_HOME=str(tmp_path), RECSTREAM_TRAIN_LR_DENSE="1e12",
                              RECSTREAM_TRAIN_LR_EMBEDDING="1e12",
                              RECSTREAM_TRAIN_MAX_GRAD_NORM="1e12")
    with pytest.raises(TrainingDivergedError, match="no update was applied"):
        bootstrap_job(settings, make_dataset(), None, None, epochs=5)
    assert Registry(settings.models_dir).versions() == []


def test_loss_above_ceiling_counts_as_divergence(tmp_path: Path) -> None:
    settings = small_settings(RECSTREAM_HOME=str(tmp_path), RECSTREAM_TRAIN_MAX_LOSS="0.001")
    with pytest.raises(TrainingDivergedError, match="RECSTREAM_TRAIN_MAX_LOSS"):
        bootstrap_job(settings, make_dataset(), None, None)
    assert Registry(settings.models_dir).versions() == []


def test_nightly_on_an_empty_day_fails_and_keeps_the_champion(tmp_path: Path) -> None:
    settings = small_settings(RECSTREAM_HOME=str(tmp_path))
    ds = make_dataset()
    first = bootstrap_job(settings, ds, None, None, epochs=1)
    empty_day = int(ds.events.ts_ms.max()) + 10 * 86_400_000
    with pytest.raises(EmptyTrainingDataError, match="nothing to train on"):
        nightly_job(settings, ds, empty_day, promote=True)
    registry = Registry(settings.models_dir)
    assert registry.versions() == [first.version]
    assert registry.aliases()["champion"] == first.version


def test_nightly_registers_a_child_of_the_champion(tmp_path: Path) -> None:
    settings = small_settings(RECSTREAM_HOME=str(tmp_path))
    ds = make_dataset()
    day = (int(ds.events.ts_ms.min()) // 86_400_000) * 86_400_000
    first = bootstrap_job(settings, ds, None, None, epochs=1)
    second = nightly_job(settings, ds, day)
    meta = Registry(settings.models_dir).meta(second.version)
    assert meta["parent"] == first.version and meta["kind"] == "nightly"
    assert meta["cutoff_ms"] == day + 86_400_000


def test_nan_and_inf_inputs_are_not_positives_and_do_not_poison_training() -> None:
    ds = make_dataset()
    bad = Events.from_columns(
        event_id=["x1", "x2"], user_id=["u1", "u2"], item_id=["i1", "i2"],
        event_type=["rating", "rating"], value=[np.nan, np.inf], ts_ms=[1, 2])
    assert len(bad.positives(4.0)) == 0
    events = Events.concat([ds.events, bad]).sorted_by_time()
    settings = small_settings()
    bundle, stats = bootstrap(settings.model, settings.train,
                              Dataset("t", events, ds.users, ds.items), events, epochs=1)
    assert np.isfinite(stats.final_loss)


def test_training_on_no_positives_is_a_clear_error() -> None:
    ds = make_dataset()
    only_low_ratings = Events.from_columns(
        event_id=["a", "b"], user_id=["u1", "u2"], item_id=["i1", "i2"],
        event_type=["rating", "rating"], value=[1.0, 2.0], ts_ms=[1, 2])
    with pytest.raises(EmptyTrainingDataError, match="positive"):
        settings = small_settings()
        bootstrap(settings.model, settings.train, ds, only_low_ratings)


def test_embedding_only_updates_beat_a_frozen_model_prequentially(
        drifting: SyntheticData) -> None:
    ds, starts = drifting.dataset, drifting.day_start_ms
    settings = _settings()
    history = ds.events.between(None, int(starts[-1]))
    last_day = ds.events.between(int(starts[-1]), None)
    catalog = ds.catalog()
    moved = (drifting.user_cluster[-1] != drifting.user_cluster[-2]) \
        & (drifting.user_cluster[-2] >= 0)
    drifted = [f"u{k}" for k in np.flatnonzero(moved)]
    recalls = {}
    for learns in (False, True):
        bundle, _ = bootstrap(settings.model, settings.train, ds, history)
        features = Features.build(bundle, ds.users, ds.items)
        trainer = Trainer(bundle, features, settings.train, mode="embedding") if learns \
            else None
        scorer = TwoTowerScorer(bundle, features, catalog, trainer=trainer, seen=history)
        model = _Streaming(scorer) if learns else _Frozen(scorer)
        result = prequential(model, catalog, last_day, k=50, chunk_events=500, seen=history)
        recalls[learns] = (result.recall, result.restrict(drifted).recall)
    print(f"prequential recall@50 frozen {recalls[False]}, streaming {recalls[True]} "
          "(all users, drifted users)")
    assert recalls[True][0] > recalls[False][0]
    assert recalls[True][1] > 1.5 * recalls[False][1]


class _Frozen:
    """The same scorer with learning switched off: the nightly-only arm."""

    def __init__(self, scorer: TwoTowerScorer) -> None:
        self.scorer = scorer

    def score(self, user_ids: list[str]) -> np.ndarray:
        return self.scorer.score(user_ids)

    def learn(self, events: Events) -> None:
        """Deliberately ignores events."""


class _Streaming(_Frozen):
    """The stream's arm: each chunk goes into the users' histories and is learned from."""

    def learn(self, events: Events) -> None:
        self.scorer.learn(events)
        self.scorer.observe(events)
