"""Fuzzing the event decoder: whatever arrives on the topic, ``decode_event`` either
returns an event that keeps the contract or raises ``InvalidEventError`` with a reason,
and ``decode_batch`` rejects exactly the same records with the same reasons.

Case counts come from the Hypothesis profile (tests/conftest.py): ``ci`` by default,
``HYPOTHESIS_PROFILE=long`` for a long run.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from common.data.events import RATING
from common.data.wire import (
    DEFAULT_MAX_BYTES,
    EVENT_TYPES,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_CHARS,
    MAX_ID_CHARS,
    MAX_TS_MS,
    MIN_TS_MS,
    InvalidEventError,
    WireEvent,
    decode_event,
    encode_event,
)
from common.data.wire_batch import decode_batch

# Values beyond float32's range are rejected (they would become inf in the columns): a
# cast that overflows is an error here.
pytestmark = pytest.mark.filterwarnings("error:overflow encountered in cast:RuntimeWarning")
# Batches cost several records a case, and the targeted tests (one mutation each) need
# fewer cases than the open-ended ones: a quarter of the profile's cases.
FEWER = settings(max_examples=max(settings.default.max_examples // 4, 25))
IDS = ("event_id", "user_id", "item_id")
FIELDS = (*IDS, "event_type", "value", "ts_ms", "context")
REQUIRED = (*IDS, "event_type", "ts_ms")

# -- strategies ----------------------------------------------------------------------



def _json(finite: bool) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
               | st.floats(allow_nan=not finite, allow_infinity=not finite)
               | st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)


json_values = _json(finite=False)  # NaN and Infinity too: JSON has no such literals
strict_json_values = _json(finite=True)
ids = st.text(min_size=1, max_size=MAX_ID_CHARS)  # any unicode except lone surrogates
timestamps = st.integers(MIN_TS_MS, MAX_TS_MS - 1)
context_values = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
                  | st.floats(allow_nan=False, allow_infinity=False)
                  | st.text(max_size=MAX_CONTEXT_VALUE_CHARS))


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """An event dict that keeps the contract (optional fields sometimes left out)."""
    event_type = draw(st.sampled_from(sorted(EVENT_TYPES)))
    # The contract: a finite number within float32's range (values are stored as float32).
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False) \
        | st.integers(-2**53, 2**53)
    value = draw(finite if event_type == RATING else st.none() | finite)
    event: dict[str, Any] = {name: draw(ids) for name in IDS}
    event.update(event_type=event_type, ts_ms=draw(timestamps))
    if value is not None or draw(st.booleans()):
        event["value"] = value
    if draw(st.integers(0, 3)) == 0:
        event["context"] = draw(st.dictionaries(st.text(max_size=16), context_values,
                                                max_size=MAX_CONTEXT_KEYS))
    return event


def _dumps(value: Any) -> bytes:
    """JSON as a careless producer writes it (NaN and Infinity literals included)."""
    return json.dumps(value, allow_nan=True).encode()


wrong_values = st.one_of(
    json_values,
    st.sampled_from([float("nan"), float("inf"), -float("inf"), -1, 0, -2**63, 2**64, 2**70,
                     1e308, -1e308, 1.5, True, False, "", " ", "\x00", "click ", "CLICK"]),
    st.text(min_size=MAX_ID_CHARS + 1, max_size=4 * MAX_ID_CHARS),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=MAX_ID_CHARS),
    st.integers(MIN_TS_MS - 10**13, MAX_TS_MS + 10**13),
)


@st.composite
def near_valid_records(draw: st.DrawFn) -> bytes:
    """A valid event with one thing wrong (or right after all): a field replaced by
    a value of another type, size or sign, a field dropped or an unknown one added."""
    event = draw(valid_events())
    mutation = draw(st.sampled_from(["replace", "drop", "extra", "context", "literal"]))
    if mutation == "replace":
        event[draw(st.sampled_from(FIELDS))] = draw(wrong_values)
    elif mutation == "drop":
        event.pop(draw(st.sampled_from(FIELDS)), None)
    elif mutation == "extra":
        event[draw(st.text(max_size=50).filter(lambda k: k not in FIELDS))] = draw(json_values)
    elif mutation == "context":
        event["context"] = draw(st.dictionaries(st.text(max_size=60), wrong_values,
                                                max_size=2 * MAX_CONTEXT_KEYS))
    else:  # numbers JSON can spell but Python's json module never writes
        field = draw(st.sampled_from(["value", "ts_ms"]))
        literal = draw(st.sampled_from(["1e400", "-1e400", "1E999", "1e-400", "-0",
                                        "1700000000000.0", "17e11", "99999999999999999999999"]))
        event[field] = "@LITERAL@"
        return _dumps(event).replace(b'"@LITERAL@"', literal.encode())
    return _dumps(event)


records = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(_dumps),
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values,
                    max_size=9).map(_dumps),
    near_valid_records(),
    valid_events().map(_dumps),
)

# -- the oracle ----------------------------------------------------------------------


def _keeps_the_contract(e: WireEvent) -> None:
    for name in IDS:
        v = getattr(e, name)
        assert type(v) is str and 0 < len(v) <= MAX_ID_CHARS, name
    assert e.event_type in EVENT_TYPES
    assert type(e.ts_ms) is int and MIN_TS_MS <= e.ts_ms < MAX_TS_MS
    assert e.value is None or (type(e.value) is float and math.isfinite(e.value))
    assert e.value is not None or e.event_type != RATING
    assert e.context is None or (isinstance(e.context, dict)
                                 and len(e.context) <= MAX_CONTEXT_KEYS)


def _decode(raw: bytes | None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> WireEvent | str:
    """The event, or the reason it was rejected; any other exception fails the test."""
    try:
        event = decode_event(raw, max_bytes)
    except InvalidEventError as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip(), "a rejection has a reason"
        return exc.reason
    _keeps_the_contract(event)
    return event


def _batch_agrees(raws: list[bytes | None], max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
    """``decode_batch`` accepts and rejects exactly what ``decode_event`` does, for the
    same reasons, and its columns hold the accepted events in order."""
    one_by_one = [_decode(raw, max_bytes) for raw in raws]
    batch = decode_batch(raws, max_bytes)
    assert batch.rejects == [(n, r) for n, r in enumerate(one_by_one) if isinstance(r, str)]
    accepted = [e for e in one_by_one if isinstance(e, WireEvent)]
    assert batch.valid.tolist() == [isinstance(r, WireEvent) for r in one_by_one]
    assert batch.events.event_id.tolist() == [e.event_id for e in accepted]
    assert batch.events.ts_ms.tolist() == [e.ts_ms for e in accepted]
    assert batch.events.event_type.tolist() == [e.event_type for e in accepted]


# -- decode_event --------------------------------------------------------------------


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_decode_or_are_rejected_with_a_reason(raw: bytes) -> None:
    _decode(raw)


@given(json_values)
def test_arbitrary_json_values_decode_or_are_rejected_with_a_reason(value: Any) -> None:
    _decode(_dumps(value))


@given(near_valid_records())
def test_near_valid_events_decode_or_are_rejected_with_a_reason(raw: bytes) -> None:
    _decode(raw)


@given(valid_events())
def test_valid_events_round_trip(event: dict[str, Any]) -> None:
    decoded = decode_event(encode_event(event))
    expected = {"value": None, **event}
    if expected["value"] is not None:
        expected["value"] = float(expected["value"])
    if not expected.get("context"):
        expected.pop("context", None)
    assert decoded.to_dict() == expected


@FEWER
@given(valid_events(), st.sampled_from(REQUIRED))
def test_an_event_missing_a_required_field_is_rejected_naming_it(
        event: dict[str, Any], field: str) -> None:
    del event[field]
    reason = _decode(_dumps(event))
    assert isinstance(reason, str) and field in reason


@FEWER
@given(valid_events(), st.sampled_from(IDS),
       st.text(min_size=MAX_ID_CHARS + 1, max_size=4 * MAX_ID_CHARS))
def test_an_overlong_id_is_rejected_naming_the_field(event: dict[str, Any], field: str,
                                                     long_id: str) -> None:
    event[field] = long_id
    reason = _decode(_dumps(event))
    assert isinstance(reason, str) and field in reason


@FEWER
@given(valid_events(), st.text(max_size=50).filter(lambda k: k not in FIELDS),
       strict_json_values)
def test_an_unknown_field_is_rejected(event: dict[str, Any], name: str, value: Any) -> None:
    event[name] = value
    reason = _decode(_dumps(event))
    assert isinstance(reason, str) and reason.startswith("unknown field")


@FEWER
@given(valid_events(), st.sampled_from(["value", "ts_ms"]),
       st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_a_non_finite_number_is_rejected(event: dict[str, Any], field: str,
                                         number: float) -> None:
    event[field] = number
    assert isinstance(_decode(_dumps(event)), str)


@given(valid_events(), st.integers(1, 4096), st.integers(0, 8192))
def test_a_record_over_the_size_limit_is_rejected_and_one_within_it_is_not(
        event: dict[str, Any], max_bytes: int, padding: int) -> None:
    raw = _dumps(event) + b" " * padding  # trailing whitespace is still valid JSON
    result = _decode(raw, max_bytes)
    if len(raw) > max_bytes:
        assert isinstance(result, str) and "exceeds" in result
    else:
        assert result == _decode(raw, None)


def test_a_megabyte_record_is_rejected_without_parsing() -> None:
    raw = _dumps({"event_id": "e", "padding": "x" * (1 << 20)})
    assert "exceeds the 65536-byte limit" in str(_decode(raw))


# -- decode_batch --------------------------------------------------------------------


@FEWER
@given(st.lists(records, max_size=8), st.sampled_from([DEFAULT_MAX_BYTES, 200, None]))
def test_a_batch_rejects_exactly_what_decode_event_rejects(
        raws: list[bytes | None], max_bytes: int | None) -> None:
    _batch_agrees(raws, max_bytes)


@FEWER
@given(st.lists(valid_events(), min_size=1, max_size=8), st.data())
def test_one_bad_record_among_valid_ones_is_the_only_reject(
        events: list[dict[str, Any]], data: st.DataObject) -> None:
    bad = data.draw(near_valid_records())
    assume(isinstance(_decode(bad), str))
    raws: list[bytes | None] = [_dumps(e) for e in events]
    at = data.draw(st.integers(0, len(raws)))
    raws.insert(at, bad)
    assert [n for n, _ in decode_batch(raws).rejects] == [at]
    _batch_agrees(raws)


def test_an_accepted_value_stays_finite_in_the_decoded_columns() -> None:
    raw = _dumps({"event_id": "e1", "user_id": "u1", "item_id": "i1", "event_type": "rating",
                  "value": 1e39, "ts_ms": MIN_TS_MS})
    batch = decode_batch([raw])
    assert not batch.valid.any() or np.isfinite(batch.events.value).all()
