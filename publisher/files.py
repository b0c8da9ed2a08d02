"""A file-backed publisher: each delta an atomically written ``.npz`` under
``root/{version}/deltas/``; readers fold them in order. For tests and for running
without Redis; the Redis/FAISS publisher replaces it in production.

>>> import tempfile
>>> pub = FilePublisher(Path(tempfile.mkdtemp()))
>>> vec = np.ones((1, 2), np.float32)
>>> pub.publish_delta(Delta("v1", ["u1"], vec, ["i1"], vec * 2, {0: 5}))
>>> pub.publish_delta(Delta("v1", ["u1"], vec * 3, [], np.zeros((0, 2), np.float32), {0: 9}))
>>> state = pub.read("v1")
>>> state.users["u1"].tolist(), state.items["i1"].tolist(), state.offsets
([3.0, 3.0], [2.0, 2.0], {0: 9})
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.infra.atomic import npz_bytes, write_bytes_atomic, write_text_atomic
from publisher.base import Delta, History, Interactions, PublishError

_HISTORY_CAP = 500  # positives kept per user, as RECSTREAM_REDIS_SEEN_MAX does in Redis


@dataclass
class PublishedState:
    """Everything published for one version, latest value per id."""

    users: dict[str, np.ndarray] = field(default_factory=dict)
    items: dict[str, np.ndarray] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)
    deltas: int = 0


class FilePublisher:
    """Durable deltas as numbered files; sequence numbers survive restarts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._seq: dict[str, int] = {}
        self._seen: dict[str, dict[str, int]] | None = None  # user -> item -> first time
        self._unsaved: list[Interactions] = []  # written histories no delta file holds yet

    def _dir(self, version: str) -> Path:
        return self.root / version / "deltas"

    def _next_seq(self, version: str) -> int:
        if version not in self._seq:
            names = [p.stem for p in self._dir(version).glob("*.npz")]
            self._seq[version] = max((int(n) for n in names if n.isdigit()), default=0)
        self._seq[version] += 1
        return self._seq[version]

    def publish_delta(self, delta: Delta) -> None:
        with self._lock:
            unsaved = list(self._unsaved)
        seen = unsaved + ([delta.seen] if delta.seen is not None else [])
        data = npz_bytes(
            user_ids=np.asarray(delta.user_ids, dtype=str),
            user_vectors=delta.user_vectors.astype(np.float32),
            item_ids=np.asarray(delta.item_ids, dtype=str),
            item_vectors=delta.item_vectors.astype(np.float32),
            **_seen_arrays(seen),
            meta=np.asarray(json.dumps({
                "offsets": {str(p): o for p, o in delta.offsets.items()},
                "max_event_ts_ms": delta.max_event_ts_ms, "step": delta.step})))
        with self._lock:
            path = self._dir(delta.version) / f"{self._next_seq(delta.version):012d}.npz"
            try:
                write_bytes_atomic(path, data)
            except OSError as exc:
                raise PublishError(f"cannot write delta {path}: {exc}") from exc
            if delta.seen is not None:
                self._add_seen(delta.seen)
            del self._unsaved[:len(unsaved)]

    # -- histories: the seen sets' semantics (item -> first time), kept in memory ------------

    def write_history(self, seen: Interactions) -> None:
        """In memory, and into the next delta's file: durable with it (a restart before it
        replays the step; the histories are rebuilt from the delta files on first use)."""
        with self._lock:
            self._add_seen(seen)
            self._unsaved.append(seen)

    def histories(self, user_ids: list[str], max_len: int,
                  before_ms: int | None = None) -> list[History]:
        with self._lock:
            seen = self._loaded()
            out = []
            for user in user_ids:
                pairs = sorted((t, i) for i, t in seen.get(str(user), {}).items()
                               if before_ms is None or t < before_ms)[-max_len:]
                out.append(([i for _, i in pairs], [t for t, _ in pairs]))
            return out

    def _loaded(self) -> dict[str, dict[str, int]]:
        if self._seen is None:
            self._seen = {}
            for path in sorted(self.root.glob("*/deltas/*.npz")):
                with np.load(path, allow_pickle=False) as z:
                    if "seen_users" in z.files:
                        self._merge(z["seen_users"].tolist(), z["seen_items"].tolist(),
                                    z["seen_ts"].tolist())
        return self._seen

    def _add_seen(self, seen: Interactions) -> None:
        self._loaded()
        self._merge(seen.user_ids, seen.item_ids, seen.ts_ms)

    def _merge(self, users: list[str], items: list[str], ts: list[int]) -> None:
        assert self._seen is not None
        for user, item, t in zip(users, items, ts, strict=True):
            mine = self._seen.setdefault(str(user), {})
            mine[str(item)] = min(int(t), mine.get(str(item), int(t)))  # as ZADD LT
            if len(mine) > 2 * _HISTORY_CAP:  # trimmed in bulk, as Redis does
                keep = sorted(mine.items(), key=lambda kv: (kv[1], kv[0]))[-_HISTORY_CAP:]
                self._seen[str(user)] = dict(keep)

    def rebased(self, version: str, offsets: dict[int, int]) -> None:
        write_text_atomic(self.root / version / "rebased.json",
                          json.dumps({"offsets": {str(p): o for p, o in offsets.items()}}))

    def ready(self, version: str) -> bool:
        return True

    def champion(self) -> str | None:
        return None

    def withdrawn(self) -> set[str]:
        return set()

    def is_rebased(self, version: str) -> bool:
        return (self.root / version / "rebased.json").exists()

    def read(self, version: str) -> PublishedState:
        """Fold every delta of a version, oldest first."""
        state = PublishedState()
        for path in sorted(self._dir(version).glob("*.npz")):
            with np.load(path, allow_pickle=False) as z:
                state.users.update(zip(z["user_ids"].tolist(), z["user_vectors"], strict=True))
                state.items.update(zip(z["item_ids"].tolist(), z["item_vectors"], strict=True))
                meta = json.loads(str(z["meta"]))
            for p, o in meta["offsets"].items():
                state.offsets[int(p)] = max(o, state.offsets.get(int(p), 0))
            state.deltas += 1
        return state


def _seen_arrays(seen: list[Interactions]) -> dict[str, np.ndarray]:
    if not seen:
        return {}
    return {"seen_users": np.asarray([u for s in seen for u in s.user_ids], dtype=str),
            "seen_items": np.asarray([i for s in seen for i in s.item_ids], dtype=str),
            "seen_ts": np.asarray([t for s in seen for t in s.ts_ms], dtype=np.int64)}
