"""The lander against a real broker: daily Parquet partitions, each event exactly once."""

from __future__ import annotations

import collections
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer, TopicPartition

import stream.parts as parts_module
from common.data.events import DAY_MS, format_day, parse_day
from common.data.landed import (
    day_dir,
    landed_days,
    landed_offsets,
    landed_parts,
    landed_watermark_ms,
    read_landed_day,
)
from common.data.wire import decode_event, encode_event
from common.infra.kafka_clients import ensure_topics, make_consumer, make_producer
from common.infra.launcher import free_port, port_answers
from common.infra.settings import Settings, load_settings
from common.infra.shutdown import StopFlag
from stream.lander import Lander, LanderStats, run_lander_daemon
from stream.parts import write_part

REPO = Path(__file__).resolve().parents[1]
DAY0 = parse_day("2024-03-01")
# Short sessions: a group joins in ~1 s and a SIGKILLed member is gone after ~2 s.
QUICK = {"RECSTREAM_KAFKA_SESSION_TIMEOUT_MS": "2000",
         "RECSTREAM_KAFKA_HEARTBEAT_INTERVAL_MS": "300",
         "RECSTREAM_STREAM_LANDER_FLUSH_S": "0.2",
         "RECSTREAM_STREAM_LANDER_METRICS_PORT": "0"}


class SimulatedCrash(Exception):
    """Raised by a test hook where the process would have died."""


def lander_env(home: Path, bootstrap: str, topic: str, **extra: str) -> dict[str, str]:
    return {"RECSTREAM_HOME": str(home), "RECSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "RECSTREAM_KAFKA_TOPIC": topic, "RECSTREAM_STREAM_LANDER_GROUP": f"lander-{topic}",
            **QUICK, **extra}


@pytest.fixture
def make_settings(tmp_path: Path, kafka_bootstrap: str, topic: str
                  ) -> Callable[..., Settings]:
    """Settings for a lander on this test's topic (created with 3 partitions by default)."""

    def build(partitions: int = 3, **extra: str) -> Settings:
        env = lander_env(tmp_path, kafka_bootstrap, topic,
                         RECSTREAM_KAFKA_PARTITIONS=str(partitions), **extra)
        settings = load_settings(env)
        ensure_topics(settings.kafka, kafka_bootstrap, [topic])
        return settings

    return build


def event(n: int, day: int = 0, user: str | None = None, **fields: Any) -> dict[str, Any]:
    """Event ``e{n}`` on day ``DAY0 + day``."""
    return {"event_id": f"e{n}", "user_id": user or f"u{n % 5}", "item_id": f"i{n % 11}",
            "event_type": "click", "ts_ms": DAY0 + day * DAY_MS + n * 1000, **fields}


def produce(settings: Settings, records: list[tuple[str, bytes | None]]) -> list[Any]:
    """Send (key, value) records, keyed by user as the contract says; returns their metadata."""
    producer = make_producer(settings.kafka, settings.kafka.bootstrap)
    try:
        futures = [producer.send(settings.kafka.topic, key=k.encode(), value=v)
                   for k, v in records]
        producer.flush()
        return [f.get(timeout=10) for f in futures]
    finally:
        producer.close()


def produce_events(settings: Settings, events: list[dict[str, Any]]) -> list[Any]:
    return produce(settings, [(e["user_id"], encode_event(e)) for e in events])


def landed_ids(events_dir: Path) -> list[str]:
    """Every event_id in every landed file, duplicates included (no reader dedup)."""
    return [i for p in landed_parts(events_dir)
            for i in pq.read_table(p.path, columns=["event_id"]).column(0).to_pylist()]


def landed_rows(events_dir: Path) -> int:
    return sum(pq.read_metadata(p.path).num_rows for p in landed_parts(events_dir))


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def committed(settings: Settings, partitions: int) -> dict[int, int | None]:
    """The lander group's committed offsets, read by a consumer that does not join it."""
    consumer: KafkaConsumer = make_consumer(settings.kafka, settings.kafka.bootstrap,
                                            settings.stream.lander_group)
    try:
        return {p: consumer.committed(TopicPartition(settings.kafka.topic, p))
                for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


@contextmanager
def background(settings: Settings) -> Iterator[Lander]:
    """A lander running on a thread; stopped (and its error raised) on exit."""
    lander = Lander.from_settings(settings, settings.kafka.bootstrap)
    stop, errors = StopFlag(), []

    def run() -> None:
        try:
            lander.run(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield lander
    finally:
        stop.set("test")
        thread.join(30)
    assert not thread.is_alive(), "lander did not stop"
    if errors:
        raise errors[0]


def land_until_idle(settings: Settings) -> LanderStats:
    return run_lander_daemon(settings, StopFlag(), max_idle_s=1.0)


def test_reader_keeps_the_first_of_each_event_id_and_ignores_temp_files(tmp_path: Path
                                                                         ) -> None:
    day = format_day(DAY0)
    e = [decode_event(encode_event(event(n))) for n in range(3)]
    retried = decode_event(encode_event(event(1, item_id="other")))
    write_part(tmp_path, day, 0, [(e[2], 0), (e[1], 1)])
    write_part(tmp_path, day, 1, [(retried, 5), (e[0], 6)])
    (day_dir(tmp_path, day) / ".part-p2-o000000000000-000000000009.parquet.x.tmp").touch()

    got = read_landed_day(tmp_path, day)

    assert got.event_id.tolist() == ["e0", "e1", "e2"]
    assert got.item_id.tolist() == [e[0].item_id, e[1].item_id, e[2].item_id]
    assert landed_offsets(tmp_path) == {0: 1, 1: 6}
    assert landed_watermark_ms(tmp_path) == e[2].ts_ms
    with pytest.raises(FileNotFoundError, match="no landed events"):
        read_landed_day(tmp_path, format_day(DAY0 + DAY_MS))


def test_a_starting_lander_removes_temp_files_of_writes_that_died(make_settings) -> None:
    """A lander killed mid-write leaves a dot-temp file; the next one removes it once it
    is old enough to belong to no live write (another lander may be writing now)."""
    settings = make_settings()
    day = format_day(DAY0)
    landed = write_part(settings.events_dir, day, 0,
                        [(decode_event(encode_event(event(0))), 0)])
    stale = day_dir(settings.events_dir, day) / ".part-p1-o000000000000-000000000009.parquet.a.tmp"
    live = day_dir(settings.events_dir, day) / ".part-p2-o000000000000-000000000009.parquet.b.tmp"
    for tmp in (stale, live):
        tmp.write_bytes(b"half a parquet file")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    Lander.from_settings(settings, settings.kafka.bootstrap).consumer.close(autocommit=False)
    assert not stale.exists()
    assert live.exists() and landed.exists()


def test_events_spanning_days_land_once_in_their_date_partitions(make_settings) -> None:
    settings = make_settings()
    events = [event(n, day=n % 3) for n in range(60)]
    events += [event(n, day=1, event_type="rating", value=4.5) for n in range(60, 66)]
    produce_events(settings, events)

    stats = land_until_idle(settings)

    days = [format_day(DAY0 + d * DAY_MS) for d in range(3)]
    assert landed_days(settings.events_dir) == days
    assert stats.events == 66 and sorted(landed_ids(settings.events_dir)) == sorted(
        e["event_id"] for e in events)
    for d, day in enumerate(days):
        got = read_landed_day(settings.events_dir, day)
        want = sorted((e for e in events if (e["ts_ms"] - DAY0) // DAY_MS == d),
                      key=lambda e: e["ts_ms"])
        assert got.event_id.tolist() == [e["event_id"] for e in want]
        assert np.isnan(got.value).sum() == sum(e["event_type"] == "click" for e in want)
    for part in landed_parts(settings.events_dir):
        offsets = pq.read_table(part.path, columns=["kafka_offset"]).column(0).to_pylist()
        assert (offsets[0], offsets[-1]) == (part.first_offset, part.last_offset)
    assert stats.watermark_ms == max(e["ts_ms"] for e in events)


def test_duplicate_event_ids_land_once(make_settings) -> None:
    settings = make_settings()
    first = [event(n, day=n % 2) for n in range(20)]
    produce_events(settings, first + first)  # a producer retry sends everything twice

    assert land_until_idle(settings).duplicates == 20

    # A later run meets the same ids again: they are found in the landed files.
    later = [event(n, day=n % 2) for n in range(20, 30)]
    produce_events(settings, first[:10] + later)
    stats = land_until_idle(settings)

    assert (stats.events, stats.duplicates) == (10, 10)
    assert sorted(landed_ids(settings.events_dir)) == sorted(
        e["event_id"] for e in first + later)


def test_malformed_records_are_skipped_and_counted(make_settings) -> None:
    settings = make_settings(partitions=1)
    good = [encode_event(event(n)) for n in range(4)]
    bad: list[bytes | None] = [b"not json", b'{"event_id": "x"}', None, b"[" * 70_000]
    values = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[3], bad[0]]
    sent = produce(settings, [("u1", v) for v in values])

    with background(settings) as lander:
        wait_until(lambda: lander.stats.rejected == 5 and lander.stats.commits >= 1, 20,
                   "every record read and a flush committed")

    assert committed(settings, 1) == {0: sent[-1].offset + 1}  # past the malformed last one
    assert lander.metrics.registry.get_sample_value("recstream_lander_rejected_total") == 5
    assert sorted(landed_ids(settings.events_dir)) == [f"e{n}" for n in range(4)]


def test_offsets_are_committed_only_after_their_files_are_durable(make_settings,
                                                                  monkeypatch) -> None:
    settings = make_settings()
    duplicates: dict[int, set[int]] = collections.defaultdict(set)
    real_commit = KafkaConsumer.commit

    def checking_commit(self: KafkaConsumer, offsets: dict, **kw: Any) -> None:
        # At commit time every valid record below the committed offset is on disk.
        on_disk = collections.defaultdict(set)
        for part in landed_parts(settings.events_dir):
            offsets_in_file = pq.read_table(part.path, columns=["kafka_offset"]).column(0)
            on_disk[part.partition].update(offsets_in_file.to_pylist())
        for tp, meta in offsets.items():
            assert set(range(meta.offset)) <= on_disk[tp.partition] | duplicates[tp.partition]
        real_commit(self, offsets, **kw)

    monkeypatch.setattr(KafkaConsumer, "commit", checking_commit)
    batch = [event(n, day=n % 2) for n in range(40)]
    for meta in produce_events(settings, batch + batch[:5])[40:]:
        duplicates[meta.partition].add(meta.offset)
    assert land_until_idle(settings).commits >= 1
    produce_events(settings, [event(n) for n in range(40, 60)])
    assert land_until_idle(settings).commits >= 1

    tops = landed_offsets(settings.events_dir)
    assert committed(settings, 3) == {p: tops[p] + 1 if p in tops else None for p in range(3)}


def test_crash_between_files_of_one_flush_loses_nothing(make_settings, monkeypatch) -> None:
    # One partition, days interleaved, one flush of two files: the crash lands day 0 only,
    # whose file holds offsets above some of day 1's.
    settings = make_settings(partitions=1, RECSTREAM_STREAM_LANDER_FLUSH_S="60",
                             RECSTREAM_STREAM_LANDER_MAX_ROWS="30")
    events = [event(n, day=n % 2, user="u1") for n in range(30)]
    produce_events(settings, events)
    real_write, calls = parts_module.write_part, []

    def crash_on_second_file(*args: Any) -> Path:
        calls.append(args)
        if len(calls) == 2:
            raise SimulatedCrash
        return real_write(*args)

    monkeypatch.setattr(parts_module, "write_part", crash_on_second_file)
    with pytest.raises(SimulatedCrash):
        land_until_idle(settings)
    assert len(landed_parts(settings.events_dir)) == 1
    assert committed(settings, 1) == {0: None}

    monkeypatch.setattr(parts_module, "write_part", real_write)
    stats = land_until_idle(settings)

    assert (stats.events, stats.already_landed) == (15, 15)
    assert sorted(landed_ids(settings.events_dir)) == sorted(e["event_id"] for e in events)


def test_restart_after_rename_before_commit_lands_nothing_twice(make_settings,
                                                                monkeypatch) -> None:
    settings = make_settings()
    events = [event(n, day=n % 3) for n in range(45)]
    produce_events(settings, events)
    monkeypatch.setattr(KafkaConsumer, "commit", lambda self, offsets, **kw: None)
    assert land_until_idle(settings).events == 45
    assert set(committed(settings, 3).values()) == {None}
    files = sorted(p.path.name for p in landed_parts(settings.events_dir))

    monkeypatch.undo()
    stats = land_until_idle(settings)

    assert (stats.events, stats.already_landed, stats.files) == (0, 45, 0)
    assert sorted(p.path.name for p in landed_parts(settings.events_dir)) == files
    assert sorted(landed_ids(settings.events_dir)) == sorted(e["event_id"] for e in events)


def test_rebalance_flushes_and_commits_before_partitions_move(make_settings) -> None:
    settings = make_settings(RECSTREAM_STREAM_LANDER_FLUSH_S="600")
    events = [event(n, day=n % 2) for n in range(30)]
    produce_events(settings, events)
    with background(settings) as first:
        wait_until(lambda: first.buffered == 30, 20, "the first lander to buffer everything")
        assert landed_parts(settings.events_dir) == []
        with background(settings):
            wait_until(lambda: first.stats.commits >= 1, 20, "the revoke-time flush")
            assert first.stats.events == 30
            assert sum(o or 0 for o in committed(settings, 3).values()) == 30
    assert sorted(landed_ids(settings.events_dir)) == sorted(e["event_id"] for e in events)


def test_metrics_endpoint_reports_progress_and_lag(make_settings) -> None:
    port = free_port()
    settings = make_settings(RECSTREAM_STREAM_LANDER_METRICS_PORT=str(port))
    events = [event(n) for n in range(12)]
    produce_events(settings, events)
    stop = StopFlag()
    thread = threading.Thread(target=run_lander_daemon, args=(settings, stop), daemon=True)
    thread.start()

    def page() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()

    try:
        wait_until(lambda: port_answers("127.0.0.1", port), 10, "the metrics endpoint")
        wait_until(lambda: "recstream_lander_events_total 12.0" in page()
                   and page().count("recstream_lander_lag_records{") == 3, 20,
                   "12 events landed and the lag of 3 partitions")
        text = page()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            health = (r.status, r.read())
    finally:
        stop.set("test")
        thread.join(30)
    assert health == (200, b"ok\n")
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
    watermark = float(samples["recstream_lander_watermark_timestamp_seconds"])
    assert watermark == max(e["ts_ms"] for e in events) / 1000
    assert all(f'recstream_lander_lag_records{{partition="{p}"}} 0.0' in text for p in range(3))
    assert "recstream_lander_files_written_total" in text
    assert "recstream_lander_flush_seconds_count" in text
