"""The trainer's side of its fetch process: which assignment it reads for, what came.

Every rebalance starts a new generation; chunks the fetch process read for an older one
are dropped, since the trainer has dropped its buffer and re-reads from the offsets its
state includes. A partition the state has never seen is read from the group's committed
offset (the group consumer's position: it never fetches, so it never moves on).

The rebalance hooks run on kafka-python's IO thread, concurrently with the trainer's
loop: ``lock`` orders a hook's drop of the buffer against the loop adding a chunk.
"""

from __future__ import annotations

import threading
from typing import Any

from kafka.errors import KafkaError

from stream.fetcher import Fetched, Fetcher


class Feed:
    """Generations, positions and lag of the fetch process's reading."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self.lock = threading.Lock()
        self.generation = 0
        self._changed = False
        self._highwater: dict[int, int] = {}
        self._end: dict[int, int] = {}  # partition -> next offset the trainer will receive

    def changed(self) -> None:
        """The assignment changed (a rebalance hook, holding ``lock``): what was read for
        the old one is void."""
        self.generation += 1
        self._changed = True

    def reassign(self, consumer: Any, offsets: dict[int, int]) -> None:
        """After a change, hand the fetch process the group consumer's assignment, to be
        read from ``offsets`` (what the state includes) or the committed offset
        (blocking calls: never from a rebalance hook)."""
        if not self._changed:
            return
        with self.lock:
            generation, assigned = self.generation, consumer.assignment()
            self._changed = False
        positions: dict[int, int | None] | None
        try:
            positions = {tp.partition: offsets[tp.partition] if tp.partition in offsets
                         else consumer.position(tp) for tp in assigned}
        except KafkaError:  # e.g. revoked meanwhile: a newer generation follows
            positions = None
        if positions is None or None in positions.values():
            self._changed = True  # not known yet: the next poll tries again
            return
        self._highwater.clear()
        self._end = dict(positions)
        self.fetcher.assign(generation, positions)

    def receive(self, timeout_s: float) -> Fetched | None:
        """The next chunk of the current generation, waiting up to ``timeout_s`` for one."""
        while True:
            fetched = self.fetcher.receive(timeout_s)
            if fetched is None:
                return None
            if fetched.generation == self.generation:
                break
        p = fetched.partition
        if len(fetched.offsets):
            self._end[p] = int(fetched.offsets[-1]) + 1
        if fetched.highwater is not None:
            self._highwater[p] = fetched.highwater
        return fetched

    def lag(self) -> dict[int, int]:
        """Records each partition holds beyond what the trainer has received."""
        return {p: max(hw - self._end.get(p, hw), 0) for p, hw in self._highwater.items()}

    def close(self) -> None:
        self.fetcher.close()
