"""Helpers for publisher and serving tests: settings against the test Redis, a released
champion, the exact answer the recall API must give."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from streaming import SMALL_MODEL

from batch.jobs import bootstrap_job
from common.data.dataset import Dataset
from common.infra.settings import Settings, load_settings
from common.model.bundle import Features, ModelBundle
from common.model.history import HOUR_MS
from common.model.registry import Registry
from common.model.towers import History
from common.model.vectors import item_vectors, servable_items
from publisher.control import ReleaseControl
from publisher.redis_faiss import RedisFaissPublisher
from serving.recall import RecallService


def publish_env(home: Path, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"RECSTREAM_HOME": str(home), "RECSTREAM_REDIS_URL": redis_url,
            "RECSTREAM_REDIS_PREFIX": prefix, "RECSTREAM_TRAIN_BATCH_SIZE": "128",
            "RECSTREAM_TRAIN_THREADS": "1", "RECSTREAM_SERVING_VERSION_POLL_S": "0.2",
            **SMALL_MODEL, **extra}


def publish_settings(home: Path, redis_url: str, prefix: str, **extra: str) -> Settings:
    return load_settings(publish_env(home, redis_url, prefix, **extra))


def control_for(settings: Settings) -> ReleaseControl:
    return ReleaseControl.from_settings(settings)


def released_champion(settings: Settings, dataset: Dataset, end_ms: int) -> str:
    """Bootstrap on the events before ``end_ms``, publish it fully and release it."""
    version = bootstrap_job(settings, dataset, None, end_ms, epochs=1, promote=True).version
    control = control_for(settings)
    control.publish(version, dataset)
    control.promote(version)
    return version


def service_for(settings: Settings, clock: Callable[[], int] | None = None) -> RecallService:
    pub = RedisFaissPublisher.from_settings(settings)
    if clock is None:
        return RecallService(settings.serving, pub.users, pub.indexes,
                             Registry(settings.models_dir))
    return RecallService(settings.serving, pub.users, pub.indexes,
                         Registry(settings.models_dir), clock=clock)


def exact_answer(settings: Settings, dataset: Dataset, version: str, user_id: str, k: int,
                 seen: set[str], user_emb: np.ndarray | None = None,
                 item_overrides: dict[str, np.ndarray] | None = None) -> list[str]:
    """Top-k by exact inner product over the version's published item vectors, with the
    user vector computed from ``user_emb`` (default: the registry's row)."""
    bundle, _ = Registry(settings.models_dir).load(version)
    features = Features.build(bundle, dataset.users, dataset.items)
    catalog = servable_items(bundle, features,
                             sorted(set(map(str, dataset.catalog())) | set(bundle.item_vocab.ids)))
    items = item_vectors(bundle, features, catalog).numpy()
    names = list(catalog)
    for name, vec in (item_overrides or {}).items():
        if name in names:
            items[names.index(name)] = vec
        else:
            names.append(name)
            items = np.vstack([items, vec[None]])
    if user_emb is None:
        user_emb = bundle.model.user.ids.weight[bundle.user_vocab.lookup([user_id])].numpy()
    cat, multi = features.users.gather(torch.from_numpy(features.users.rows([user_id])))
    history = _history(settings, bundle, user_id, dict(zip(names, items, strict=True)))
    with torch.no_grad():
        query = bundle.model.user(torch.from_numpy(user_emb.reshape(1, -1)), cat, multi,
                                  history)
    scores = items @ query.numpy()[0]
    order = [i for i in np.argsort(-scores, kind="stable") if names[i] not in seen]
    return [names[i] for i in order[:k]]


def _history(settings: Settings, bundle: ModelBundle, user_id: str,
             vectors: dict[str, np.ndarray]) -> History | None:
    """The user tower's history input as the recall API builds it: the user's seen set
    (last ``history_len`` by time, aged at the wall clock: the tests' services use it) over
    the item vectors the index holds (``vectors``), or the version's item-ID rows."""
    n = bundle.model.cfg.history_len
    if n == 0 or bundle.model.user.history is None:
        return None
    pub = RedisFaissPublisher.from_settings(settings)
    items, ts = pub.users.histories([user_id], n)[0]
    now = int(time.time() * 1000)
    age = torch.zeros(1, n)
    mask = torch.zeros(1, n, dtype=torch.bool)
    if bundle.model.user.history_vectors:
        emb = torch.zeros(1, n, bundle.model.cfg.output_dim)
        held = [(k, i) for k, i in enumerate(items) if i in vectors]
        for k, item in held:
            emb[0, n - len(items) + k] = torch.from_numpy(
                vectors[item][:bundle.model.cfg.output_dim])
    else:
        rows = torch.zeros(1, n, dtype=torch.long)
        rows[0, n - len(items):] = torch.from_numpy(bundle.item_vocab.lookup(items))
        emb, held = bundle.model.item.ids.weight[rows], list(enumerate(items))
    for k, _ in held:
        mask[0, n - len(items) + k] = True
        age[0, n - len(items) + k] = max(now - ts[k], 0) / HOUR_MS
    return emb, age, mask


def published_item_vectors(settings: Settings, version: str) -> tuple[list[str], np.ndarray]:
    """Every item of a version's index with the vector it holds now (deltas included)."""
    index, _ = RedisFaissPublisher.from_settings(settings).indexes.load(version)
    ids = list(index.names)
    vectors = np.vstack([index.index.reconstruct(int(i)) for i in ids])
    return [index.names[i] for i in ids], vectors
