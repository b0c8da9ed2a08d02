"""Reject kinds: every reason the decoder (or a producer's check) gives has a kind of
``REJECT_KINDS``, read the same off the exception and off the reason's text, never the
fallback; the trainer counts and dead-letters rejects by that kind."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry
from streaming import stream_settings
from test_fuzz_wire import FEWER, near_valid_records, records
from test_wire import GOOD, _raw

import common.data.wire as wire
import common.data.wire_batch as wire_batch
from common.data.events import Events
from common.data.wire import (
    REJECT_KINDS,
    UNKNOWN_KIND,
    InvalidEventError,
    decode_event,
    reason_kind,
)
from common.data.wire_batch import check_events, decode_batch
from stream.fetcher import _decode
from stream.intake import Intake
from stream.metrics import TrainerMetrics
from stream.replayer import EventProducer

KNOWN = set(REJECT_KINDS) - {UNKNOWN_KIND}
REJECTED = "recstream_stream_events_rejected_total"


def _kind_of(raw: bytes | None, max_bytes: int | None = wire.DEFAULT_MAX_BYTES) -> str | None:
    """The kind of a rejected record, checked against its reason's; None if it decodes."""
    try:
        decode_event(raw, max_bytes)
    except InvalidEventError as exc:
        assert exc.kind in KNOWN, exc.reason
        assert reason_kind(exc.reason) == exc.kind, exc.reason
        return exc.kind
    return None


def test_kinds_are_bounded_label_values() -> None:
    assert all(re.fullmatch(r"[a-z]+(?:_[a-z]+)*", kind) for kind in REJECT_KINDS)
    assert UNKNOWN_KIND in REJECT_KINDS and reason_kind("") == UNKNOWN_KIND
    assert reason_kind("something new: 42") == UNKNOWN_KIND


def test_every_raise_in_the_wire_module_names_a_known_kind() -> None:
    """A reason added without a kind fails here, before any record finds it (the contract
    is two modules: one record, and whole batches)."""
    calls = [node for module in (wire, wire_batch)
             for node in ast.walk(ast.parse(inspect.getsource(module)))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None)
             in ("InvalidEventError", "_invalid")]
    assert len(calls) >= 20
    for call in calls:
        where = f"line {call.lineno}"
        n_args = 2 if call.func.id == "InvalidEventError" else 4  # type: ignore[attr-defined]
        keyword = [k.value for k in call.keywords if k.arg == "kind"]
        assert len(call.args) == n_args or keyword, f"{where}: no kind"
        kind = keyword[0] if keyword else call.args[-1]
        if isinstance(kind, ast.Constant):
            assert kind.value in KNOWN, where
        else:  # _invalid and check_events pass their kind on
            assert isinstance(kind, ast.Name) and kind.id == "kind", where


# Valid event ids that a reason quotes (as repr) in front of the check's own reason.
QUOTED_IDS = ["e7", "a): b", "it's", 'say "hi"', "both ' and \"", "back\\slash", "new\nline",
              "): ts_ms is outside 1990..2100 (milliseconds expected)"]


def _events(n: int = 3) -> Events:
    return Events.from_records([{**GOOD, "event_id": f"e{k}"} for k in range(n)])


@pytest.mark.parametrize("event_id", QUOTED_IDS)
@pytest.mark.parametrize("column, bad, kind", [
    ("user_id", "", "bad_id"),
    ("item_id", "x" * 257, "bad_id"),
    ("event_type", "purchase): value must be a finite number or null", "unknown_event_type"),
    ("ts_ms", 1_700, "bad_timestamp"),
    ("value", np.inf, "bad_value"),
    ("event_type", "rating", "bad_value"),  # a rating without a value
])
def test_check_events_reasons_have_kinds_whatever_the_event_id(
        event_id: object, column: str, bad: object, kind: str) -> None:
    events = _events()
    ids, values = events.event_id.copy(), getattr(events, column).copy()
    ids[1], values[1] = event_id, bad
    with pytest.raises(InvalidEventError) as exc:
        check_events(dataclasses.replace(events, event_id=ids, **{column: values}))
    assert exc.value.reason.startswith("event 1 (event_id ")
    assert exc.value.kind == kind and reason_kind(exc.value.reason) == kind, exc.value.reason


@pytest.mark.parametrize("event_id", ["", "x" * 300, 7, None, ["a): b"], "a): b" * 100])
def test_a_bad_event_id_in_check_events_is_a_bad_id(event_id: object) -> None:
    events = _events()
    ids = events.event_id.copy()
    ids[2] = event_id
    with pytest.raises(InvalidEventError) as exc:
        check_events(dataclasses.replace(events, event_id=ids))
    assert exc.value.kind == reason_kind(exc.value.reason) == "bad_id"


def test_the_replayers_size_check_is_too_large() -> None:
    events = _events(2)
    producer = SimpleNamespace(_max_bytes=10)
    with pytest.raises(InvalidEventError) as exc:
        EventProducer._check_sizes(producer, events, wire_batch.encode_values(events))  # type: ignore[arg-type]
    assert exc.value.kind == reason_kind(exc.value.reason) == "too_large"


def test_a_decoder_failure_is_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes | None, max_bytes: int | None = None) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(wire_batch, "decode_event", broken)
    [(n, reason)] = decode_batch([None]).rejects
    assert n == 0 and reason_kind(reason) == "internal"


# One record per reason of decode_event; with the internal failure above and the size
# check below, every kind but the fallback is reachable.
EXAMPLES = {
    None: "empty_record",
    b"{oops": "bad_json",
    b"\xff": "bad_json",
    b'{"a": 1e400}': "bad_json",
    b"[]": "not_object",
    b"null": "not_object",
    _raw(x=1): "unknown_field",
    _raw(item_id=...): "missing_field",
    _raw(event_type=...): "missing_field",
    _raw(ts_ms=...): "missing_field",
    _raw(event_id=1.5): "bad_id",
    _raw(user_id="u" * 257): "bad_id",
    _raw(event_type="view"): "unknown_event_type",
    _raw(event_type=3): "unknown_event_type",
    _raw(ts_ms="now"): "bad_timestamp",
    _raw(ts_ms=4_102_444_800_000): "bad_timestamp",
    _raw(ts_ms=-(2**63)): "bad_timestamp",
    _raw(value=[1]): "bad_value",
    _raw(value=3.5e38): "bad_value",
    _raw(event_type="rating", value=None): "bad_value",
    _raw(context="home"): "bad_context",
    _raw(context={str(n): n for n in range(33)}): "bad_context",
    _raw(context={"a): b": "x" * 257}): "bad_context",
    _raw(context={"k": [1]}): "bad_context",
}


@pytest.mark.parametrize("raw, kind", EXAMPLES.items())
def test_each_reason_of_the_decoder_has_its_kind(raw: bytes | None, kind: str) -> None:
    assert _kind_of(raw) == kind


def test_every_kind_is_reachable() -> None:
    reached = set(EXAMPLES.values()) | {_kind_of(_raw(item_id="i" * 100), 50), "internal"}
    assert reached == KNOWN


@given(records)
def test_any_record_is_valid_or_has_a_known_kind(raw: bytes | None) -> None:
    _kind_of(raw)


@given(near_valid_records())
def test_a_near_valid_record_is_valid_or_has_a_known_kind(raw: bytes) -> None:
    _kind_of(raw)


@FEWER
@given(st.lists(records, max_size=8), st.sampled_from([wire.DEFAULT_MAX_BYTES, 200, None]))
def test_a_batch_labels_its_rejects_as_decode_event_does(raws: list[bytes | None],
                                                         max_bytes: int | None) -> None:
    kinds = [(n, _kind_of(raw, max_bytes)) for n, raw in enumerate(raws)]
    assert [(n, reason_kind(r)) for n, r in decode_batch(raws, max_bytes).rejects] == \
        [(n, k) for n, k in kinds if k is not None]


# -- the trainer: counted and dead-lettered by kind ------------------------------------


class _Sent:
    def succeeded(self) -> bool:
        return True


class _Producer:
    """Takes dead letters and acknowledges them at once."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, topic: str, **letter: Any) -> _Sent:
        self.sent.append({"topic": topic, **letter})
        return _Sent()

    def flush(self, timeout: float | None = None) -> None:
        pass


def _records(values: list[bytes | None]) -> list[SimpleNamespace]:
    return [SimpleNamespace(key=b"k%d" % n, value=v, offset=100 + n, timestamp=1_000 + n)
            for n, v in enumerate(values)]


def _fetched(values: list[bytes | None], max_bytes: int = wire.DEFAULT_MAX_BYTES) -> Any:
    """A chunk as the fetch process sends it: decoded by the fetcher's own code."""
    return _decode(1, 3, _records(values), max_bytes, None)


def _counted(metrics: TrainerMetrics) -> dict[str, float]:
    """The rejected counter's value by label."""
    return {s.labels["reason"]: s.value for m in metrics.registry.collect()
            for s in m.samples if s.name == REJECTED}


OVERSIZED = _raw(item_id="i" * 200, event_id="x" * 70_000)


def test_the_rejected_counter_is_labelled_by_kind() -> None:
    metrics = TrainerMetrics(CollectorRegistry())
    dlq = _Producer()
    intake = Intake(dlq, "events", "events.dlq", wire.DEFAULT_MAX_BYTES, metrics)  # type: ignore[arg-type]
    chunk = intake.accept(_fetched([_raw(), b"{not json", OVERSIZED, _raw(event_id="e2"),
                                    b"{oops"]))
    intake.flush()
    assert chunk.valid.tolist() == [True, False, False, True, False]
    assert _counted(metrics) == {"bad_json": 2, "too_large": 1}
    headers = [dict(letter["headers"]) for letter in dlq.sent]
    assert [h["reason.kind"] for h in headers] == [b"bad_json", b"too_large", b"bad_json"]
    # The reason header keeps the whole reason, numbers and all.
    assert headers[1]["reason"] == (f"record of {len(OVERSIZED)} bytes exceeds the "
                                    f"{wire.DEFAULT_MAX_BYTES}-byte limit").encode()
    assert headers[1]["truncated"] == b"true" and headers[0]["source.offset"] == b"101"


def test_every_poison_example_is_counted_under_its_kind() -> None:
    metrics = TrainerMetrics(CollectorRegistry())
    intake = Intake(_Producer(), "events", "events.dlq", 1000, metrics)  # type: ignore[arg-type]
    values = [*EXAMPLES, _raw(item_id="i" * 1000)]
    intake.accept(_fetched(values, max_bytes=1000))
    expected = Counter([*EXAMPLES.values(), "too_large"])
    assert _counted(metrics) == expected
    assert intake.dead_letters == len(values)


def test_dead_letters_carry_the_kind_through_a_broker(tmp_path: Path, kafka_bootstrap: str,
                                                     topic: str) -> None:
    stream_settings(tmp_path, kafka_bootstrap, topic)  # the topic and its DLQ
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    metrics = TrainerMetrics(CollectorRegistry())
    intake = Intake(producer, topic, f"{topic}.dlq", wire.DEFAULT_MAX_BYTES, metrics)
    try:
        intake.accept(_fetched([b"{oops", _raw(), OVERSIZED, _raw(ts_ms=...)]))
        intake.flush()
    finally:
        producer.close()
    dlq = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=kafka_bootstrap,
                        auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    letters = sorted((dict(r.headers) for r in dlq), key=lambda h: int(h["source.offset"]))
    dlq.close()
    assert [h["reason.kind"] for h in letters] == [b"bad_json", b"too_large", b"missing_field"]
    assert [h["reason"] for h in letters][1:] == [
        f"record of {len(OVERSIZED)} bytes exceeds the 65536-byte limit".encode(),
        b"missing field: ts_ms"]
    assert letters[0]["reason"].startswith(b"not JSON: ")
