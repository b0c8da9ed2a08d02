"""Replay a data set's events into the topic in time order, flat out or paced.

Each event becomes one record: key = user_id (UTF-8), value = the wire JSON of
``common.data.wire`` (byte for byte what ``encode_event`` writes), Kafka timestamp = the
wall-clock time it was handed to the producer, from which freshness is measured
downstream. The batch is validated once, vectorised, before anything is sent
(``common.data.wire_batch.check_events``), so the per-event path only formats JSON and sends it.

The producer is kafka-python's (``common.infra.kafka_clients.make_producer``), with big
uncompressed batches; its ``send`` costs ~35 µs of Python a record, so a flat-out replay
runs at ~26-29k events/s on two cores (300k events, embedded broker). Keys are hashed
with murmur2 as by the Java client, so a user lands on the same partition whoever
produced it; the hash is computed once per user, not once per record.

>>> from common.data.events import Events
>>> ev = Events.from_records([{"event_id": "e1", "user_id": "u1", "item_id": "i1",
...                            "event_type": "rating", "value": 4.0, "ts_ms": 1_700_000_000_000}])
>>> check_events(ev)
>>> encode_values(ev)[0][:38]
b'{"event_id":"e1","user_id":"u1","item_'
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.partitioner.default import DefaultPartitioner
from kafka.producer.future import FutureRecordMetadata
from tqdm import tqdm

from common.data.dataset import Dataset
from common.data.events import Events
from common.data.wire import InvalidEventError
from common.data.wire_batch import check_events, encode_values
from common.infra.kafka_clients import bootstrap_servers, ensure_topics, make_producer
from common.infra.settings import Settings
from common.infra.settings_groups import KafkaSettings

log = logging.getLogger(__name__)

CHUNK_EVENTS = 10_000  # encoded and sent per slice: bounded memory, a progress tick each
MAX_IN_FLIGHT = 100_000  # records sent but not yet acknowledged before send waits
MESSAGE_TIMEOUT_S = 60.0  # the producer gives up on a record (and reports it) after this
FLUSH_TIMEOUT_S = MESSAGE_TIMEOUT_S + 30.0
CLOSE_GRACE_S = 5.0  # after a failure or Ctrl-C: deliver what is queued, briefly
_PACE_SLACK_S = 0.001  # send up to this early rather than sleep for less
_PACE_TICK_S = 0.25  # sleep in short steps: Ctrl-C and delivery errors stay responsive
_LONG_GAP_S = 10.0
_MEMO_KEYS = 1_000_000  # distinct keys whose partition is remembered


class ReplayError(RuntimeError):
    """Events could not be delivered (broker unreachable, records rejected)."""


@dataclass(frozen=True)
class ReplayStats:
    """What one replay produced, printed as JSON by ``recstream replay``."""

    events: int
    seconds: float
    events_per_s: float
    first_ts_ms: int | None
    last_ts_ms: int | None
    topic: str


def replay(settings: Settings, dataset: Dataset, start_ms: int | None, end_ms: int | None,
           speed: float, topic: str | None = None, *, progress: bool = True,
           limit: int | None = None) -> ReplayStats:
    """Produce the events with ``start_ms <= ts_ms < end_ms`` in time order; ``speed`` 0 is
    as fast as possible, X > 0 replays event-time gaps X times faster than they happened."""
    if not (math.isfinite(speed) and speed >= 0):
        raise ValueError(f"speed must be a finite number >= 0, got {speed}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    topic = topic or settings.kafka.topic
    events = select_events(dataset.events, start_ms, end_ms, limit)
    check_events(events)  # all of it, before the first record goes out
    bootstrap = bootstrap_servers(settings)
    try:
        ensure_topics(settings.kafka, bootstrap, [topic])
    except KafkaError as exc:
        raise ReplayError(f"cannot create topic {topic!r} on {bootstrap}: {exc}") from exc
    started = time.monotonic()
    with EventProducer(settings.kafka, bootstrap, topic) as producer, \
            tqdm(total=len(events), unit="ev", unit_scale=True, desc=f"replay {topic}",
                 disable=None if progress else True) as bar:
        pacer = Pacer(speed, int(events.ts_ms[0])) if speed > 0 and len(events) else None
        for lo in range(0, len(events), CHUNK_EVENTS):
            chunk = events.take(np.arange(lo, min(lo + CHUNK_EVENTS, len(events))))
            producer.produce(chunk, pacer, checked=True)
            bar.update(len(chunk))
        producer.flush()
    seconds = time.monotonic() - started
    first, last = (int(events.ts_ms[0]), int(events.ts_ms[-1])) if len(events) else (None, None)
    return ReplayStats(len(events), round(seconds, 3),
                       round(len(events) / seconds, 1) if seconds > 0 else 0.0,
                       first, last, topic)


def select_events(events: Events, start_ms: int | None, end_ms: int | None,
                  limit: int | None = None) -> Events:
    """The events in ``[start_ms, end_ms)``, in time order, at most ``limit`` of them."""
    chosen = events.between(start_ms, end_ms)
    if len(chosen) > 1 and bool(np.any(np.diff(chosen.ts_ms) < 0)):
        chosen = chosen.sorted_by_time()
    if limit is not None and limit < len(chosen):
        chosen = chosen.take(np.arange(limit))
    return chosen


class Pacer:
    """Holds events back so that event time passes ``speed`` times faster than wall time,
    measured from the first event; it only ever sleeps when the replay is ahead."""

    def __init__(self, speed: float, first_ts_ms: int) -> None:
        self._event_ms_per_s = 1000.0 * speed
        self._ts0 = first_ts_ms
        self._t0 = time.monotonic()
        self.released_ts = first_ts_ms  # events up to this event time may go now

    def wait(self, ts_ms: int, idle: Callable[[float], None] = time.sleep) -> None:
        """Return once an event at ``ts_ms`` is due, calling ``idle(seconds)`` to wait."""
        due = self._t0 + (ts_ms - self._ts0) / self._event_ms_per_s
        left = due - time.monotonic()
        if left > _LONG_GAP_S:
            # A quiet stretch in the data replays as quiet time; say so, or it looks hung.
            log.info("pacing: next event in %.0f s (event time %d)", left, ts_ms)
        while left > _PACE_SLACK_S:
            idle(min(left, _PACE_TICK_S))
            left = due - time.monotonic()
        now_ts = self._ts0 + int((time.monotonic() - self._t0) * self._event_ms_per_s)
        self.released_ts = max(ts_ms, now_ts)


class EventProducer:
    """Produces ``Events`` batches into one topic per the wire contract (see module doc).

    Delivery is asynchronous; failures are counted as the broker reports them and raised
    as ``ReplayError`` by the next ``produce`` or by ``flush``.
    """

    def __init__(self, ks: KafkaSettings, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._max_bytes = ks.max_message_bytes
        self._failed = 0
        self._first_error: str | None = None
        self._in_flight: deque[list[FutureRecordMetadata]] = deque()
        self._in_flight_records = 0
        self._acked: dict[int, int] = {}
        self._producer = make_producer(ks, bootstrap, **producer_overrides())

    def produce(self, events: Events, pacer: Pacer | None = None, *,
                checked: bool = False) -> None:
        """Send a time-ordered batch (validated unless ``checked``); ``pacer`` holds each
        event back until it is due."""
        if not checked:
            check_events(events)
        for lo in range(0, len(events), CHUNK_EVENTS):
            part = events if len(events) <= CHUNK_EVENTS else \
                events.take(np.arange(lo, min(lo + CHUNK_EVENTS, len(events))))
            self._send_slice(part, pacer)
            self._raise_if_failed()

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every sent record is acknowledged; raise if any was not."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaTimeoutError as exc:
            self._raise_if_failed()
            raise ReplayError(f"records to {self.topic!r} still undelivered after "
                              f"{timeout_s:.0f} s: is the broker at {self._bootstrap} up?"
                              ) from exc
        self._in_flight.clear()
        self._in_flight_records = 0
        self._raise_if_failed()

    def close(self) -> None:
        """Deliver what is queued within a short grace, drop the rest."""
        self._producer.close(timeout=CLOSE_GRACE_S)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _send_slice(self, events: Events, pacer: Pacer | None) -> None:
        values = encode_values(events)
        self._check_sizes(events, values)
        send, topic, now, on_error, on_sent = self._producer.send, self.topic, time.time, \
            self._on_error, self._on_sent
        futures: list[FutureRecordMetadata] = []
        add = futures.append
        try:
            for key, value, ts in zip(_keys(events.user_id), values, events.ts_ms.tolist(),
                                      strict=True):
                if pacer is not None and ts > pacer.released_ts:
                    pacer.wait(ts, self._idle)
                future = send(topic, value=value, key=key, timestamp_ms=int(now() * 1000))
                future.add_callback(on_sent)
                future.add_errback(on_error)
                add(future)
        except KafkaError as exc:
            raise ReplayError(f"producing to {topic!r} on {self._bootstrap} failed: {exc}"
                              ) from exc
        finally:
            self._in_flight.append(futures)
            self._in_flight_records += len(futures)
        self._bound_in_flight(MAX_IN_FLIGHT)

    def _bound_in_flight(self, limit: int) -> None:
        """Wait for the oldest slices until at most ``limit`` records are unacknowledged:
        kafka-python's queue is unbounded, so the replay supplies the backpressure."""
        while self._in_flight_records > limit:
            oldest = self._in_flight.popleft()
            self._in_flight_records -= len(oldest)
            for future in oldest:
                if not future.is_done:
                    # A failure is counted by the errback and raised by _raise_if_failed.
                    with contextlib.suppress(KafkaError):
                        future.get(timeout=FLUSH_TIMEOUT_S)

    def _idle(self, seconds: float) -> None:
        self._raise_if_failed()
        time.sleep(seconds)

    def _on_sent(self, meta: Any) -> None:
        # Runs on the producer's IO thread; only that thread writes this dict.
        if meta.offset >= self._acked.get(meta.partition, 0):
            self._acked[meta.partition] = meta.offset + 1

    def acked_offsets(self) -> dict[int, int]:
        """Per partition, the offset after the last record the broker acknowledged (after
        ``flush``: everything sent). The broker's own end offsets can lag (ARCHITECTURE)."""
        return dict(self._acked)

    def _on_error(self, exc: BaseException) -> None:
        # Runs on the producer's IO thread; only that thread writes these fields.
        self._failed += 1
        self._first_error = self._first_error or str(exc) or type(exc).__name__

    def _raise_if_failed(self) -> None:
        if self._failed:
            raise ReplayError(f"{self._failed} records were not delivered to {self.topic!r} "
                              f"on {self._bootstrap}: {self._first_error}")

    def _check_sizes(self, events: Events, values: list[bytes]) -> None:
        sizes = np.fromiter(map(len, values), np.int64, len(values))
        too_big = np.flatnonzero(sizes > self._max_bytes)
        if len(too_big):
            row = int(too_big[0])
            raise InvalidEventError(f"event {events.event_id[row]!r} encodes to {sizes[row]} "
                                    f"bytes, over RECSTREAM_KAFKA_MAX_MESSAGE_BYTES="
                                    f"{self._max_bytes}")


def producer_overrides() -> dict[str, Any]:
    """``make_producer`` settings for a bulk replay: big uncompressed batches, a bounded
    delivery time, and the key hash remembered per user."""
    return {"batch_size": 1 << 20, "linger_ms": 10, "compression_type": None,
            "delivery_timeout_ms": int(MESSAGE_TIMEOUT_S * 1000),
            "partitioner": KeyPartitioner()}


class KeyPartitioner(DefaultPartitioner):
    """``DefaultPartitioner`` (murmur2 of the key, as the Java client) remembering each
    key's partition: kafka-python hashes in pure Python, ~2.5 µs a record."""

    def __init__(self) -> None:
        self._memo: dict[str, tuple[int, dict[bytes, int]]] = {}  # topic: (partitions, memo)

    def partition(self, topic: str, key: Any, serialized_key: bytes | None, value: Any,
                  serialized_value: bytes | None, cluster: Any) -> int:
        n = len(cluster.partitions_for_topic(topic) or ())
        known = self._memo.get(topic)
        if known is None or known[0] != n or len(known[1]) >= _MEMO_KEYS:
            known = self._memo[topic] = (n, {})  # partitions were added: keys move, as in Java
        found = known[1].get(serialized_key) if serialized_key is not None else None
        if found is None:
            found = super().partition(topic, key, serialized_key, value, serialized_value,
                                      cluster)
            if serialized_key is not None:
                known[1][serialized_key] = found
        return found


def _keys(user_ids: np.ndarray) -> list[bytes]:
    """UTF-8 record keys, each distinct user encoded once."""
    values: list[str] = user_ids.tolist()
    memo = {u: u.encode() for u in set(values)}
    return [memo[u] for u in values]
