"""The event contract on the wire: one JSON object per Kafka record, key = user_id.

Fields: ``event_id``, ``user_id``, ``item_id`` (non-empty strings), ``event_type``
(one of ``EVENT_TYPES``), ``value`` (a finite number within float32's range, or null;
required for ratings),
``ts_ms`` (integer milliseconds since the epoch, UTC) and an optional ``context``
object of short string/number/bool values. Anything else is rejected with a reason
(for a person) and its kind (one of ``REJECT_KINDS``: ``bad_json``, ``missing_field``,
...; bounded, for metrics labels); the stream sends rejects to the dead-letter topic
with both in headers and counts them by kind. This module decodes and encodes one record;
``common.data.wire_batch`` does the same for a whole poll or a producer's batch, column
by column.

>>> raw = encode_event({"event_id": "e1", "user_id": "u1", "item_id": "i1",
...                     "event_type": "click", "ts_ms": 1_700_000_000_000})
>>> decode_event(raw).item_id
'i1'
>>> try:
...     decode_event(b'{"event_id": "e1"}')
... except InvalidEventError as exc:
...     print(exc.reason, exc.kind, sep=" / ")
missing field: user_id / missing_field
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
from orjson import loads as _loads  # ~4x faster than json.loads on a record

from common.data.events import CLICK, RATING, Events

IMPRESSION = "impression"
# Impressions are valid and landed, but never a negative and never trained on.
EVENT_TYPES = frozenset({CLICK, RATING, IMPRESSION})
MAX_ID_CHARS = 256
MAX_CONTEXT_KEYS = 32
MAX_CONTEXT_VALUE_CHARS = 256
# 1990-01-01 .. 2100-01-01: outside is a unit bug (seconds, microseconds), not an event.
MIN_TS_MS, MAX_TS_MS = 631_152_000_000, 4_102_444_800_000
# Values are stored as float32: a finite number beyond its range would become inf.
MAX_VALUE = float(np.finfo(np.float32).max)
PLAIN_FIELDS = frozenset({"event_id", "user_id", "item_id", "event_type", "value", "ts_ms"})
_KNOWN = PLAIN_FIELDS | {"context"}
DEFAULT_MAX_BYTES = 64 * 1024


class InvalidEventError(ValueError):
    """A record that breaks the contract: ``reason`` says what, for a person (it may quote
    the record); ``kind`` is one of ``REJECT_KINDS``, for metrics labels. Without a kind,
    the reason's is used (``reason_kind``)."""

    def __init__(self, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = reason_kind(reason) if kind is None else kind


# -- reject kinds: a short, stable label per reason (the rejected counter's ``reason``
# label, the dead letter's ``reason.kind`` header). A reject is labelled from its reason's
# text (``reason_kind``): decode_batch hands out reasons only. So a new reason needs its
# pattern here, and tests/test_reject_kinds.py checks every reason the decoder gives
# against it.

REJECT_KINDS: dict[str, str] = {
    "empty_record": "a null record value (a tombstone)",
    "too_large": "a record over the byte limit",
    "bad_json": "not JSON: bad syntax or UTF-8, NaN/Infinity, a number beyond a double",
    "not_object": "JSON, but not an object",
    "unknown_field": "a field the contract does not have",
    "missing_field": "a required field left out (event_id, user_id, item_id, event_type, "
                     "ts_ms)",
    "bad_id": "event_id, user_id or item_id not a string of 1..256 characters",
    "unknown_event_type": "event_type not click, rating or impression (or not a string)",
    "bad_timestamp": "ts_ms not an integer, or outside 1990..2100",
    "bad_value": "value not a finite number within float32's range, or a rating without one",
    "bad_context": "context not an object of at most 32 short string/number/bool/null values",
    "internal": "the decoder itself failed on the record (a bug)",
    "unknown": "a reason that no pattern below matches (a bug: every reason has a kind)",
}
UNKNOWN_KIND = "unknown"

# (pattern matched at the start of a reason, kind), first match wins.
_REASON_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.DOTALL), kind) for pattern, kind in (
        (r"empty record \(null value\)\Z", "empty_record"),
        (r"record of \d+ bytes exceeds the \d+-byte limit\Z", "too_large"),
        # stream.replayer, before it sends: "event 'e1' encodes to N bytes, over ..."
        (r"event .* encodes to \d+ bytes, over RECSTREAM_KAFKA_MAX_MESSAGE_BYTES=\d+\Z",
         "too_large"),
        (r"not JSON: ", "bad_json"),
        (r"event must be a JSON object, got \w+\Z", "not_object"),
        (r"unknown field: ", "unknown_field"),
        (r"missing field: ", "missing_field"),
        (r"(?:event_id|user_id|item_id) must (?:be a string|have 1\.\.)", "bad_id"),
        (r"unknown event_type: ", "unknown_event_type"),
        (r"ts_ms (?:must be an integer, got |(?:-?\d+ )?is outside 1990\.\.2100)",
         "bad_timestamp"),
        (r"value must be a finite number or null\Z", "bad_value"),
        (r"a rating needs a value\Z", "bad_value"),
        (r"context(?: must be an object, got | has \d+ keys, at most |\.)", "bad_context"),
        (r"internal: ", "internal"),
    ))
# check_events names the event first: "event 7 (event_id 'e7'): <reason>".
_CHECK_PREFIX = re.compile(r"event \d+ \(event_id ")
_QUOTED_ID = re.compile(r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\): """)  # a str's repr


def reason_kind(reason: str) -> str:
    """The kind of a reject reason (a key of ``REJECT_KINDS``): a low-cardinality label,
    without the ids, names or numbers the reason may quote.

    >>> reason_kind("not JSON: unexpected character: line 1 column 1 (char 0)")
    'bad_json'
    >>> reason_kind("event 3 (event_id 'e3'): ts_ms is outside 1990..2100 (milliseconds "
    ...             "expected)")
    'bad_timestamp'
    """
    prefix = _CHECK_PREFIX.match(reason)
    if prefix is None:
        return _kind(reason)
    quoted = _QUOTED_ID.match(reason, prefix.end())
    if quoted is not None:
        return _kind(reason[quoted.end():])
    # An event_id that is not a str: its repr ends at the first "): " a known reason follows.
    at = prefix.end()
    while (at := reason.find("): ", at)) >= 0:
        at += 3
        kind = _kind(reason[at:])
        if kind != UNKNOWN_KIND:
            return kind
    return UNKNOWN_KIND


def _kind(reason: str) -> str:
    for pattern, kind in _REASON_PATTERNS:
        if pattern.match(reason):
            return kind
    return UNKNOWN_KIND


class WireEvent(NamedTuple):
    """One decoded, validated event (a tuple: cheap to build at 50k events/s)."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    value: float | None
    ts_ms: int
    context: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"event_id": self.event_id, "user_id": self.user_id,
                             "item_id": self.item_id, "event_type": self.event_type,
                             "value": self.value, "ts_ms": self.ts_ms}
        if self.context:
            d["context"] = dict(self.context)
        return d


def encode_event(event: Mapping[str, Any]) -> bytes:
    """Serialise an event (validated, so producers cannot emit what consumers reject)."""
    raw = json.dumps(dict(event), separators=(",", ":"), allow_nan=False).encode()
    decode_event(raw, max_bytes=None)
    return raw


def _id(d: Mapping[str, Any], name: str) -> str:
    if name not in d:
        raise InvalidEventError(f"missing field: {name}", "missing_field")
    v = d[name]
    if not isinstance(v, str):
        raise InvalidEventError(f"{name} must be a string, got {type(v).__name__}", "bad_id")
    if not v or len(v) > MAX_ID_CHARS:
        raise InvalidEventError(f"{name} must have 1..{MAX_ID_CHARS} characters, got {len(v)}",
                                "bad_id")
    return v


def _context(v: Any) -> Mapping[str, Any] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidEventError(f"context must be an object, got {type(v).__name__}",
                                "bad_context")
    if len(v) > MAX_CONTEXT_KEYS:
        raise InvalidEventError(f"context has {len(v)} keys, at most {MAX_CONTEXT_KEYS}",
                                "bad_context")
    for k, x in v.items():
        if isinstance(x, str):
            if len(x) > MAX_CONTEXT_VALUE_CHARS:
                raise InvalidEventError(f"context.{k[:40]} is longer than "
                                        f"{MAX_CONTEXT_VALUE_CHARS} characters", "bad_context")
        elif x is not None and not isinstance(x, bool | int | float):
            raise InvalidEventError(f"context.{k[:40]} must be a string, number, bool or null",
                                    "bad_context")
    return v


def decode_event(raw: bytes | None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> WireEvent:
    """Parse and validate one record value; raises ``InvalidEventError`` with the reason."""
    if raw is None:
        raise InvalidEventError("empty record (null value)", "empty_record")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidEventError(f"record of {len(raw)} bytes exceeds the {max_bytes}-byte limit",
                                "too_large")
    try:
        d = _loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidEventError(f"not JSON: {str(exc)[:80]}", "bad_json") from None
    # The common case checked in one expression; anything unusual takes the slow path,
    # which finds the precise reason (or accepts, e.g. an event with a context).
    if type(d) is dict and d.keys() <= PLAIN_FIELDS:
        e, u, i, t = d.get("event_id"), d.get("user_id"), d.get("item_id"), d.get("event_type")
        ts, v = d.get("ts_ms"), d.get("value")
        if (type(e) is str and type(u) is str and type(i) is str
                and 0 < len(e) <= MAX_ID_CHARS and 0 < len(u) <= MAX_ID_CHARS
                and 0 < len(i) <= MAX_ID_CHARS and type(t) is str and t in EVENT_TYPES
                and type(ts) is int and MIN_TS_MS <= ts < MAX_TS_MS
                and ((v is None and t != RATING)
                     or ((type(v) is float or type(v) is int) and -MAX_VALUE <= v <= MAX_VALUE))):
            return WireEvent(e, u, i, t, None if v is None else float(v), ts)
    return _validate(d)


def _validate(d: Any) -> WireEvent:
    if not isinstance(d, dict):
        raise InvalidEventError(f"event must be a JSON object, got {type(d).__name__}",
                                "not_object")
    unknown = d.keys() - _KNOWN
    if unknown:
        raise InvalidEventError(f"unknown field: {sorted(unknown)[0][:40]}", "unknown_field")
    event_id, user_id, item_id = _id(d, "event_id"), _id(d, "user_id"), _id(d, "item_id")
    event_type = d.get("event_type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        if "event_type" not in d:
            raise InvalidEventError("missing field: event_type", "missing_field")
        shown = event_type[:40] if isinstance(event_type, str) else type(event_type).__name__
        raise InvalidEventError(f"unknown event_type: {shown}", "unknown_event_type")
    ts = d.get("ts_ms")
    if isinstance(ts, bool) or not isinstance(ts, int):
        if "ts_ms" not in d:
            raise InvalidEventError("missing field: ts_ms", "missing_field")
        raise InvalidEventError(f"ts_ms must be an integer, got {type(ts).__name__}",
                                "bad_timestamp")
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise InvalidEventError(f"ts_ms {ts} is outside 1990..2100 (milliseconds expected)",
                                "bad_timestamp")
    value = d.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not -MAX_VALUE <= value <= MAX_VALUE:
            raise InvalidEventError("value must be a finite number or null", "bad_value")
        value = float(value)
    elif event_type == RATING:
        raise InvalidEventError("a rating needs a value", "bad_value")
    return WireEvent(event_id, user_id, item_id, event_type, value, ts,
                     _context(d.get("context")))


def to_events(batch: Iterable[WireEvent]) -> Events:
    """Decoded events as a columnar ``Events`` batch (context is dropped)."""
    rows = list(batch)
    if not rows:
        return Events.empty()
    event_id, user_id, item_id, event_type, value, ts_ms, _ = zip(*rows, strict=True)

    def col(values: tuple[str, ...]) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return Events(col(event_id), col(user_id), col(item_id), col(event_type),
                  np.array([np.nan if v is None else v for v in value], np.float32),
                  np.array(ts_ms, np.int64))
