"""Batch decoding: exactly ``decode_event`` record by record, in columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire import GOOD, TS, _raw

from common.data.events import COLUMNS, Events
from common.data.wire import (
    InvalidEventError,
    WireEvent,
    decode_event,
    reason_kind,
    to_events,
)
from common.data.wire_batch import decode_batch

INVALID = [
    (b"{oops", "not JSON", "bad_json"),
    (b"[1, 2]", "event must be a JSON object", "not_object"),
    (_raw(user_id=7), "user_id must be a string", "bad_id"),
    (_raw(item_id=""), "item_id must have 1..256 characters", "bad_id"),
    (_raw(event_id="x" * 257), "event_id must have 1..256 characters", "bad_id"),
    (_raw(user_id=...), "missing field: user_id", "missing_field"),
    (_raw(ts_ms=...), "missing field: ts_ms", "missing_field"),
    (_raw(event_type="purchase"), "unknown event_type: purchase", "unknown_event_type"),
    (_raw(event_type=["click"]), "unknown event_type: list", "unknown_event_type"),
    (_raw(ts_ms=True), "ts_ms must be an integer", "bad_timestamp"),
    (_raw(ts_ms=1.7e12), "ts_ms must be an integer", "bad_timestamp"),
    (_raw(ts_ms=2**64 - 1), "outside 1990..2100", "bad_timestamp"),
    (_raw(ts_ms=1_700_000_000), "outside 1990..2100", "bad_timestamp"),
    (_raw(event_type="rating"), "a rating needs a value", "bad_value"),
    (_raw(value=True), "value must be a finite number or null", "bad_value"),
    (_raw(value=-1e39), "value must be a finite number or null", "bad_value"),
    (_raw(extra=1), "unknown field: extra", "unknown_field"),
    (_raw(context=[1]), "context must be an object", "bad_context"),
    (None, "empty record", "empty_record"),
]


def _one_by_one(raws: list[bytes | None], max_bytes: int | None) -> tuple[Events, list[bool],
                                                                         list[tuple[int, str]]]:
    events: list[WireEvent] = []
    valid, rejects = [], []
    for n, raw in enumerate(raws):
        try:
            events.append(decode_event(raw, max_bytes))
            valid.append(True)
        except InvalidEventError as exc:
            valid.append(False)
            rejects.append((n, exc.reason))
    return to_events(events), valid, rejects


def _assert_same(raws: list[bytes | None], max_bytes: int | None = 64 * 1024) -> None:
    batch = decode_batch(raws, max_bytes)
    events, valid, rejects = _one_by_one(raws, max_bytes)
    assert batch.valid.tolist() == valid
    assert batch.rejects == rejects
    for c in COLUMNS:
        got, want = getattr(batch.events, c), getattr(events, c)
        assert got.dtype == want.dtype, c
        assert np.array_equal(got, want, equal_nan=c == "value"), c


def _valid(n: int, **changes: object) -> bytes:
    return _raw(**{"event_id": f"e{n}", "user_id": f"u{n % 7}", "item_id": f"i{n % 5}",
                   **changes})


def test_a_batch_of_plain_events_decodes_to_columns() -> None:
    raws = [_valid(n) for n in range(10)] + [_valid(10, event_type="rating", value=4),
                                             _valid(11, event_type="impression")]
    batch = decode_batch(raws)
    assert batch.valid.all() and batch.rejects == []
    assert batch.events.event_id.tolist() == [f"e{n}" for n in range(12)]
    assert batch.events.value.dtype == np.float32 and batch.events.value[10] == 4.0
    _assert_same(raws)


@pytest.mark.parametrize("raw, reason, kind", INVALID)
def test_a_bad_record_in_a_batch_gets_the_same_reason(raw: bytes | None, reason: str,
                                                      kind: str) -> None:
    raws = [_valid(0), raw, _valid(2)]
    batch = decode_batch(raws)
    assert [n for n, _ in batch.rejects] == [1] and reason in batch.rejects[0][1]
    assert reason_kind(batch.rejects[0][1]) == kind  # the trainer's label for it
    assert batch.events.event_id.tolist() == ["e0", "e2"]
    _assert_same(raws)


def test_oversized_records_in_a_batch_are_rejected() -> None:
    raws = [_valid(0), _valid(1, item_id="i" * 200)]
    [(n, reason)] = decode_batch(raws, max_bytes=150).rejects
    assert n == 1 and reason_kind(reason) == "too_large"
    _assert_same(raws, max_bytes=150)


def test_events_with_a_context_decode_in_a_batch() -> None:
    raws = [_valid(0), _valid(1, context={"page": "home"})]
    assert decode_batch(raws).valid.all()
    _assert_same(raws)


def test_an_empty_batch() -> None:
    batch = decode_batch([])
    assert len(batch.events) == 0 and batch.rejects == []


_json = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) \
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5) \
    | st.sampled_from(["click", "rating", "impression", "", "x" * 257]) \
    | st.integers(min_value=TS - 10**13, max_value=TS + 10**13) | st.just([]) | st.just({})


@st.composite
def _record(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["good", "good", "good", "changed", "dropped", "extra",
                                 "bytes", "none"]))
    d: dict[str, object] = {**GOOD, "event_id": draw(st.text(min_size=1, max_size=4)),
                            "value": draw(st.none() | st.floats(0, 5) | st.integers(0, 5))}
    if kind == "good" and d["value"] is not None:
        d["event_type"] = draw(st.sampled_from(["click", "rating", "impression"]))
    elif kind == "changed":
        d[draw(st.sampled_from(sorted(GOOD)))] = draw(_json)
    elif kind == "dropped":
        del d[draw(st.sampled_from(sorted(GOOD)))]
    elif kind == "extra":
        d[draw(st.sampled_from(["context", "x"]))] = draw(_json)
    elif kind == "bytes":
        return draw(st.binary(max_size=40))
    elif kind == "none":
        return None
    return json.dumps(d).encode()


@settings(max_examples=400, deadline=None)
@given(st.lists(_record(), max_size=12))
def test_batches_decode_exactly_as_record_by_record(raws: list[bytes | None]) -> None:
    _assert_same(raws)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=30))
def test_batches_of_valid_events_decode_exactly_as_record_by_record(ns: list[int]) -> None:
    _assert_same([_valid(n, event_type="rating", value=n % 6) if n % 3 else _valid(n)
                  for n in ns])
