"""The landed event archive: ``events/date=YYYY-MM-DD/part-p{P}-o{FIRST}-{LAST}.parquet``.

The lander writes one file per UTC day and Kafka partition per flush; the file name
records the partition and the first and last offset of the rows in it. The nightly
reads a whole day with ``read_landed_day``. Names starting with '.' are temporary
files of a write in progress and are never read.

>>> part_name(3, 0, 41)
'part-p3-o000000000000-000000000041.parquet'
>>> parse_part_name("part-p3-o000000000000-000000000041.parquet")
(3, 0, 41)
>>> parse_part_name(".part-p3-o000000000000-000000000041.parquet.x1.tmp") is None
True
"""

from __future__ import annotations

import bisect
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.data.events import DAY_MS, Events, parse_day

SCHEMA = pa.schema([
    ("event_id", pa.string()), ("user_id", pa.string()), ("item_id", pa.string()),
    ("event_type", pa.string()), ("value", pa.float64()), ("ts_ms", pa.int64()),
    # The optional wire ``context`` object as JSON text: archived, not used by training.
    ("context", pa.string()),
    ("kafka_partition", pa.int32()), ("kafka_offset", pa.int64()),
])
_PART = re.compile(r"^part-p(\d+)-o(\d{12,})-(\d{12,})\.parquet$")
_DAY = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True, order=True)
class LandedPart:
    """One landed file and what its name says it holds."""

    day: str
    partition: int
    first_offset: int
    last_offset: int
    path: Path


def part_name(partition: int, first_offset: int, last_offset: int) -> str:
    """File name of a day's rows from one partition, offsets ``first..last`` inclusive."""
    return f"part-p{partition}-o{first_offset:012d}-{last_offset:012d}.parquet"


def remove_stale_temps(events_dir: Path, older_than_s: float) -> int:
    """Remove the temporary files of writes that died (a killed lander leaves one per
    file it was writing) once they are ``older_than_s`` old: a live lander's write
    takes seconds, and several landers may share the archive. Returns how many."""
    removed, cutoff = 0, time.time() - older_than_s
    for tmp in events_dir.glob("date=*/.part-*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # renamed or removed meanwhile
    return removed


def parse_part_name(name: str) -> tuple[int, int, int] | None:
    """``(partition, first_offset, last_offset)`` of a landed file name, else None."""
    m = _PART.match(name)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def day_dir(events_dir: Path, day: str) -> Path:
    """The directory of one UTC day's partition."""
    return events_dir / f"date={day}"


def landed_days(events_dir: Path) -> list[str]:
    """Days that have at least one landed file, oldest first."""
    if not events_dir.is_dir():
        return []
    days = (m[1] for d in events_dir.iterdir() if (m := _DAY.match(d.name)) and d.is_dir())
    return sorted(d for d in days if landed_parts(events_dir, d))


def landed_parts(events_dir: Path, day: str | None = None) -> list[LandedPart]:
    """Landed files of one day (or of all days), sorted by day, partition and offset."""
    if day is not None:
        dirs = [day_dir(events_dir, day)]
    elif events_dir.is_dir():
        dirs = [d for d in events_dir.iterdir() if _DAY.match(d.name)]
    else:
        dirs = []
    parts = []
    for d in dirs:
        if not d.is_dir():
            continue
        for f in d.iterdir():
            parsed = parse_part_name(f.name)
            if parsed is not None:
                parts.append(LandedPart(d.name[len("date="):], *parsed, f))
    return sorted(parts)


def landed_offsets(events_dir: Path) -> dict[int, int]:
    """Highest landed offset per partition, over all days."""
    out: dict[int, int] = {}
    for p in landed_parts(events_dir):
        out[p.partition] = max(out.get(p.partition, -1), p.last_offset)
    return out


def landed_watermark_ms(events_dir: Path) -> int | None:
    """Newest event time in the newest landed day (None before anything landed)."""
    days = landed_days(events_dir)
    if not days:
        return None
    return max(pc.max(pq.read_table(p.path, columns=["ts_ms"]).column(0)).as_py()
               for p in landed_parts(events_dir, days[-1]))


def landed_through(events_dir: Path, day: str, lateness_ms: int = 0) -> tuple[bool, int | None]:
    """Whether ``day`` is completely landed: the watermark passed the next midnight by
    ``lateness_ms`` (events arriving later than that miss the nightly); and the watermark."""
    end = parse_day(day) + DAY_MS
    watermark = landed_watermark_ms(events_dir)
    return watermark is not None and watermark >= end + lateness_ms, watermark


def read_event_ids(events_dir: Path, day: str) -> set[str]:
    """Every event_id already landed for a day (only that column is read)."""
    ids: set[str] = set()
    for p in landed_parts(events_dir, day):
        ids.update(pq.read_table(p.path, columns=["event_id"]).column(0).to_pylist())
    return ids


def read_landed_day(events_dir: Path, day: str) -> Events:
    """All events landed for a UTC day, deduplicated by event_id (first kept), by time."""
    parse_day(day)  # a malformed day is a usage error, not an empty partition
    parts = landed_parts(events_dir, day)
    if not parts:
        raise FileNotFoundError(f"no landed events for {day} under {events_dir} "
                                f"(is the lander running? landed days: "
                                f"{', '.join(landed_days(events_dir)) or 'none'})")
    table = pa.concat_tables([pq.read_table(p.path, schema=SCHEMA) for p in parts])
    ids = table.column("event_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    table = table.take(pa.array(np.sort(first)))
    values = pc.fill_null(table.column("value"), np.nan)
    events = Events.from_columns(
        event_id=table.column("event_id").to_numpy(zero_copy_only=False),
        user_id=table.column("user_id").to_numpy(zero_copy_only=False),
        item_id=table.column("item_id").to_numpy(zero_copy_only=False),
        event_type=table.column("event_type").to_numpy(zero_copy_only=False),
        value=values.to_numpy(zero_copy_only=False),
        ts_ms=table.column("ts_ms").to_numpy())
    return events.sorted_by_time()


class LandedIndex:
    """Which offsets of each (day, partition) are already in a landed file, from file names.

    A flush writes, per partition, one file for every day its records fall on, so a
    record is landed iff its offset lies in a file range of its own day. (The highest
    landed offset alone is not enough: a crash between two files of one flush leaves
    lower offsets of the other day unlanded.)
    """

    def __init__(self, events_dir: Path) -> None:
        self.events_dir = events_dir
        self._ranges: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self._max: dict[int, int] = {}
        self.rescan()

    def rescan(self) -> None:
        """Re-read the file names (another lander may have landed since)."""
        self._ranges.clear()
        self._max.clear()
        for p in landed_parts(self.events_dir):
            self.add(p.day, p.partition, p.first_offset, p.last_offset)

    def add(self, day: str, partition: int, first_offset: int, last_offset: int) -> None:
        """Record a file just landed."""
        bisect.insort(self._ranges.setdefault((day, partition), []), (first_offset, last_offset))
        self._max[partition] = max(self._max.get(partition, -1), last_offset)

    def covers(self, day: str, partition: int, offset: int) -> bool:
        """True when a landed file of ``day`` holds ``offset`` of ``partition`` in its range."""
        if offset > self._max.get(partition, -1):
            return False  # the steady state: a record newer than anything landed
        ranges = self._ranges.get((day, partition), [])
        i = bisect.bisect_right(ranges, (offset, float("inf"))) - 1
        return i >= 0 and ranges[i][1] >= offset
