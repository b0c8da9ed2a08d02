"""Item cold start: an item with side features but no ID row is served from its features
at once (full publish and the stream's next delta); one with neither is not served until
it earns a row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from factories import make_bundle, make_dataset, make_events, small_settings

from common.data.dataset import Dataset
from common.model.bundle import Features
from common.model.vectors import item_vectors
from publisher.redis_faiss import RedisFaissPublisher
from stream.learner import StreamLearner, stream_train_settings


def _world() -> tuple[Dataset, StreamLearner]:
    """Items i0..i29 have features; the bundle has seen no click on i29; IDs need two
    sightings for a row of their own (the production rule)."""
    full = make_dataset()
    keep = np.asarray(full.events.item_id != "i29")
    ds = Dataset(full.name, full.events.take(np.flatnonzero(keep)), full.users, full.items)
    settings = small_settings(RECSTREAM_MODEL_MIN_COUNT="2")
    bundle = make_bundle(ds, settings)
    return ds, StreamLearner(bundle, ds, stream_train_settings(settings), "v1")


def test_a_new_item_with_features_is_in_the_next_delta_with_its_feature_vector() -> None:
    ds, learner = _world()
    assert "i29" not in learner.bundle.item_vocab
    out = learner.step(make_events([("u0", "i29"), ("u1", "i2"), ("u2", "i4")]), 1)
    assert "i29" not in learner.bundle.item_vocab  # one sighting: still on the cold row
    assert "i29" in out.item_ids
    features = Features.build(learner.bundle, ds.users, ds.items)
    expected = item_vectors(learner.bundle, features, ["i29"]).numpy()[0]
    np.testing.assert_allclose(out.item_vectors[out.item_ids.index("i29")], expected,
                               atol=1e-6)


def test_an_item_with_neither_row_nor_features_waits_for_its_row() -> None:
    _, learner = _world()
    out = learner.step(make_events([("u0", "ghost"), ("u1", "i2"), ("u2", "i4")]), 1)
    assert "ghost" not in out.item_ids
    out = learner.step(make_events([("u3", "ghost"), ("u1", "i2")], start_ms=10_000), 2)
    assert "ghost" in learner.bundle.item_vocab  # second sighting: a row of its own
    assert "ghost" in out.item_ids


def test_full_publish_indexes_items_with_a_row_or_features_only(
        tmp_path: Path, redis_url: str, prefix: str) -> None:
    ds, learner = _world()
    settings = small_settings(RECSTREAM_HOME=str(tmp_path), RECSTREAM_REDIS_URL=redis_url,
                              RECSTREAM_REDIS_PREFIX=prefix)
    publisher = RedisFaissPublisher.from_settings(settings)
    features = Features.build(learner.bundle, ds.users, ds.items)
    catalog = [*map(str, ds.catalog()), "ghost"]
    publisher.publish_full("v1", learner.bundle, features, catalog, cutoff_ms=0)
    index, _ = publisher.indexes.load("v1")
    names = set(index.names.values())
    assert "i29" in names  # no row, but features
    assert "ghost" not in names  # neither
    assert {f"i{k}" for k in range(29)} <= names
