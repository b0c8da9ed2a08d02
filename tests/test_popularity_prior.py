"""The decayed-popularity prior folded into the served vectors (issue 14, deliverable 4):
counts kept in the bundle, saved with versions and checkpoints, moved by the stream, and
the index's inner product equal to cosine + beta * log(1 + decayed count)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import make_bundle, make_dataset, make_events, small_settings
from publishing import publish_settings, released_champion, service_for

from common.data.synthetic import SyntheticConfig, generate
from common.model.bundle import Features
from common.model.prior import popularity_prior
from common.model.registry import Registry
from common.model.vectors import item_vectors, served_item_vectors, served_queries
from publisher.files import FilePublisher
from serving.recall import wait_until_serving
from stream.checkpoint import CheckpointMeta, load_checkpoint, restore_into, save_checkpoint
from stream.learner import StreamLearner, stream_train_settings

PRIOR = {"RECSTREAM_MODEL_PRIOR_BETA": "0.1", "RECSTREAM_MODEL_PRIOR_HALF_LIFE_DAYS": "2"}
DAY = 86_400_000


def test_the_bundle_counts_decayed_positives_per_item() -> None:
    settings = small_settings(**PRIOR)
    ds = make_dataset()
    bundle = make_bundle(ds, settings)
    now = int(ds.events.ts_ms.max())
    pos = ds.events.positives(settings.train.rating_threshold)
    want = {}
    for item, ts in zip(pos.item_id.astype(str), pos.ts_ms, strict=True):
        want[item] = want.get(item, 0.0) + 0.5 ** ((now - ts) / (2 * DAY))
    items = sorted(want)
    got = popularity_prior(bundle.item_pop[bundle.item_vocab.lookup(items)], now, 2.0)
    np.testing.assert_allclose(got, np.log1p([want[i] for i in items]), rtol=1e-9)


def test_the_index_scores_cosine_plus_beta_times_the_prior() -> None:
    settings = small_settings(**PRIOR)
    ds = make_dataset()
    bundle = make_bundle(ds, settings)
    features = Features.build(bundle, ds.users, ds.items)
    items = sorted(set(ds.events.item_id.astype(str)))
    now = int(ds.events.ts_ms.max())
    index_vecs = served_item_vectors(bundle, features, items, now)
    assert index_vecs.shape[1] == bundle.model.cfg.output_dim + 1
    user = np.random.default_rng(0).normal(size=(1, bundle.model.cfg.output_dim))
    user = (user / np.linalg.norm(user)).astype(np.float32)
    got = served_queries(bundle.model.cfg, user) @ index_vecs.T
    cosine = user @ item_vectors(bundle, features, items).numpy().T
    prior = popularity_prior(bundle.item_pop[bundle.item_vocab.lookup(items)], now, 2.0)
    np.testing.assert_allclose(got, cosine + 0.1 * prior, atol=1e-5)
    assert np.ptp(prior) > 0.5  # popular and rare items differ: the prior says something
    no_prior = make_bundle(ds, small_settings())
    assert served_item_vectors(no_prior, features, items, now).shape[1] == \
        no_prior.model.cfg.output_dim


def test_versions_and_checkpoints_keep_the_counts(tmp_path: Path) -> None:
    settings = small_settings(**PRIOR)
    bundle = make_bundle(make_dataset(), settings)
    reg = Registry(tmp_path / "models")
    version = reg.register(bundle, kind="bootstrap", cutoff_ms=1, parent=None, metrics={},
                           config_hash="t")
    loaded, _ = reg.load(version)
    np.testing.assert_array_equal(loaded.item_pop, bundle.item_pop)
    assert loaded.model.cfg.prior_beta == 0.1
    save_checkpoint(tmp_path / "ckpt", bundle, CheckpointMeta(version, 1, {0: 1}), keep=2)
    meta, payload = load_checkpoint(tmp_path / "ckpt")
    fresh, _ = reg.load(version)
    fresh.item_pop[:] = 0
    restore_into(fresh, payload)
    np.testing.assert_array_equal(fresh.item_pop, bundle.item_pop)


def test_a_stream_step_moves_the_prior_of_its_items(tmp_path: Path) -> None:
    settings = small_settings(**PRIOR)
    ds = make_dataset()
    learner = StreamLearner(make_bundle(ds, settings), ds, stream_train_settings(settings),
                            "v1", settings.stream, FilePublisher(tmp_path))
    now = int(ds.events.ts_ms.max()) + 1000
    before = served_item_vectors(learner.bundle, learner.features, ["i3"], now)[0, -1]
    burst = make_events([(f"u{k}", "i3") for k in range(10)], start_ms=now, step_ms=0)
    out = learner.step(burst, 1)
    assert "i3" in out.item_ids  # published although item rows do not learn
    after = out.item_vectors[out.item_ids.index("i3"), -1]
    # ten more positives, at the step's newest event time
    assert after == pytest.approx(np.log1p(np.expm1(before) + 10), abs=1e-4)


def test_the_recall_api_ranks_by_cosine_plus_the_prior(tmp_path: Path, redis_server) -> None:
    """Served end to end (real Redis, FAISS): the answer's scores are cosine + beta times
    the prior as of the version's cutoff, and the order differs from the cosine's."""
    world = generate(SyntheticConfig(n_users=200, n_items=150, n_days=3, events_per_day=1500,
                                     seed=4)).dataset
    settings = publish_settings(tmp_path, redis_server.url, "prior",
                                RECSTREAM_MODEL_PRIOR_BETA="0.3", **{
                                    k: v for k, v in PRIOR.items() if "BETA" not in k})
    end = int(world.events.ts_ms.max()) + 1
    version = released_champion(settings, world, end)
    service = service_for(settings)
    wait_until_serving(service, version)
    bundle, _ = Registry(settings.models_dir).load(version)
    features = Features.build(bundle, world.users, world.items)
    user = str(world.events.user_id[-1])
    got = service.recall(user, 20)
    assert got.fallback is None
    names = [i for i, _ in got.items]
    served = service.current
    assert served is not None
    rows = service.users.read(version, [user])
    recent = service.users.histories([user], served.history_len)
    _, query = served.queries(rows, recent, service.clock())  # the user tower, as served
    cosine = query @ item_vectors(bundle, features, names).numpy().T
    prior = popularity_prior(bundle.item_pop[bundle.item_vocab.lookup(names)], end, 2.0)
    np.testing.assert_allclose([s for _, s in got.items], cosine[0] + 0.3 * prior, atol=1e-4)
    assert not np.all(np.diff(cosine[0]) <= 1e-6)  # the prior reordered the cosine's list
