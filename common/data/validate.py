"""Row checks for the data contract, column by column in Arrow: ids, timestamps, values.

Every check returns a per-row verdict instead of raising, so one bad row among ten
million costs a count, not the file. ``BadRows`` counts rejected rows by kind (a row
once, under its first problem in ``BAD_KINDS`` order) and keeps the first example of each
kind with its file, row and column, which is what the import report and load warnings
print.

>>> ms, bad = parse_timestamps(pa.array(["2024-01-02T00:00:00Z", "1704153600", "soon"]))
>>> ms.tolist()[:2], bad.tolist()
([1704153600000, 1704153600000], [False, False, True])
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.data.contract import MAX_ID_CHARS

# The kinds of bad row, in the order a row's first problem is looked for.
BAD_KINDS: dict[str, str] = {
    "malformed_row": "a line that does not split into the header's columns, or a JSON "
                     "line that is not an object",
    "bad_encoding": "a field of a CSV line that is not UTF-8",
    "missing_field": "user_id, item_id or ts (or a table's id) empty or absent",
    "bad_id": f"an id over {MAX_ID_CHARS} characters",
    "bad_timestamp": "ts not ISO-8601, epoch seconds or milliseconds (or --ts-format), "
                     "or outside 1990..2100",
    "bad_value": "value not a finite number within float32's range",
    "duplicate_id": "a users/items row whose id an earlier row already has",
    "bad_feature": "a feature value of the wrong kind (a numeric field that is no number)",
}
# 1990-01-01 .. 2100-01-01, as the wire contract (common.data.wire) has it.
MIN_TS_MS, MAX_TS_MS = 631_152_000_000, 4_102_444_800_000
MAX_VALUE = float(np.finfo(np.float32).max)

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_ISO = (r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?"
        r"(Z|z|[+-]\d{2}(:?\d{2})?)?$")
_ZONE = r"(Z|z|[+-]\d{2}(:?\d{2})?)$"


@dataclass
class BadRows:
    """Rejected rows counted by kind, with the first example of each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    # The importer's reader (malformed lines) and its checker run on two threads.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, kind: str, n: int, example: str) -> None:
        if n <= 0:
            return
        assert kind in BAD_KINDS, kind
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + n
            self.examples.setdefault(kind, example)

    def note(self, kind: str, mask: np.ndarray, rejected: np.ndarray, where: str, row0: int,
             column: str, values: pa.Array | pa.ChunkedArray | None) -> None:
        """Count rows in ``mask`` not already ``rejected`` (updated in place) as ``kind``."""
        new = mask & ~rejected
        n = int(new.sum())
        if n:
            k = int(np.argmax(new))
            shown = "" if values is None else f": {_show(values[k].as_py())}"
            self.add(kind, n, f"{where}, row {row0 + k + 1}, column {column!r}{shown}")
            rejected |= new

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadRows) -> None:
        for kind, n in other.counts.items():
            self.add(kind, n, other.examples[kind])

    def summary(self) -> str:
        """``1000 bad_id, 3 bad_timestamp`` (or ``none``)."""
        return ", ".join(f"{n} {k}" for k, n in self.counts.items()) or "none"

    def details(self) -> list[str]:
        return [f"{n} {k} (first: {self.examples[k]})" for k, n in self.counts.items()]


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def decode_text(table: pa.Table, where: str, row0: int, bad: BadRows,
                rejected: np.ndarray) -> pa.Table:
    """``table`` with its binary columns (CSV files are read as bytes) as UTF-8 strings; a
    row with a field that is not UTF-8 is counted ``bad_encoding`` (its field emptied)."""
    for k, name in enumerate(table.column_names):
        col = table[name]
        if not pa.types.is_binary(col.type):
            continue
        try:
            text = col.cast(pa.string())
        except pa.ArrowInvalid:  # the rare file: find the rows one value at a time
            decoded, wrong = [], np.zeros(len(col), dtype=bool)
            for j, raw in enumerate(col.to_pylist()):
                try:
                    decoded.append(None if raw is None else raw.decode("utf-8"))
                except UnicodeDecodeError:
                    decoded.append(None)
                    wrong[j] = True
            text = pa.chunked_array([pa.array(decoded, pa.string())])
            bad.note("bad_encoding", wrong, rejected, where, row0, name, col)
        table = table.set_column(k, name, text)
    return table


def as_strings(arr: pa.Array | pa.ChunkedArray, keep_dictionary: bool = False
               ) -> pa.ChunkedArray:
    """Any column as strings (ids may arrive as integers from Parquet or JSON); with
    ``keep_dictionary``, a dictionary of strings stays one (no decoding)."""
    arr = arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])
    if pa.types.is_dictionary(arr.type):
        if keep_dictionary and pa.types.is_string(arr.type.value_type):
            return arr
        arr = arr.cast(arr.type.value_type)
    if pa.types.is_large_string(arr.type) or not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def id_problems(arr: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(missing, too long) masks of an id column: null or empty, over 256 characters."""
    if pa.types.is_dictionary(arr.type):  # measure each distinct id once
        parts = [pc.utf8_length(c.dictionary).to_numpy(zero_copy_only=False)[
            pc.fill_null(c.indices, 0).to_numpy()] * c.is_valid().to_numpy(zero_copy_only=False)
            if len(c.dictionary) else np.zeros(len(c), dtype=np.int64) for c in arr.chunks]
        length = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return length == 0, length > MAX_ID_CHARS
    length = pc.fill_null(pc.utf8_length(arr), 0).to_numpy()
    return length == 0, length > MAX_ID_CHARS


def parse_timestamps(arr: pa.Array | pa.ChunkedArray, fmt: str | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds since the epoch (UTC) and a bad mask; nulls come back bad too.

    Timestamps stay timestamps; numbers are epoch seconds or milliseconds, told apart by
    which reading lands in 1990..2100; strings are numbers or ISO-8601 (no zone = UTC),
    or, with ``fmt``, whatever ``strptime`` reads with it.
    """
    arr = arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])
    t = arr.type
    if pa.types.is_dictionary(t):
        arr, t = arr.cast(t.value_type), t.value_type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        ms = arr.cast(pa.timestamp("ms", getattr(t, "tz", None)), safe=False).cast(pa.int64())
        out = pc.fill_null(ms, MIN_TS_MS - 1).to_numpy().astype(np.int64)
        return _in_range(out)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return _epoch(pc.fill_null(arr.cast(pa.float64()), np.nan).to_numpy())
    strings = as_strings(arr)
    if fmt is not None:
        parsed = pc.strptime(strings, format=fmt, unit="ms", error_is_null=True)
        out = pc.fill_null(parsed.cast(pa.int64()), MIN_TS_MS - 1).to_numpy()
        return _in_range(out.astype(np.int64))
    try:  # the common case, all integers: one cast, no regex
        if strings.null_count == 0:
            return _epoch_int(strings.cast(pa.int64()).to_numpy())
    except pa.ArrowInvalid:
        pass
    try:  # all numbers
        return _epoch(pc.fill_null(strings.cast(pa.float64()), np.nan).to_numpy())
    except pa.ArrowInvalid:
        pass
    strings = pc.utf8_trim_whitespace(strings)
    numeric = pc.fill_null(pc.match_substring_regex(strings, _NUMBER), False)
    out = np.full(len(strings), MIN_TS_MS - 1, dtype=np.int64)
    is_num = numeric.to_numpy()
    if is_num.any():
        nums = pc.fill_null(pc.if_else(numeric, strings, None).cast(pa.float64()), np.nan)
        ms, _ = _epoch(nums.to_numpy())
        out[is_num] = ms[is_num]
    iso = pc.fill_null(pc.match_substring_regex(strings, _ISO), False)
    is_iso = iso.to_numpy() & ~is_num
    if is_iso.any():
        out[is_iso] = _iso_ms(pc.filter(strings, pa.array(is_iso)))
    return _in_range(out)


def _epoch(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore"):
        as_s = (values >= MIN_TS_MS / 1000) & (values < MAX_TS_MS / 1000)
        as_ms = (values >= MIN_TS_MS) & (values < MAX_TS_MS)
        ms = np.where(as_s, values * 1000.0, np.where(as_ms, values, np.nan))
    out = np.full(len(values), MIN_TS_MS - 1, dtype=np.int64)
    ok = as_s | as_ms
    out[ok] = np.round(ms[ok]).astype(np.int64)
    return out, ~ok


def _epoch_int(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_epoch`` for integers, without a float round trip."""
    as_s = (values >= MIN_TS_MS // 1000) & (values < MAX_TS_MS // 1000)
    ms = np.where(as_s, values * 1000, values)
    return _in_range(ms)


def _in_range(ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ms, (ms < MIN_TS_MS) | (ms >= MAX_TS_MS)


def _iso_ms(strings: pa.ChunkedArray) -> np.ndarray:
    """ISO-8601 strings (already matched by ``_ISO``) → ms; impossible dates → out of range."""
    s = pc.replace_substring_regex(strings, r"^(\d{4}-\d{2}-\d{2})$", r"\1T00:00:00")
    s = pc.replace_substring_regex(s, r"^(\d{4}-\d{2}-\d{2}) ", r"\1T")
    zoned = pc.match_substring_regex(s, _ZONE)
    s = pc.if_else(zoned, s, pc.binary_join_element_wise(s, "Z", ""))
    try:
        ns = s.cast(pa.timestamp("ns", "UTC"))
        return ns.cast(pa.timestamp("ms", "UTC"), safe=False).cast(pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        # A well-shaped but impossible date (2024-02-30) somewhere: one string at a time.
        return np.asarray([_one_iso(v) for v in s.to_pylist()], dtype=np.int64)


def _one_iso(text: str) -> int:
    try:
        parsed = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return MIN_TS_MS - 1
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


def parse_values(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where empty) and a bad mask: present but not a number, not
    finite, or beyond float32's range."""
    arr = arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr])
    if pa.types.is_null(arr.type):
        return np.full(len(arr), np.nan), np.zeros(len(arr), dtype=bool)
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        values = pc.fill_null(arr.cast(pa.float64()), np.nan).to_numpy()
        # A stored NaN is a missing value; an infinity or a float64 beyond float32 is not.
        with np.errstate(invalid="ignore"):
            bad = ~np.isnan(values) & ~(np.abs(values) <= MAX_VALUE)
    else:
        strings = as_strings(arr)
        try:  # the common case, all numbers or empty: one cast, no regex
            values = pc.fill_null(strings.cast(pa.float64()), np.nan).to_numpy()
            present = pc.is_valid(strings).to_numpy()
            with np.errstate(invalid="ignore"):
                bad = present & ~(np.abs(values) <= MAX_VALUE)
            return np.where(bad, np.nan, values), bad
        except pa.ArrowInvalid:
            pass
        strings = pc.utf8_trim_whitespace(strings)
        empty = pc.fill_null(pc.equal(strings, ""), True).to_numpy()
        numeric = pc.fill_null(pc.match_substring_regex(strings, _NUMBER), False)
        values = pc.fill_null(pc.if_else(numeric, strings, None).cast(pa.float64()),
                              np.nan).to_numpy()
        with np.errstate(invalid="ignore"):
            bad = ~empty & ~(numeric.to_numpy() & (np.abs(values) <= MAX_VALUE))
    return np.where(bad, np.nan, values), bad
