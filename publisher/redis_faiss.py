"""The production publisher: user ID embeddings to Redis, item vectors to FAISS indexes.

Full publish of a version V (the nightly, the bootstrap, ``recstream publisher
publish``): every user's ID embedding and packed features into V's Redis namespace,
every servable catalogue item's tower vector (an ID row or side features: see
``servable_items``) into ``indexes/V``; then V is marked complete.
Nothing points at V until a promotion flips the release pointer, so a half-done
publish is invisible, and running it again completes it.

Deltas (the stream): touched users into V's namespace, touched items appended to
V's index as a durable delta file (folded into the index file every
``snapshot_every_deltas``), then a notification so serving applies them. Each call
either completes or raises ``PublishError``: the stream commits offsets only after.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from common.infra.redis_client import connect
from common.infra.settings import Settings
from common.model.bundle import Features, ModelBundle
from common.model.vectors import servable_items, served_item_vectors
from publisher.base import Delta, History, Interactions, PublishError
from publisher.index_store import IndexStore
from publisher.index_tuning import query_sample
from publisher.item_index import ItemIndex
from publisher.redis_users import COMPLETE, UserStore

log = logging.getLogger(__name__)
_USER_CHUNK = 100_000


@dataclass(frozen=True)
class FullPublishReport:
    """What a full publish wrote and how long each part took."""

    version: str
    users: int
    items: int
    redis_s: float
    index_s: float
    seen_s: float


class RedisFaissPublisher:
    """Publishes versions and deltas; implements ``publisher.base.Publisher``."""

    def __init__(self, users: UserStore, indexes: IndexStore, retention_versions: int) -> None:
        self.users, self.indexes = users, indexes
        self.retention_versions = retention_versions  # complete versions kept by ``prune``
        self._live: dict[str, tuple[ItemIndex, int]] = {}  # version -> (index, seq)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisFaissPublisher:
        """The publisher of ``settings``' Redis and index directory."""
        return cls(UserStore(connect(settings), settings.redis),
                   IndexStore(settings.indexes_dir, settings.index),
                   settings.redis.retention_versions)

    # -- full publish -----------------------------------------------------------------

    def publish_full(self, version: str, bundle: ModelBundle, features: Features,
                     catalog: Sequence[str], cutoff_ms: int,
                     history: Interactions | None = None,
                     progress: bool = False) -> FullPublishReport:
        """Write every user and item of ``version`` (not released); idempotent."""
        meta = self.users.meta(version)
        if meta is not None and meta.state == COMPLETE and self.indexes.exists(version):
            log.info("version already published", extra={"version": version})
            return FullPublishReport(version, meta.users, 0, 0.0, 0.0, 0.0)
        t0 = time.perf_counter()
        items = servable_items(bundle, features,
                               sorted(set(map(str, catalog)) | set(bundle.item_vocab.ids)))
        seen = None if history is None else (history.user_ids, history.item_ids,
                                             history.ts_ms)
        self.indexes.write_full(version, items,
                                served_item_vectors(bundle, features, items, cutoff_ms),
                                query_sample(bundle, features, self.indexes.s.tune_queries,
                                             cutoff_ms, seen))
        t1 = time.perf_counter()
        user_ids = bundle.user_vocab.ids
        weight = bundle.model.user.ids.weight.numpy()
        if meta is None or meta.state != COMPLETE:
            self.users.begin(version, len(user_ids), weight.shape[1],
                             bundle.user_encoder.packed_width, cutoff_ms)
            bar = tqdm(total=len(user_ids), unit="user", desc=f"publish {version}",
                       disable=not progress, leave=False)
            for lo in range(0, len(user_ids), _USER_CHUNK):
                chunk = user_ids[lo:lo + _USER_CHUNK]
                self.users.write(version, chunk, weight[lo + 1:lo + 1 + len(chunk)],
                                 features.users.packed(chunk))
                bar.update(len(chunk))
            bar.close()
        t2 = time.perf_counter()
        if history is not None:
            self.users.add_seen(history.user_ids, history.item_ids, history.ts_ms)
        t3 = time.perf_counter()
        self.users.complete(version)
        self.users.announce({"type": "published", "version": version})
        log.info("version published", extra={"version": version, "users": len(user_ids),
                                             "items": len(items)})
        return FullPublishReport(version, len(user_ids), len(items), t2 - t1, t1 - t0, t3 - t2)

    # -- deltas (the Publisher protocol) ----------------------------------------------

    def publish_delta(self, delta: Delta) -> None:
        """Users into Redis, items into the index's delta log, then tell serving."""
        if not self.ready(delta.version):
            raise PublishError(f"version {delta.version} is not published completely; "
                               "deltas cannot go into it yet")
        if delta.user_ids:
            self.users.write(delta.version, delta.user_ids, delta.user_vectors,
                             delta.user_features)
        if delta.seen is not None:
            self.users.add_seen(delta.seen.user_ids, delta.seen.item_ids, delta.seen.ts_ms)
        seq = None
        if delta.item_ids:
            seq = self._append_items(delta.version, delta.item_ids, delta.item_vectors)
        self.users.announce({"type": "delta", "version": delta.version, "seq": seq,
                             "users": len(delta.user_ids), "items": len(delta.item_ids)})

    def write_history(self, seen: Interactions) -> None:
        """The positives into the users' seen sets (ZADD LT: idempotent), which the recall
        API reads as their histories."""
        self.users.add_seen(seen.user_ids, seen.item_ids, seen.ts_ms)

    def histories(self, user_ids: list[str], max_len: int,
                  before_ms: int | None = None) -> list[History]:
        return self.users.histories(user_ids, max_len, before_ms)

    def _append_items(self, version: str, names: list[str], vectors: np.ndarray) -> int:
        with self._lock:
            try:
                seq = self.indexes.append_delta(version, names, vectors)
                index, _ = self._live.get(version) or self.indexes.load(version)
                index.apply(names, vectors)
                self._live = {version: (index, seq)}  # one version's index in memory
                if self.indexes.snapshot_due(version, seq):
                    self.indexes.snapshot(index, seq)
            except (OSError, RuntimeError, ValueError) as exc:
                self._live.pop(version, None)  # reload from files on the next delta
                raise PublishError(f"index delta for {version}: {exc}") from exc
            return seq

    def rebased(self, version: str, offsets: dict[int, int]) -> None:
        self.users.mark_rebased(version, offsets)
        self.users.announce({"type": "rebased", "version": version})

    def ready(self, version: str) -> bool:
        meta = self.users.meta(version)
        return meta is not None and meta.state == COMPLETE and self.indexes.exists(version)

    def champion(self) -> str | None:
        return self.users.release().champion

    def withdrawn(self) -> set[str]:
        return self.users.withdrawn()

    # -- retention --------------------------------------------------------------------

    def prune(self) -> list[str]:
        """Drop published versions beyond the retention count (never champion/previous)."""
        release = self.users.release()
        keep = {release.champion, release.previous}
        complete = [v for v, m in self.users.versions().items() if m.state == COMPLETE]
        keep |= set(complete[-self.retention_versions:])
        dropped = [v for v in complete if v not in keep]
        for version in dropped:
            self.users.drop(version)
            self.indexes.remove(version)
        if dropped:
            log.info("old versions removed", extra={"versions": dropped})
        return dropped


def history_of(events: Any, rating_threshold: float) -> Interactions:
    """The positives of ``events`` as seen-item history."""
    pos = events.positives(rating_threshold)
    return Interactions(pos.user_id.astype(str).tolist(), pos.item_id.astype(str).tolist(),
                        pos.ts_ms.astype(np.int64).tolist())
