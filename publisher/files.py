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
from publisher.base import Delta, PublishError


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

    def _dir(self, version: str) -> Path:
        return self.root / version / "deltas"

    def _next_seq(self, version: str) -> int:
        if version not in self._seq:
            names = [p.stem for p in self._dir(version).glob("*.npz")]
            self._seq[version] = max((int(n) for n in names if n.isdigit()), default=0)
        self._seq[version] += 1
        return self._seq[version]

    def publish_delta(self, delta: Delta) -> None:
        data = npz_bytes(
            user_ids=np.asarray(delta.user_ids, dtype=str),
            user_vectors=delta.user_vectors.astype(np.float32),
            item_ids=np.asarray(delta.item_ids, dtype=str),
            item_vectors=delta.item_vectors.astype(np.float32),
            meta=np.asarray(json.dumps({
                "offsets": {str(p): o for p, o in delta.offsets.items()},
                "max_event_ts_ms": delta.max_event_ts_ms, "step": delta.step})))
        with self._lock:
            path = self._dir(delta.version) / f"{self._next_seq(delta.version):012d}.npz"
            try:
                write_bytes_atomic(path, data)
            except OSError as exc:
                raise PublishError(f"cannot write delta {path}: {exc}") from exc

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
