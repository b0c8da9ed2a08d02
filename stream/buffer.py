"""Decoded records waiting for a step, oldest first, and when a step is due.

The interval runs from when the oldest buffered chunk arrived, less the time its oldest
record was already in flight (send → fetch → pipe), up to half the interval: a record
that waited 0.2 s upstream is stepped 0.2 s sooner, while a producer whose clock runs
behind (records that look old) can at most halve the interval, not make every poll a
step.
"""

from __future__ import annotations

import time
from collections import deque

from stream.intake import Chunk


class Buffer:
    """Chunks in the order they were read; ``events`` counts their valid events."""

    def __init__(self) -> None:
        self.chunks: deque[Chunk] = deque()
        self.events = 0
        self.started: float | None = None  # when the oldest chunk arrived
        self.in_flight_s = 0.0  # how long its oldest record had been on the way by then

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.events += chunk.n_events
        if self.started is None:
            self.started = time.monotonic()
            # Valid records only, and no Kafka "no timestamp" (-1) or zero.
            stamps = chunk.record_ts_ms[chunk.valid]
            stamps = stamps[stamps > 0]
            self.in_flight_s = max(0.0, time.time() - float(stamps.min()) / 1000) \
                if len(stamps) else 0.0

    def clear(self) -> None:
        self.chunks.clear()
        self.events = 0
        self.started = None
        self.in_flight_s = 0.0

    def due(self, interval_s: float, max_events: int) -> bool:
        """A step is due: ``max_events`` gathered, or the oldest waited ``interval_s``."""
        if not self.chunks:
            return False
        if self.events >= max_events:
            return True
        assert self.started is not None
        credit = min(self.in_flight_s, interval_s / 2)
        return time.monotonic() - self.started + credit >= interval_s

    def take(self, max_events: int) -> list[Chunk]:
        """The oldest records holding up to ``max_events`` valid events (a prefix per
        partition, so a step's offsets cover exactly what it took)."""
        out: list[Chunk] = []
        n = 0
        while self.chunks and (n < max_events or not self.chunks[0].n_events):
            head, rest = self.chunks.popleft().split(max_events - n)
            out.append(head)
            n += head.n_events
            if len(rest):
                self.chunks.appendleft(rest)
        self.events -= n
        self.started = time.monotonic() if self.chunks else None
        self.in_flight_s = 0.0  # what stays was read during this step: no credit
        return out
