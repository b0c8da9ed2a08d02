"""From Kafka records to validated events; rejects go to the dead-letter topic.

A dead letter keeps the original bytes and key, with headers naming the reason and
where it came from, so it can be inspected and replayed. Dead letters are flushed
before the offsets that cover them are committed (``flush``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kafka import KafkaProducer

from common.wire import InvalidEventError, WireEvent, decode_event
from stream.metrics import TrainerMetrics


class Entry(NamedTuple):
    """One consumed record: its event (None if dead-lettered) and where it was read."""

    event: WireEvent | None
    partition: int
    offset: int
    record_ts_ms: int


Letter = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


class DeadLetterError(RuntimeError):
    """The dead-letter topic did not take some rejected records."""


def reason_kind(reason: str) -> str:
    """A low-cardinality label for a reject reason (metrics must not explode)."""
    return reason.split(":")[0].split(" ")[0][:40] if reason else "unknown"


class Intake:
    """Decodes records and dead-letters the bad ones."""

    def __init__(self, dlq: KafkaProducer, dlq_topic: str, max_bytes: int,
                 metrics: TrainerMetrics) -> None:
        self.dlq, self.dlq_topic, self.max_bytes, self.metrics = dlq, dlq_topic, max_bytes, \
            metrics
        self.dead_letters = 0
        self._unacked: list[tuple[Any, Letter]] = []  # (send future, what was sent)

    def decode(self, records: list[Any]) -> list[Entry]:
        """Entries in record order; invalid records are sent to the DLQ with a reason."""
        out = []
        append, max_bytes = out.append, self.max_bytes
        for rec in records:
            try:
                event: WireEvent | None = decode_event(rec.value, max_bytes)
            except InvalidEventError as exc:
                self._dead_letter(rec, exc.reason)
                event = None
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the stream
                self._dead_letter(rec, f"internal: decoder raised {type(exc).__name__}")
                event = None
            append(Entry(event, rec.partition, rec.offset, rec.timestamp))
        self.metrics.consumed.inc(len(records))
        return out

    def _dead_letter(self, rec: Any, reason: str) -> None:
        headers = [("reason", reason.encode()), ("source.topic", rec.topic.encode()),
                   ("source.partition", str(rec.partition).encode()),
                   ("source.offset", str(rec.offset).encode())]
        value = rec.value
        if value is not None and len(value) > self.max_bytes:
            value = value[: self.max_bytes]  # keep the head: the DLQ must accept the record
            headers.append(("truncated", b"true"))
        self._send((rec.key, value, headers))
        self.metrics.rejected.labels(reason_kind(reason)).inc()
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
