"""The recall API's history-aware user tower against a real Redis and real FAISS indexes:
a positive in the seen set changes the next answer before any learning step, a user
with history but no row is personalised exactly as offline evaluation would, history
item vectors come from the served version's own index, and a model without a history
field answers as it always did."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from publishing import (
    control_for,
    exact_answer,
    publish_settings,
    published_item_vectors,
    service_for,
)

from batch.jobs import bootstrap_job
from common.data.dataset import Dataset
from common.data.synthetic import SyntheticConfig, generate
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.settings import Settings
from common.model.bundle import Features, ModelBundle
from common.model.history import HOUR_MS, UserHistories
from common.model.registry import Registry
from common.model.vectors import item_vectors, user_histories, user_vectors
from common.model.vocab import COLD_ROW
from publisher.base import Delta
from publisher.redis_faiss import RedisFaissPublisher
from serving.loaded import ServedVersion
from serving.recall import Recall, RecallService, wait_until_serving
from serving.scorer import ServedScorer

HISTORY_LEN = 10
MODELS = {  # the two ways a history enters the user tower, each with a pooling
    "ids-decay": {"RECSTREAM_MODEL_HISTORY_INPUT": "ids",
                  "RECSTREAM_MODEL_HISTORY_POOLING": "decay"},
    "vectors-attention": {"RECSTREAM_MODEL_HISTORY_INPUT": "vectors",
                          "RECSTREAM_MODEL_HISTORY_POOLING": "attention"},
    "no-history": {"RECSTREAM_MODEL_HISTORY_LEN": "0"},
}


@pytest.fixture(scope="module")
def world() -> Dataset:
    return generate(SyntheticConfig(n_users=300, n_items=200, n_days=4,
                                    events_per_day=1500, seed=3)).dataset


@dataclass
class Trained:
    home: Path
    env: dict[str, str]
    version: str
    cutoff_ms: int


def _env(name: str) -> dict[str, str]:
    return {"RECSTREAM_MODEL_HISTORY_LEN": str(HISTORY_LEN), **MODELS[name]}


@pytest.fixture(scope="module")
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            redis_server: Any, world: Dataset) -> Trained:
    """One bootstrap per model kind (the tests' indirect parameter), shared by the
    module's tests."""
    home = tmp_path_factory.mktemp(request.param)
    env = _env(request.param)
    settings = publish_settings(home, redis_server.url, "unused", **env)
    end = int(world.events.ts_ms.max()) + 1
    version = bootstrap_job(settings, world, None, end, epochs=1, promote=True).version
    return Trained(home, env, version, end)


@dataclass
class Served:
    settings: Settings
    dataset: Dataset
    version: str
    service: RecallService
    now_ms: int

    @property
    def current(self) -> ServedVersion:
        assert self.service.current is not None
        return self.service.current

    def bundle(self) -> ModelBundle:
        return Registry(self.settings.models_dir).load(self.version)[0]

    def features(self, bundle: ModelBundle) -> Features:
        return Features.build(bundle, self.dataset.users, self.dataset.items)

    def recall(self, user: str, k: int = 20) -> Recall:
        return self.service.recall(user, k)

    def add_positives(self, user: str, items: list[str], ages_h: list[float]) -> None:
        self.service.users.add_seen([user] * len(items), items,
                                    [self.now_ms - int(a * HOUR_MS) for a in ages_h])

    def query(self, user: str) -> np.ndarray:
        """The served query vector of ``user`` (the recall API's function, its read)."""
        served = self.current
        rows, recent = self.service.users.read_with_seen(served.redis_meta, user)
        which, vectors = served.queries(rows, [recent], self.now_ms)
        assert which.tolist() == [0]
        return vectors[0]

    def offline_query(self, user: str) -> np.ndarray:
        """Offline evaluation's user vector for ``user``'s seen set at the same clock."""
        bundle = self.bundle()
        items, ts = self.service.users.histories([user], HISTORY_LEN)[0]
        hist = UserHistories(HISTORY_LEN)
        hist.append([user] * len(items), items, ts)
        return user_vectors(bundle, self.features(bundle), [user],
                            user_histories(bundle, hist, [user], self.now_ms))[0].numpy()


@pytest.fixture
def served(trained: Trained, tmp_path: Path, redis_url: str, prefix: str,
           world: Dataset) -> Iterator[Served]:
    """The trained version published into this test's own Redis prefix and index files."""
    shutil.copytree(trained.home / "models", tmp_path / "models")
    settings = publish_settings(tmp_path, redis_url, prefix, **trained.env)
    control = control_for(settings)
    control.publish(trained.version, world)
    control.promote(trained.version)
    now = trained.cutoff_ms + 2 * HOUR_MS
    service = service_for(settings, clock=lambda: now)
    wait_until_serving(service, trained.version)
    yield Served(settings, world, trained.version, service, now)


HISTORY_MODELS = pytest.mark.parametrize("trained", ["ids-decay", "vectors-attention"],
                                         indirect=True)


def _warm_users(served: Served, n: int) -> list[str]:
    """Users with a published row and several positives."""
    users = served.bundle().user_vocab.ids
    return [u for u in users if len(served.service.users.seen(u)) >= 3][:n]


def _names(recall: Recall) -> list[str]:
    return [i for i, _ in recall.items]


@HISTORY_MODELS
def test_positives_written_to_the_seen_set_alone_change_the_next_answer(
        served: Served) -> None:
    user = _warm_users(served, 1)[0]
    meta = served.current.redis_meta
    row_before = served.service.users.read_with_seen(meta, user)[0].vectors
    before = served.recall(user, 100)
    new = _names(before)[-2:]  # two items the user's answer ranked low
    served.add_positives(user, new, [0.1, 0.05])
    after = served.recall(user, 100)
    assert np.array_equal(served.service.users.read_with_seen(meta, user)[0].vectors,
                          row_before), "the user's row must not have changed"
    assert after.fallback is None and not set(new) & set(_names(after))
    # Not just the seen filter at work: the ranking of the other items moved.
    filtered = [i for i in _names(before) if i not in new]
    assert _names(after)[:50] != filtered[:50]
    score_before, score_after = dict(before.items), dict(after.items)
    common = set(score_before) & set(score_after)
    assert max(abs(score_before[i] - score_after[i]) for i in common) > 1e-3
    assert np.allclose(served.query(user), served.offline_query(user), atol=1e-5)


@HISTORY_MODELS
def test_a_user_with_history_but_no_row_gets_a_personal_answer_equal_to_offline(
        served: Served) -> None:
    names, vectors = published_item_vectors(served.settings, served.version)
    item_vector = dict(zip(names, vectors, strict=True))
    own = served.bundle().item_vocab.ids
    histories = {"newcomer-a": own[:4], "newcomer-b": own[-4:]}
    answers = {}
    for user, items in histories.items():
        assert served.service.users.read(served.version, [user]).found.tolist() == [False]
        served.add_positives(user, items, [30.0, 5.0, 1.0, 0.2])
        answers[user] = answer = served.recall(user, 20)
        assert answer.fallback is None and len(answer.items) == 20
        offline = served.offline_query(user)
        assert np.allclose(served.query(user), offline, atol=1e-5)
        # The answer is the exact top-20 of the offline vector over the served items.
        scores = {n: float(item_vector[n] @ offline) for n in names if n not in items}
        assert all(abs(s - scores[i]) < 1e-5 for i, s in answer.items)
        top = sorted(scores.values(), reverse=True)[:20]
        assert np.allclose([s for _, s in answer.items], top, atol=1e-5)
    assert _names(answers["newcomer-a"]) != _names(answers["newcomer-b"])
    for user in _warm_users(served, 3):  # users with a row read their history too
        assert np.allclose(served.query(user), served.offline_query(user), atol=1e-5)
    assert served.recall("nobody-at-all", 5).fallback == "unknown user"


@pytest.mark.parametrize("trained", ["vectors-attention"], indirect=True)
def test_history_item_vectors_come_from_the_served_index_with_its_deltas(
        served: Served) -> None:
    assert served.current.item_vocab is None  # history_input=vectors: from the index
    bundle = served.bundle()
    features = served.features(bundle)
    items = bundle.item_vocab.ids[:3]
    user = "newcomer-c"
    served.add_positives(user, items, [3.0, 2.0, 1.0])
    first = served.query(user)
    rng = np.random.default_rng(4)
    moved = rng.normal(size=served.settings.model.output_dim).astype(np.float32)
    moved /= np.linalg.norm(moved)
    pub = RedisFaissPublisher.from_settings(served.settings)
    pub.publish_delta(Delta(served.version, [], np.zeros((0, served.settings.model.embedding_dim),
                                                         np.float32), [items[1]], moved[None]))
    served.service.refresh()
    second = served.query(user)
    # Expected: the tower over the registry's item vectors with the moved one replaced.
    hist = item_vectors(bundle, features, items)
    hist[1] = torch.from_numpy(moved)
    ages = torch.tensor([[3.0, 2.0, 1.0]])
    pad = HISTORY_LEN - 3
    emb = torch.cat([torch.zeros(1, pad, hist.shape[1]), hist[None]], dim=1)
    age = torch.cat([torch.zeros(1, pad), ages], dim=1)
    mask = torch.arange(HISTORY_LEN)[None] >= pad
    cat, multi = bundle.user_encoder.unpack(np.zeros((1, bundle.user_encoder.packed_width),
                                                     np.int32))
    with torch.no_grad():
        expected = bundle.model.user(bundle.model.user.ids.weight[[COLD_ROW]], cat, multi,
                                     (emb, age, mask))[0].numpy()
    assert np.allclose(second, expected, atol=1e-5)
    assert not np.allclose(first, second, atol=1e-3)
    answer = served.recall(user, 5)
    assert answer.fallback is None
    names, vectors = published_item_vectors(served.settings, served.version)
    vector_of = dict(zip(names, vectors, strict=True))
    assert all(abs(s - float(vector_of[i] @ expected)) < 1e-5 for i, s in answer.items)
    # Items the index does not hold are padding: a history of only those embeds nobody.
    served.add_positives("newcomer-d", ["never-published-1", "never-published-2"], [1.0, 0.5])
    assert served.recall("newcomer-d", 5).fallback == "unknown user"


@pytest.mark.parametrize("trained", ["no-history"], indirect=True)
def test_a_model_without_history_answers_exactly_as_before(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    assert served.current.history_len == 0
    times: list[bool] = []
    read = served.service.users.read_with_seen
    monkeypatch.setattr(served.service.users, "read_with_seen",
                        lambda meta, user, t=True: times.append(t) or read(meta, user, t))
    user = _warm_users(served, 1)[0]
    before = served.recall(user, 20)
    seen = set(served.service.users.seen(user))
    assert _names(before) == exact_answer(served.settings, served.dataset, served.version,
                                          user, 20, seen)
    new = _names(before)[:2]
    served.add_positives(user, new, [0.1, 0.05])
    after = served.recall(user, 20)
    # Only the seen filter changed the answer: the rest, scores included, is as it was.
    assert after.items[:18] == before.items[2:]
    served.add_positives("newcomer-e", new, [1.0, 0.5])
    assert served.recall("newcomer-e", 5).fallback == "unknown user"
    assert times == [False] * 3, "a model without history must not read event times"


@pytest.mark.parametrize("trained", list(MODELS), indirect=True)
def test_served_scorer_scores_as_the_recall_api_with_histories(served: Served) -> None:
    own = served.bundle().item_vocab.ids
    served.add_positives("newcomer-f", own[5:9], [4.0, 3.0, 2.0, 1.0])
    warm = _warm_users(served, 1)[0]
    catalog = np.asarray(sorted(set(map(str, served.dataset.catalog()))), dtype=object)
    scorer = ServedScorer(served.service, served.dataset, catalog)
    scorer.now_ms = served.now_ms
    users = [warm, "newcomer-f", "nobody-at-all"]
    scores = scorer.score(users)
    column = {c: j for j, c in enumerate(catalog)}
    history = served.current.history_len > 0
    for r, user in enumerate(users[:2] if history else users[:1]):
        answer = served.recall(user, 10)
        assert answer.fallback is None
        assert all(abs(scores[r, column[i]] - s) < 1e-5 for i, s in answer.items)
    bundle = served.bundle()
    registry_scores = TwoTowerScorer(bundle, served.features(bundle), catalog).score(
        users[1:] if not history else users[2:])
    assert np.allclose(scores[1:] if not history else scores[2:], registry_scores, atol=1e-5)
    pool = served.current.model.user.history
    if pool is not None and pool.mode == "attention":
        # The scorer's clock is its own: ages on another clock weigh the history anew
        # (a decayed mean is blind to a shift of every age by the same amount).
        scorer.now_ms = served.now_ms + 400 * HOUR_MS
        assert not np.allclose(scorer.score(["newcomer-f"])[0], scores[1], atol=1e-4)


@pytest.mark.parametrize("trained", ["vectors-attention"], indirect=True)
def test_histories_are_shared_by_versions_through_release_rollback_and_replay(
        served: Served) -> None:
    """How histories stay consistent: they are event facts (the seen sets), not model
    state, so every version reads the same ones. Positives that arrive while a new version
    serves are still in the user's history after a rollback to the old one, and the old
    version embeds them exactly as offline evaluation would; the rebase's replay of those
    events writes them again and changes nothing (ZADD LT: same members, same times)."""
    control = control_for(served.settings)
    registry = Registry(served.settings.models_dir)
    bundle, meta = registry.load(served.version)
    newer = registry.register(bundle, kind="nightly", cutoff_ms=int(meta["cutoff_ms"]) + 1,
                              parent=served.version, metrics={}, config_hash="same")
    control.publish(newer, served.dataset)
    control.promote(newer, force=True)
    wait_until_serving(served.service, newer)
    user = _warm_users(served, 1)[0]
    items = [i for i in served.bundle().item_vocab.ids if i not in
             served.service.users.seen(user)][:3]
    served.add_positives(user, items, [0.3, 0.2, 0.1])  # while the newer version serves
    stored = served.service.users.histories([user], 500)[0]

    control.rollback(to=served.version)
    wait_until_serving(served.service, served.version)
    assert served.current.version == served.version
    assert not set(items) & set(_names(served.recall(user, 50)))  # still seen
    assert np.allclose(served.query(user), served.offline_query(user), atol=1e-5)
    assert set(items) <= set(served.service.users.histories([user], HISTORY_LEN)[0][0])

    served.add_positives(user, items, [0.3, 0.2, 0.1])  # the rebase replays them
    assert served.service.users.histories([user], 500)[0] == stored
