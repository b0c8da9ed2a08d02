"""Decoded records into the trainer's buffer; rejects go to the dead-letter topic.

A dead letter keeps the original bytes and key, with headers naming the reason, its
kind (``common.data.wire.reason_kind``, also the rejected counter's label) and where it came
from, so it can be inspected and replayed. Dead letters are flushed before the offsets
that cover them are committed (``flush``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import KafkaProducer

from common.data.events import Events
from common.data.wire import reason_kind
from stream.fetcher import Fetched, Reject
from stream.metrics import TrainerMetrics


@dataclass(frozen=True)
class Chunk:
    """Consecutive records of one partition: where each was read, whether it was valid,
    and the valid ones' events in columns."""

    partition: int
    offsets: np.ndarray  # int64, one per record, increasing
    record_ts_ms: np.ndarray  # int64, one per record
    valid: np.ndarray  # bool, one per record (False: dead-lettered)
    events: Events  # one per valid record, in record order

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def n_events(self) -> int:
        return len(self.events)

    def split(self, max_events: int) -> tuple[Chunk, Chunk]:
        """The records before the valid one after ``max_events`` valid ones, and the rest
        (so dead letters right after the last event taken go with it)."""
        valid_at = np.flatnonzero(self.valid)
        cut = len(self) if max_events >= len(valid_at) else int(valid_at[max_events])
        return self._slice(0, cut), self._slice(cut, len(self))

    def _slice(self, lo: int, hi: int) -> Chunk:
        first, n = int(self.valid[:lo].sum()), int(self.valid[lo:hi].sum())
        return Chunk(self.partition, self.offsets[lo:hi], self.record_ts_ms[lo:hi],
                     self.valid[lo:hi], self.events.take(np.arange(first, first + n)))


Letter = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


class DeadLetterError(RuntimeError):
    """The dead-letter topic did not take some rejected records."""


class Intake:
    """Takes in decoded records and dead-letters the bad ones."""

    def __init__(self, dlq: KafkaProducer, topic: str, dlq_topic: str, max_bytes: int,
                 metrics: TrainerMetrics) -> None:
        self.dlq, self.topic, self.dlq_topic = dlq, topic, dlq_topic
        self.max_bytes, self.metrics = max_bytes, metrics
        self.dead_letters = 0
        self._unacked: list[tuple[Any, Letter]] = []  # (send future, what was sent)

    def accept(self, fetched: Fetched) -> Chunk:
        """A fetched chunk for the buffer; its rejects are sent to the DLQ."""
        for reject in fetched.rejects:
            self._dead_letter(fetched.partition, int(fetched.offsets[reject.index]), reject)
        self.metrics.consumed.inc(len(fetched.offsets))
        return Chunk(fetched.partition, fetched.offsets, fetched.record_ts_ms, fetched.valid,
                     fetched.events)

    def _dead_letter(self, partition: int, offset: int, reject: Reject) -> None:
        kind = reason_kind(reject.reason)  # a bounded label: REJECT_KINDS
        headers = [("reason", reject.reason.encode()), ("reason.kind", kind.encode()),
                   ("source.topic", self.topic.encode()),
                   ("source.partition", str(partition).encode()),
                   ("source.offset", str(offset).encode())]
        value = reject.value
        if value is not None and len(value) > self.max_bytes:
            value = value[: self.max_bytes]  # keep the head: the DLQ must accept the record
            headers.append(("truncated", b"true"))
        self._send((reject.key, value, headers))
        self.metrics.rejected.labels(kind).inc()
        self.dead_letters += 1

    def _send(self, letter: Letter) -> None:
        key, value, headers = letter
        future = self.dlq.send(self.dlq_topic, key=key, value=value, headers=headers)
        self._unacked.append((future, letter))

    def flush(self, timeout_s: float = 30.0, attempts: int = 3) -> None:
        """Wait until every dead letter sent so far is acknowledged, re-sending failures;
        raises ``DeadLetterError`` if some still fail (their offsets must not be committed).
        """
        for _ in range(attempts):
            self.dlq.flush(timeout=timeout_s)
            # Not acknowledged within the timeout counts as failed: a duplicate dead letter
            # is harmless, a lost one is not.
            failed = [letter for future, letter in self._unacked if not future.succeeded()]
            self._unacked = []
            for letter in failed:
                self._send(letter)
            if not self._unacked:
                return
        raise DeadLetterError(f"{len(self._unacked)} dead letters were not acknowledged by "
                              f"{self.dlq_topic}")

    def close(self) -> None:
        """Deliver the dead letters still in flight (briefly), then close the producer."""
        try:
            self.flush(timeout_s=5)
        finally:
            self.dlq.close(timeout=5)
