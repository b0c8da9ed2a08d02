"""Small builders for tests: events, feature tables and a trained-enough bundle."""

from __future__ import annotations

import numpy as np

from common.data.dataset import Dataset
from common.data.events import Events
from common.data.tables import FeatureTable, FieldSpec
from common.infra.settings import Settings, load_settings
from common.model.bundle import ModelBundle

USER_FIELDS = (FieldSpec("region", "categorical"), FieldSpec("age", "numeric", buckets=4))
ITEM_FIELDS = (FieldSpec("category", "categorical"), FieldSpec("tags", "multi", max_len=3))


def make_events(pairs: list[tuple[str, str]], start_ms: int = 0, step_ms: int = 1000,
                event_type: str = "click") -> Events:
    """One event per (user, item) pair, in order, ``step_ms`` apart."""
    n = len(pairs)
    return Events.from_columns(
        event_id=[f"e{start_ms + k}" for k in range(n)],
        user_id=[u for u, _ in pairs], item_id=[i for _, i in pairs],
        event_type=[event_type] * n, ts_ms=start_ms + step_ms * np.arange(n))


def events_from_rows(rows: list[tuple]) -> Events:
    """Rows of (user, item, ts_ms) clicks or (user, item, ts_ms, rating) ratings."""
    return Events.from_records(
        {"event_id": f"e{n}", "user_id": r[0], "item_id": r[1], "ts_ms": r[2],
         "event_type": "rating" if len(r) > 3 else "click",
         "value": r[3] if len(r) > 3 else None}
        for n, r in enumerate(rows))


def make_dataset(n_users: int = 40, n_items: int = 30, n_events: int = 600,
                 seed: int = 0) -> Dataset:
    """Users in two groups clicking items of their group's category."""
    rng = np.random.default_rng(seed)
    users = [f"u{k}" for k in range(n_users)]
    items = [f"i{k}" for k in range(n_items)]
    pairs = []
    for _ in range(n_events):
        u = int(rng.integers(n_users))
        same = [k for k in range(n_items) if k % 2 == u % 2]
        pairs.append((users[u], items[int(rng.choice(same))]))
    user_table = FeatureTable.build(users, USER_FIELDS, {
        "region": [f"r{k % 2}" for k in range(n_users)],
        "age": rng.uniform(18, 70, n_users)})
    item_table = FeatureTable.build(items, ITEM_FIELDS, {
        "category": [f"c{k % 2}" for k in range(n_items)],
        "tags": [(f"t{k % 2}", f"t{k % 5 + 2}") for k in range(n_items)]})
    return Dataset("tiny", make_events(pairs), user_table, item_table)


def small_settings(**env: str) -> Settings:
    base = {"RECSTREAM_MODEL_EMBEDDING_DIM": "8", "RECSTREAM_MODEL_FEATURE_DIM": "4",
            "RECSTREAM_MODEL_HIDDEN_DIMS": "16", "RECSTREAM_MODEL_OUTPUT_DIM": "8",
            "RECSTREAM_MODEL_MIN_COUNT": "1", "RECSTREAM_MODEL_FREQ_HASH_SIZE": "4096",
            "RECSTREAM_TRAIN_BATCH_SIZE": "64", "RECSTREAM_TRAIN_BOOTSTRAP_EPOCHS": "2"}
    return load_settings({**base, **env})


def make_bundle(dataset: Dataset | None = None, settings: Settings | None = None
                ) -> ModelBundle:
    """An untrained bundle that has observed the data set's positives."""
    dataset = dataset or make_dataset()
    settings = settings or small_settings()
    bundle = ModelBundle.create(settings.model, dataset.users, dataset.items)
    bundle.observe(dataset.events.positives(settings.train.rating_threshold))
    return bundle
