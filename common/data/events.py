"""Interaction events as a columnar batch: the one record shape every source produces.

>>> ev = Events.from_records([
...     {"event_id": "e1", "user_id": "u1", "item_id": "i9", "event_type": "click",
...      "value": None, "ts_ms": 2_000},
...     {"event_id": "e0", "user_id": "u2", "item_id": "i3", "event_type": "rating",
...      "value": 4.0, "ts_ms": 1_000},
... ])
>>> ev.sorted_by_time().event_id.tolist()
['e0', 'e1']
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DAY_MS = 86_400_000
CLICK = "click"
RATING = "rating"

COLUMNS = ("event_id", "user_id", "item_id", "event_type", "value", "ts_ms")


@dataclass(frozen=True)
class Events:
    """A batch of interactions, one numpy array per column, all the same length.

    ``value`` is NaN when an event carries none (a plain click); ``ts_ms`` is
    milliseconds since the Unix epoch, UTC.
    """

    event_id: np.ndarray  # object (str)
    user_id: np.ndarray  # object (str)
    item_id: np.ndarray  # object (str)
    event_type: np.ndarray  # object (str)
    value: np.ndarray  # float32
    ts_ms: np.ndarray  # int64

    def __post_init__(self) -> None:
        n = len(self.event_id)
        for name in COLUMNS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"Events column {name!r} has {len(getattr(self, name))} rows, "
                                 f"expected {n}")

    def __len__(self) -> int:
        return len(self.event_id)

    @classmethod
    def empty(cls) -> Events:
        obj = np.array([], dtype=object)
        return cls(obj, obj, obj, obj, np.array([], np.float32), np.array([], np.int64))

    @classmethod
    def from_columns(cls, **cols: Any) -> Events:
        """Build from array-likes, coercing dtypes (ids to str, value to float32)."""
        n = len(cols["user_id"])
        value = cols.get("value")
        event_type = cols.get("event_type")
        return cls(
            event_id=_as_str(cols["event_id"]),
            user_id=_as_str(cols["user_id"]),
            item_id=_as_str(cols["item_id"]),
            event_type=_as_str(event_type) if event_type is not None
            else np.full(n, CLICK, dtype=object),
            value=np.asarray(value, dtype=np.float32) if value is not None
            else np.full(n, np.nan, np.float32),
            ts_ms=np.asarray(cols["ts_ms"], dtype=np.int64),
        )

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> Events:
        rows = list(records)
        if not rows:
            return cls.empty()
        cols = {c: [r.get(c) for r in rows] for c in COLUMNS}
        cols["value"] = [np.nan if v is None else v for v in cols["value"]]
        return cls.from_columns(**cols)

    def to_records(self) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self)):
            v = float(self.value[i])
            out.append({
                "event_id": self.event_id[i], "user_id": self.user_id[i],
                "item_id": self.item_id[i], "event_type": self.event_type[i],
                "value": None if np.isnan(v) else v, "ts_ms": int(self.ts_ms[i]),
            })
        return out

    def take(self, idx: np.ndarray) -> Events:
        return Events(*(getattr(self, c)[idx] for c in COLUMNS))

    def sorted_by_time(self) -> Events:
        """Stable sort by timestamp (ties keep their input order)."""
        return self.take(np.argsort(self.ts_ms, kind="stable"))

    def between(self, start_ms: int | None = None, end_ms: int | None = None) -> Events:
        """Events with ``start_ms <= ts_ms < end_ms`` (either bound optional)."""
        mask = np.ones(len(self), dtype=bool)
        if start_ms is not None:
            mask &= self.ts_ms >= start_ms
        if end_ms is not None:
            mask &= self.ts_ms < end_ms
        return self.take(np.flatnonzero(mask))

    def positive_mask(self, rating_threshold: float) -> np.ndarray:
        """True for clicks and for finite ratings at or above the threshold; nothing else."""
        is_click = self.event_type == CLICK
        # A NaN or infinite rating is broken input, never a positive.
        valid = np.isfinite(self.value)
        is_good_rating = (self.event_type == RATING) & valid & (self.value >= rating_threshold)
        return is_click | is_good_rating

    def positives(self, rating_threshold: float) -> Events:
        """The positive events (see ``positive_mask``)."""
        return self.take(np.flatnonzero(self.positive_mask(rating_threshold)))

    def day_index(self) -> np.ndarray:
        """UTC day number (days since the epoch) of each event."""
        return self.ts_ms // DAY_MS

    @staticmethod
    def concat(parts: Iterable[Events]) -> Events:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Events.empty()
        return Events(*(np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS))


def _as_str(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object and (len(arr) == 0 or isinstance(arr[0], str)):
        return arr
    return arr.astype(str).astype(object)


def parse_day(day: str) -> int:
    """``YYYY-MM-DD`` (UTC) → milliseconds at that day's midnight.

    >>> parse_day("1970-01-02")
    86400000
    """
    try:
        parsed = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    except ValueError:
        raise ValueError(f"invalid day {day!r}: expected YYYY-MM-DD") from None
    return int(parsed.timestamp() * 1000)


def format_day(ts_ms: int) -> str:
    """Milliseconds since the epoch → the UTC day ``YYYY-MM-DD`` it falls on."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d")
