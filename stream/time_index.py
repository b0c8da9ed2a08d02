"""Per-partition time→offset index, kept by the trainer for rebases.

The embedded broker's ListOffsets is wrong (ARCHITECTURE, broker facts), so the
consumer records, per partition, blocks of ``(first_offset, max_ts_ms)``. Every event
with ``ts >= T`` lies in a block whose ``max_ts >= T``, so replaying from the first such
block's offset (and filtering by timestamp) misses nothing. Blocks closer than
``resolution_ms`` in event time are merged, which keeps the index small at the cost of
replaying a little more.

>>> idx = TimeIndex(resolution_ms=10)
>>> idx.add(0, first_offset=0, max_ts_ms=100)
>>> idx.add(0, first_offset=50, max_ts_ms=200)
>>> idx.add(0, first_offset=90, max_ts_ms=205)   # merged into the previous block
>>> idx.offset_for(0, 150), idx.offset_for(0, 201), idx.offset_for(0, 999)
(50, 50, None)
"""

from __future__ import annotations

from typing import Any


class TimeIndex:
    """``partition -> [(first_offset, max_ts_ms), ...]`` in offset order."""

    def __init__(self, resolution_ms: int = 60_000) -> None:
        self.resolution_ms = resolution_ms
        self.blocks: dict[int, list[list[int]]] = {}
        self.pruned: set[int] = set()  # partitions whose oldest blocks were forgotten

    def add(self, partition: int, first_offset: int, max_ts_ms: int) -> None:
        """Record that events from ``first_offset`` on (this step) reach ``max_ts_ms``."""
        blocks = self.blocks.setdefault(partition, [])
        if blocks and max_ts_ms - blocks[-1][1] < self.resolution_ms:
            blocks[-1][1] = max(blocks[-1][1], max_ts_ms)
        else:
            blocks.append([first_offset, max_ts_ms])  # block maxima only ever grow

    def offset_for(self, partition: int, ts_ms: int) -> int | None:
        """Smallest recorded offset from which every event with ``ts >= ts_ms`` follows;
        ``None`` if no consumed event of the partition is that recent."""
        for first, max_ts in self.blocks.get(partition, []):
            if max_ts >= ts_ms:
                return first
        return None

    def covers(self, partition: int, ts_ms: int) -> bool:
        """Whether the index reaches back far enough to answer for ``ts_ms`` exactly."""
        blocks = self.blocks.get(partition, [])
        return partition not in self.pruned or (bool(blocks) and blocks[0][1] < ts_ms)

    def prune(self, window_ms: int) -> None:
        """Forget blocks whose events all lie more than ``window_ms`` before the newest
        event indexed (the one just before the window is kept as its lower bound)."""
        if not any(self.blocks.values()):
            return
        older_than_ms = max(b[-1][1] for b in self.blocks.values() if b) - window_ms
        for p, blocks in self.blocks.items():
            keep = next((i for i, b in enumerate(blocks) if b[1] >= older_than_ms),
                        len(blocks) - 1)
            if keep > 1:
                self.blocks[p] = blocks[keep - 1:]
                self.pruned.add(p)

    def to_dict(self) -> dict[str, Any]:
        return {"resolution_ms": self.resolution_ms,
                "blocks": {str(p): [list(e) for e in b] for p, b in self.blocks.items()},
                "pruned": sorted(self.pruned)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimeIndex:
        idx = cls(int(d["resolution_ms"]))
        idx.blocks = {int(p): [list(map(int, b)) for b in bs] for p, bs in d["blocks"].items()}
        idx.pruned = {int(p) for p in d.get("pruned", [])}
        return idx
