"""The lander: archive the event topic to daily Parquet partitions, each event exactly once.

Consumer group ``lander`` reads the topic, buffers valid events by UTC day and, every
``lander_flush_s`` seconds or ``lander_max_rows`` rows, writes one file per (day,
partition) under ``events/date=YYYY-MM-DD/`` (``stream.parts``); only when all files of
a flush are durable does it commit the offsets they cover.

Exactly once after any crash: a re-read record whose offset lies in a landed file of
its day and partition is skipped (the crash came after the rename, before the
commit), and an event_id already landed or buffered for its day is dropped as a
duplicate (producers retry). Invalid records are counted and skipped here; the
trainer is the consumer that dead-letters them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.data.landed import landed_watermark_ms, remove_stale_temps
from common.data.wire import InvalidEventError, decode_event
from common.infra.kafka_clients import bootstrap_servers, ensure_topics, make_consumer, record_lag
from common.infra.settings import Settings
from common.infra.settings_groups import KafkaSettings, StreamSettings
from common.infra.shutdown import StopFlag
from common.infra.telemetry import Heartbeat, serve_metrics
from stream.parts import Parts, Row, Taken

log = logging.getLogger(__name__)

_LAG_EVERY_S = 1.0
_STALE_TEMP_S = 3600.0  # a temp file this old belongs to a write that died


@dataclass
class LanderStats:
    """What one run of the lander did."""

    events: int = 0
    rejected: int = 0
    duplicates: int = 0
    already_landed: int = 0
    files: int = 0
    commits: int = 0
    watermark_ms: int = 0


class LanderMetrics:
    """The lander's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.events = Counter("recstream_lander_events", "Events landed in Parquet files",
                              registry=r)
        self.rejected = Counter("recstream_lander_rejected",
                                "Invalid records skipped (the trainer dead-letters them)",
                                registry=r)
        self.duplicates = Counter("recstream_lander_duplicates",
                                  "Events dropped: event_id already landed or buffered for "
                                  "its day", registry=r)
        self.already_landed = Counter("recstream_lander_already_landed",
                                      "Records re-read after a crash whose file had landed",
                                      registry=r)
        self.files = Counter("recstream_lander_files_written", "Parquet files written",
                             registry=r)
        self.flush_seconds = Histogram("recstream_lander_flush_seconds",
                                       "Time to write a flush's files and commit", registry=r)
        self.watermark = Gauge("recstream_lander_watermark_timestamp_seconds",
                               "Newest event time landed (UTC seconds since the epoch)",
                               registry=r)
        self.lag = Gauge("recstream_lander_lag_records",
                         "Records not yet read: highwater - position", ["partition"], registry=r)


class Lander:
    """Consumer group ``lander``: poll, buffer by day, write files, then commit."""

    def __init__(self, kafka: KafkaSettings, stream: StreamSettings, events_dir: Path,
                 bootstrap: str, metrics: LanderMetrics | None = None) -> None:
        self.kafka, self.stream, self.events_dir = kafka, stream, events_dir
        self.metrics = metrics or LanderMetrics()
        self.stats = LanderStats()
        self._pending: dict[TopicPartition, int] = {}  # next offset to commit per partition
        self.parts = Parts(events_dir)
        removed = remove_stale_temps(self.events_dir, _STALE_TEMP_S)
        if removed:
            log.info("removed temporary files of interrupted writes", extra={"files": removed})
        # The watermark survives restarts: a restarted lander reports what is on disk.
        self.stats.watermark_ms = landed_watermark_ms(self.events_dir) or 0
        self.metrics.watermark.set(self.stats.watermark_ms / 1000)
        self._assigned_at: float | None = None
        self._last_record = time.monotonic()
        self._lag_at = 0.0
        # Silent longer than the group's poll limit plus a flush: stuck (its /healthz).
        self.heartbeat = Heartbeat(kafka.max_poll_interval_ms / 1000 + 30.0)
        self.consumer: KafkaConsumer = make_consumer(kafka, bootstrap, stream.lander_group)
        self.consumer.subscribe([kafka.topic], listener=_Rebalance(self))

    @classmethod
    def from_settings(cls, settings: Settings, bootstrap: str,
                      metrics: LanderMetrics | None = None) -> Lander:
        """A lander with ``settings``' groups, landing under ``settings.events_dir``."""
        return cls(settings.kafka, settings.stream, settings.events_dir, bootstrap, metrics)

    @property
    def buffered(self) -> int:
        """Rows waiting for the next flush."""
        return self.parts.rows

    def run(self, stop: StopFlag, max_idle_s: float | None = None) -> LanderStats:
        """Land until ``stop`` is set (or ``max_idle_s`` pass without a record), then flush."""
        flush_s, max_rows = self.stream.lander_flush_s, self.stream.lander_max_rows
        next_flush = time.monotonic() + flush_s
        try:
            while not stop.is_set() and not self._idle(max_idle_s):
                self.poll_once()
                if self.parts.rows >= max_rows or time.monotonic() >= next_flush:
                    self.flush()
                    next_flush = time.monotonic() + flush_s
            self.flush()
        except BaseException:
            # Nothing buffered is committed: restarting re-reads it, so drop it rather
            # than let the close-time revoke write and commit after a failure.
            self.abandon()
            raise
        finally:
            self.consumer.close(autocommit=False)
        return self.stats

    def poll_once(self) -> int:
        """Poll once and classify what came; returns how many records were read."""
        self.heartbeat.beat()
        batches = self.consumer.poll(timeout_ms=self.stream.poll_timeout_ms)
        n = 0
        for tp, records in batches.items():
            for record in records:
                self._take(tp, record.offset, record.value)
            n += len(records)
        if n:
            self._last_record = time.monotonic()
        if time.monotonic() - self._lag_at >= _LAG_EVERY_S:
            self._update_lag()
        return n

    def _take(self, tp: TopicPartition, offset: int, value: bytes | None) -> None:
        """Reject, skip as landed, drop as duplicate, or buffer one record."""
        self._pending[tp] = offset + 1  # every record read is settled by the next flush
        try:
            event = decode_event(value, self.kafka.max_message_bytes)
        except InvalidEventError as exc:
            self._reject(tp, offset, exc.reason)
            return
        taken = self.parts.add(tp.partition, offset, event)
        if taken is Taken.ALREADY_LANDED:
            self.stats.already_landed += 1
            self.metrics.already_landed.inc()
        elif taken is Taken.DUPLICATE:
            self.stats.duplicates += 1
            self.metrics.duplicates.inc()

    def _reject(self, tp: TopicPartition, offset: int, reason: str) -> None:
        if not self.stats.rejected:
            log.warning("skipping invalid records (the trainer dead-letters them)",
                        extra={"partition": tp.partition, "offset": offset, "reason": reason})
        self.stats.rejected += 1
        self.metrics.rejected.inc()

    def flush(self) -> None:
        """Write the buffer, one file per (day, partition), then commit what it covered."""
        if not self._pending:
            return
        start = time.monotonic()
        offsets = self.write_pending()
        # The invariant: these offsets are committed only now, after every file is durable.
        try:
            self.consumer.commit(offsets)
            self.stats.commits += 1
            log.info("committed", extra={"offsets": _shown(offsets)})
        except KafkaError as exc:
            # Not fatal: the records are re-read later and skipped as already landed.
            log.warning("offset commit failed", extra={"error": str(exc)})
        self.metrics.flush_seconds.observe(time.monotonic() - start)

    def write_pending(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Write every buffered (day, partition) durably; returns the offsets to commit."""
        self.parts.write(self._count_landed)
        offsets = {tp: OffsetAndMetadata(n, "", -1) for tp, n in self._pending.items()}
        self._pending.clear()
        return offsets

    def _count_landed(self, rows: list[Row]) -> None:
        self.stats.files += 1
        self.stats.events += len(rows)
        self.stats.watermark_ms = max(self.stats.watermark_ms, max(e.ts_ms for e, _ in rows))
        self.metrics.files.inc()
        self.metrics.events.inc(len(rows))
        self.metrics.watermark.set(self.stats.watermark_ms / 1000)

    def abandon(self) -> None:
        """Drop the buffer without writing or committing (its records will be re-read)."""
        self.parts.drop()
        self._pending.clear()

    def on_assigned(self) -> None:
        """Partitions moved: learn what other landers landed meanwhile."""
        self.parts.rescan()
        self.metrics.lag.clear()
        self._assigned_at = self._last_record = time.monotonic()

    def _idle(self, max_idle_s: float | None) -> bool:
        # Idle time counts from the first assignment, so a slow group join is not idleness.
        return (max_idle_s is not None and self._assigned_at is not None
                and time.monotonic() - self._last_record > max_idle_s)

    def _update_lag(self) -> None:
        self._lag_at = time.monotonic()
        record_lag(self.consumer, self.metrics.lag)


def _shown(offsets: dict[TopicPartition, OffsetAndMetadata]) -> dict[int, int]:
    return {tp.partition: meta.offset for tp, meta in offsets.items()}


class _Rebalance(AsyncConsumerRebalanceListener):
    """Flush and commit before partitions move, so their next owner starts after them.

    Async because kafka-python runs listeners on its IO thread, where a blocking
    ``commit()`` is refused; the main thread is blocked in ``poll()``/``close()``
    meanwhile, so the lander's state has one user at a time.
    """

    def __init__(self, lander: Lander) -> None:
        self._lander = lander

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        offsets = self._lander.write_pending()
        if not offsets:
            return
        try:
            await self._lander.consumer.commit_async(offsets)
            self._lander.stats.commits += 1
            log.info("committed on revoke", extra={"offsets": _shown(offsets)})
        except KafkaError as exc:
            log.warning("offset commit on revoke failed", extra={"error": str(exc)})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._lander.on_assigned()

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        # Evicted: another lander owns these now and re-reads from the last commit.
        self._lander.abandon()


def run_lander_daemon(settings: Settings, stop: StopFlag | None = None,
                      max_idle_s: float | None = None) -> LanderStats:
    """Run the lander until SIGTERM/SIGINT (or ``stop``, or ``max_idle_s`` without records)."""
    stop = StopFlag.for_daemon(stop)
    metrics = LanderMetrics()
    with serve_metrics(metrics.registry, settings.stream.metrics_host,
                       settings.stream.lander_metrics_port) as endpoint:
        bootstrap = bootstrap_servers(settings)
        ensure_topics(settings.kafka, bootstrap, [settings.kafka.topic])
        log.info("lander starting", extra={"topic": settings.kafka.topic,
                                           "group": settings.stream.lander_group})
        lander = Lander.from_settings(settings, bootstrap, metrics)
        endpoint.health = lander.heartbeat.check
        stats = lander.run(stop, max_idle_s)
    log.info("lander stopped", extra={"reason": stop.reason or "idle", **vars(stats)})
    return stats
