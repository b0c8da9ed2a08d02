"""The replayer: a data set's events into the topic, once each, in time order, paced."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events, parse_day
from common.data.synthetic import SyntheticConfig, generate
from common.data.wire import InvalidEventError, decode_event, encode_event
from common.infra.kafka_clients import make_consumer
from common.infra.settings import Settings, load_settings
from recstream.cli import EXIT_USAGE, main
from stream.replayer import check_events, encode_values, replay

START = "2024-01-01"
DAY0 = parse_day(START)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    """Three days of clicks from 2024-01-01, 300 a day."""
    return generate(SyntheticConfig(n_users=60, n_items=40, n_clusters=4, n_days=3,
                                    events_per_day=300, start_day=START)).dataset


def _settings(tmp_path: Path, bootstrap: str, topic: str) -> Settings:
    return load_settings({"RECSTREAM_HOME": str(tmp_path), "RECSTREAM_KAFKA_BOOTSTRAP": bootstrap,
                          "RECSTREAM_KAFKA_TOPIC": topic})


def _consume(settings: Settings, topic: str, expected: int,
             timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of the topic, read until ``expected`` arrived, checked to be all there is.

    Counted by consuming: ListOffsets is wrong on the embedded broker (ARCHITECTURE)."""
    consumer = make_consumer(settings.kafka, settings.kafka.bootstrap, None)
    try:
        deadline = time.monotonic() + timeout_s
        while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100)
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        records: list[ConsumerRecord] = []
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        # Nothing beyond what we read: each partition's position has reached its high water.
        assert all(consumer.highwater(tp) in (None, consumer.position(tp)) for tp in parts)
        return records
    finally:
        consumer.close()


def _replayed(tmp_path: Path, kafka_bootstrap: str, topic: str, dataset: Dataset,
              start_ms: int | None, end_ms: int | None,
              speed: float = 0.0) -> tuple[Events, list[ConsumerRecord]]:
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    stats = replay(settings, dataset, start_ms, end_ms, speed, progress=False)
    expected = dataset.events.between(start_ms, end_ms)
    assert stats.events == len(expected) and stats.topic == topic
    return expected, _consume(settings, topic, len(expected))


def test_every_event_arrives_once_keyed_by_user(tmp_path: Path, kafka_bootstrap: str,
                                                topic: str, dataset: Dataset) -> None:
    expected, records = _replayed(tmp_path, kafka_bootstrap, topic, dataset, None, None)
    by_id = {r["event_id"]: r for r in expected.to_records()}
    decoded = [decode_event(r.value) for r in records]
    assert sorted(e.event_id for e in decoded) == sorted(by_id)
    for record, event in zip(records, decoded, strict=True):
        assert record.key == event.user_id.encode()
        assert event.to_dict() == by_id[event.event_id]


def test_partition_order_is_time_order(tmp_path: Path, kafka_bootstrap: str, topic: str,
                                       dataset: Dataset) -> None:
    _, records = _replayed(tmp_path, kafka_bootstrap, topic, dataset, None, None)
    partition_of_user: dict[bytes, int] = {}
    stamps: dict[int, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        assert partition_of_user.setdefault(r.key, r.partition) == r.partition
        stamps.setdefault(r.partition, []).append(decode_event(r.value).ts_ms)
    assert len(stamps) > 1
    assert all(s == sorted(s) for s in stamps.values())


def test_kafka_timestamp_is_the_send_time(tmp_path: Path, kafka_bootstrap: str, topic: str,
                                          dataset: Dataset) -> None:
    before_ms = int(time.time() * 1000)
    _, records = _replayed(tmp_path, kafka_bootstrap, topic, dataset, DAY0, DAY0 + DAY_MS)
    after_ms = int(time.time() * 1000)
    assert all(r.timestamp_type == 0 for r in records)  # CreateTime, set by the producer
    assert all(before_ms <= r.timestamp <= after_ms for r in records)


def test_from_to_selects_whole_days(tmp_path: Path, kafka_bootstrap: str, topic: str,
                                    dataset: Dataset) -> None:
    start, end = DAY0 + DAY_MS, DAY0 + 2 * DAY_MS
    expected, records = _replayed(tmp_path, kafka_bootstrap, topic, dataset, start, end)
    stamps = [decode_event(r.value).ts_ms for r in records]
    assert len(records) == len(expected) == 300
    assert all(start <= ts < end for ts in stamps)


def test_speed_replays_event_gaps_that_many_times_faster(tmp_path: Path, kafka_bootstrap: str,
                                                         topic: str, dataset: Dataset) -> None:
    # 9 events 500 ms apart in event time: 4 s of data, 1 s at speed 4.
    n, gap_ms, speed = 9, 500, 4.0
    events = dataset.events.take(np.arange(n))
    events = dataclasses.replace(events, ts_ms=DAY0 + gap_ms * np.arange(n, dtype=np.int64))
    paced = dataclasses.replace(dataset, events=events)
    span_s = (n - 1) * gap_ms / 1000 / speed
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    stats = replay(settings, paced, None, None, speed, progress=False)
    assert stats.seconds >= 0.8 * span_s
    sent = sorted(r.timestamp for r in _consume(settings, topic, n))
    assert sent[-1] - sent[0] >= 0.8 * span_s * 1000


def test_limit_caps_the_replay(tmp_path: Path, kafka_bootstrap: str, topic: str,
                               dataset: Dataset) -> None:
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    stats = replay(settings, dataset, None, None, 0.0, progress=False, limit=25)
    assert stats.events == 25
    assert stats.first_ts_ms == int(dataset.events.ts_ms[0])
    assert stats.last_ts_ms == int(dataset.events.ts_ms[24])


def test_a_bad_event_fails_the_replay_before_anything_is_sent(tmp_path: Path,
                                                              kafka_bootstrap: str, topic: str,
                                                              dataset: Dataset) -> None:
    ts = dataset.events.ts_ms.copy()
    ts[100] //= 1000  # seconds where milliseconds belong
    broken = dataclasses.replace(dataset, events=dataclasses.replace(dataset.events, ts_ms=ts))
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    with pytest.raises(InvalidEventError, match="ts_ms is outside 1990..2100"):
        replay(settings, broken, None, None, 0.0, progress=False)


def test_encoding_matches_encode_event_byte_for_byte() -> None:
    events = Events.from_records([
        {"event_id": "e1", "user_id": 'u"quoted\\', "item_id": "çafé-☕", "event_type": "click",
         "value": None, "ts_ms": DAY0},
        {"event_id": "e2", "user_id": "u2", "item_id": "i\n2", "event_type": "rating",
         "value": 3.5, "ts_ms": DAY0 + 1},
        {"event_id": "e3", "user_id": "u2", "item_id": "i3", "event_type": "impression",
         "value": 0.1, "ts_ms": DAY0 + 2},
    ])
    check_events(events)
    assert encode_values(events) == [encode_event(r) for r in events.to_records()]


@pytest.mark.parametrize("column, bad, reason", [
    ("user_id", "", "user_id must be a string"),
    ("item_id", "x" * 257, "item_id must be a string"),
    ("event_type", "purchase", "unknown event_type: purchase"),
    ("value", np.inf, "value must be a finite number"),
])
def test_check_events_names_the_first_bad_event(column: str, bad: object, reason: str,
                                                dataset: Dataset) -> None:
    events = dataset.events.take(np.arange(10))
    values = getattr(events, column).copy()
    values[7] = bad
    with pytest.raises(InvalidEventError, match=f"event 7 .*{reason}"):
        check_events(dataclasses.replace(events, **{column: values}))


def test_cli_replays_a_day_and_prints_stats(tmp_path: Path, kafka_bootstrap: str, topic: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("RECSTREAM_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("RECSTREAM_KAFKA_TOPIC", topic)
    # The CLI's synthetic set is the default config: 5,000 clicks a day from 2024-01-01.
    code = main(["replay", "--dataset", "synthetic", "--from", "2024-01-02", "--to", "2024-01-03"])
    stats = json.loads(capsys.readouterr().out)
    assert code == 0
    assert stats["events"] == 5000 and stats["topic"] == topic
    assert parse_day("2024-01-02") <= stats["first_ts_ms"] <= stats["last_ts_ms"] \
        < parse_day("2024-01-03")
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    assert len(_consume(settings, topic, 5000)) == 5000


@pytest.mark.parametrize("args, expected", [
    (["--speed", "fast"], "expected a number or 'max'"),
    (["--speed=-1"], "expected a speed >= 0"),
])
def test_cli_bad_speed_is_one_line_and_exit_2(args: list[str], expected: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--dataset", "synthetic", *args])
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_USAGE
    assert expected in err and len(err.strip().splitlines()) == 1
