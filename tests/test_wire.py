"""The event contract: what decodes, what is rejected and with which reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.wire import (
    MAX_ID_CHARS,
    InvalidEventError,
    WireEvent,
    decode_event,
    encode_event,
    reason_kind,
    to_events,
)

TS = 1_700_000_000_000
GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "click",
        "value": None, "ts_ms": TS}


def _raw(**changes: object) -> bytes:
    d = {**GOOD, **changes}
    return json.dumps({k: v for k, v in d.items() if v is not ...}).encode()


@pytest.mark.parametrize("changes, value", [
    ({}, None),
    ({"event_type": "rating", "value": 4}, 4.0),
    ({"event_type": "rating", "value": 2.5}, 2.5),
    ({"event_type": "impression"}, None),
    ({"value": ...}, None),
    ({"context": {"page": "home", "pos": 3, "promo": True, "ref": None}}, None),
])
def test_valid_events_decode(changes: dict[str, object], value: float | None) -> None:
    event = decode_event(_raw(**changes))
    assert event.user_id == "u1" and event.ts_ms == TS and event.value == value


@pytest.mark.parametrize("raw, reason, kind", [
    (b"{oops", "not JSON", "bad_json"),
    (b"[1, 2]", "event must be a JSON object", "not_object"),
    (b'"click"', "event must be a JSON object", "not_object"),
    (b"\xff\xfe", "not JSON", "bad_json"),
    (b"", "not JSON", "bad_json"),
    (_raw(user_id=7), "user_id must be a string", "bad_id"),
    (_raw(item_id=""), "item_id must have 1..256 characters", "bad_id"),
    (_raw(event_id="x" * (MAX_ID_CHARS + 1)), "event_id must have 1..256 characters",
     "bad_id"),
    (_raw(user_id=...), "missing field: user_id", "missing_field"),
    (_raw(event_type=...), "missing field: event_type", "missing_field"),
    (_raw(ts_ms=...), "missing field: ts_ms", "missing_field"),
    (_raw(event_type="purchase"), "unknown event_type: purchase", "unknown_event_type"),
    (_raw(event_type=None), "unknown event_type: NoneType", "unknown_event_type"),
    (_raw(event_type=["click"]), "unknown event_type: list", "unknown_event_type"),
    (_raw(event_type={"a": 1}), "unknown event_type: dict", "unknown_event_type"),
    (_raw(ts_ms="yesterday"), "ts_ms must be an integer", "bad_timestamp"),
    (_raw(ts_ms=None), "ts_ms must be an integer", "bad_timestamp"),
    (_raw(ts_ms=True), "ts_ms must be an integer", "bad_timestamp"),
    (_raw(ts_ms=1.7e12), "ts_ms must be an integer", "bad_timestamp"),
    (_raw(ts_ms=1_700_000_000), "outside 1990..2100", "bad_timestamp"),
    (_raw(ts_ms=-1), "outside 1990..2100", "bad_timestamp"),
    (_raw(event_type="rating"), "a rating needs a value", "bad_value"),
    (_raw(value="4"), "value must be a finite number or null", "bad_value"),
    (_raw(value=True), "value must be a finite number or null", "bad_value"),
    (_raw(value=1e39), "value must be a finite number or null", "bad_value"),
    (b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"click","value":NaN,'
     b'"ts_ms":1700000000000}', "not JSON", "bad_json"),
    (b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"click","value":1e400,'
     b'"ts_ms":1700000000000}', "not JSON", "bad_json"),
    (_raw(extra=1), "unknown field: extra", "unknown_field"),
    (_raw(context=[1]), "context must be an object", "bad_context"),
    (_raw(context={"k": {"nested": 1}}), "context.k must be a string, number, bool or null",
     "bad_context"),
    (_raw(context={f"k{n}": n for n in range(40)}), "context has 40 keys", "bad_context"),
    (_raw(context={"k": "v" * 300}), "context.k is longer than 256 characters",
     "bad_context"),
    (None, "empty record", "empty_record"),
])
def test_invalid_events_are_rejected_with_a_reason_and_its_kind(
        raw: bytes | None, reason: str, kind: str) -> None:
    with pytest.raises(InvalidEventError) as exc:
        decode_event(raw)
    assert reason in exc.value.reason
    # The kind the decoder gives, and the one the trainer reads off the reason's text.
    assert exc.value.kind == kind and reason_kind(exc.value.reason) == kind


def test_oversized_records_are_rejected_before_parsing() -> None:
    with pytest.raises(InvalidEventError, match="exceeds the 100-byte limit") as exc:
        decode_event(_raw(item_id="i" * 200), max_bytes=100)
    assert exc.value.kind == reason_kind(exc.value.reason) == "too_large"


def test_encode_refuses_what_decode_would_reject() -> None:
    with pytest.raises(InvalidEventError, match="a rating needs a value"):
        encode_event({**GOOD, "event_type": "rating"})


def test_to_events_builds_columns() -> None:
    events = to_events([decode_event(_raw()), decode_event(_raw(event_id="e2",
                        event_type="rating", value=5))])
    assert events.event_id.tolist() == ["e1", "e2"]
    assert events.value[1] == 5.0 and events.ts_ms.tolist() == [TS, TS]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(raw: bytes) -> None:
    try:
        assert isinstance(decode_event(raw), WireEvent)
    except InvalidEventError as exc:
        assert exc.reason


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(GOOD) + ["context", "x"]),
                       st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                       max_size=8))
def test_arbitrary_objects_decode_or_get_a_reason(d: dict[str, object]) -> None:
    try:
        raw = json.dumps(d).encode()
    except ValueError:
        return
    try:
        event = decode_event(raw)
    except InvalidEventError as exc:
        assert exc.reason
        return
    assert event.event_type in ("click", "rating", "impression")
