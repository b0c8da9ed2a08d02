"""The recall service: user id → top-K item ids from the released version.

``recall`` reads the user's ID embedding and packed features from the served
version's Redis namespace and the user's seen items (their positives, with event
times) in one round trip, runs the user tower (on a history model, over the last N
of those positives, aged against ``clock``), searches that version's index, drops
items the user has seen, and falls back to popular items (saying why) for a user it
cannot embed (no row and no usable history) or when Redis does not answer.
``refresh`` follows the release pointer (loading a new version beside the old one
and swapping the reference, so requests in flight finish on the old one) and applies
index deltas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.infra.settings_groups import ServingSettings
from common.model.registry import Registry, RegistryError
from publisher.base import PublishError
from publisher.index_store import IndexStore, IndexStoreError
from publisher.redis_users import UserStore, VersionStateError
from serving.loaded import ServedVersion, load_version
from serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


class NotReadyError(RuntimeError):
    """No version is released (or none could be loaded) yet."""


@dataclass(frozen=True)
class Recall:
    """One answer: items best first, the version that produced it, any fallback."""

    user_id: str
    version: str
    items: list[tuple[str, float]]
    fallback: str | None = None  # why the popular list answered, if it did

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "version": self.version, "fallback": self.fallback,
                "items": [{"item_id": i, "score": round(s, 6)} for i, s in self.items]}


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class RecallService:
    """Answers recall requests from the currently released version.

    ``clock`` (ms) is what history ages are measured against: wall time when serving,
    event time in a replay (the attention pooling reads log1p(age in hours)).
    """

    def __init__(self, serving: ServingSettings, users: UserStore, indexes: IndexStore,
                 registry: Registry, metrics: ServingMetrics | None = None,
                 clock: Callable[[], int] = wall_clock_ms) -> None:
        self.serving, self.users, self.indexes = serving, users, indexes
        self.registry, self.clock = registry, clock
        self.metrics = metrics or ServingMetrics()
        self.current: ServedVersion | None = None
        self._refresh_lock = threading.Lock()

    # -- answering --------------------------------------------------------------------

    def recall(self, user_id: str, k: int) -> Recall:
        served = self.current  # one reference for the whole request: no mixed versions
        if served is None:
            raise NotReadyError("no model version is released yet")
        history = served.history_len > 0
        try:
            rows, recent = self.users.read_with_seen(served.redis_meta, user_id, history)
            seen = set(recent[0])
        except PublishError as exc:
            log.warning("user store unavailable; answering with popular items",
                        extra={"error": str(exc)})
            return self._popular(served, user_id, k, set(), "user store unavailable")
        which, query = served.queries(rows, [recent] if history else None, self.clock())
        if not len(which):
            return self._popular(served, user_id, k, seen, "unknown user")
        hits = served.search(query, k + len(seen))[0]
        items = [(i, s) for i, s in hits if i not in seen][:k]
        return Recall(user_id, served.version, items)

    def _popular(self, served: ServedVersion, user_id: str, k: int, seen: set[str],
                 reason: str) -> Recall:
        self.metrics.fallbacks.labels(reason).inc()
        items = [(i, 0.0) for i in served.popular if i not in seen][:k]
        return Recall(user_id, served.version, items, fallback=reason)

    # -- following releases and deltas ------------------------------------------------

    def refresh(self) -> bool:
        """Load the released version if it is not the one served, else catch up on
        its index deltas. Returns whether the served version changed."""
        with self._refresh_lock:
            champion = self.users.release().champion
            if champion is None:
                return False
            served = self.current
            if served is not None and served.version == champion:
                self._catch_up(served)
                return False
            try:
                loaded = load_version(champion, self.registry, self.indexes, self.users,
                                      self.serving.popular_items)
            except (RegistryError, IndexStoreError, VersionStateError, OSError) as exc:
                self.metrics.reload_failures.inc()
                log.error("cannot load the released version; still serving the old one",
                          extra={"version": champion, "error": str(exc)})
                return False
            self.current = loaded
            self.metrics.reloads.inc()
            self.metrics.version.info({"version": champion})
            self.metrics.index_items.set(len(loaded.index))
            log.info("serving version", extra={"version": champion,
                                               "previous": served.version if served else None})
            return True

    def _catch_up(self, served: ServedVersion) -> None:
        try:
            deltas = self.indexes.deltas_since(served.version, served.index.seq)
        except IndexStoreError as exc:  # a gap: the deltas were folded into a snapshot
            log.info("reloading the index from its snapshot", extra={"error": str(exc)})
            self.current = load_version(served.version, self.registry, self.indexes,
                                        self.users, self.serving.popular_items)
            return
        for seq, names, vectors in deltas:
            served.index.update(names, vectors, seq)
            self.metrics.deltas.inc()
        if deltas:
            self.metrics.index_items.set(len(served.index))


def wait_until_serving(service: RecallService, version: str | None = None,
                       timeout_s: float = 10.0) -> ServedVersion:
    """Refresh until a version (``version``, if given) is served; for start-up and tests."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        service.refresh()
        served = service.current
        if served is not None and version in (None, served.version):
            return served
        time.sleep(0.05)
    raise NotReadyError(f"version {version or 'any'} not served within {timeout_s:.0f} s")
