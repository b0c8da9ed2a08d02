"""What the lander lands: events buffered by (UTC day, partition), each event id once per
day, written as Parquet part files under ``events/date=YYYY-MM-DD/`` (the format is
``common.data.landed``'s, which reads them back).

A part is written to a temp file, fsynced and renamed, then its directory is fsynced:
a crash leaves the whole file or none (the lander removes temp files left behind).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.data.events import format_day
from common.data.landed import SCHEMA, LandedIndex, day_dir, part_name, read_event_ids
from common.data.wire import WireEvent
from common.infra.atomic import atomic_writer, fsync_dir

# Event-id sets of this many recently touched days stay in memory; an older day
# touched again (a late event) is re-read from its files.
_CACHED_DAYS = 4
Row = tuple[WireEvent, int]  # an event and its Kafka offset


class LanderError(RuntimeError):
    """The lander cannot land safely; the message says what to do."""


def write_part(events_dir: Path, day: str, partition: int, rows: list[Row]) -> Path:
    """Write one day's rows of one partition: temp file, fsync, rename, fsync the directory."""
    directory = day_dir(events_dir, day)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)  # the new date= entry must survive a crash too
    path = directory / part_name(partition, rows[0][1], rows[-1][1])
    if path.exists():
        # Same day, partition and offsets already landed: only a recreated topic
        # (offsets restarted) gets here, and overwriting would lose the old rows.
        raise LanderError(f"{path} already exists: was the topic recreated? Move "
                          f"{events_dir} aside (or land into a new RECSTREAM_HOME)")
    events = [e for e, _ in rows]
    table = pa.Table.from_pydict({
        "event_id": [e.event_id for e in events], "user_id": [e.user_id for e in events],
        "item_id": [e.item_id for e in events], "event_type": [e.event_type for e in events],
        "value": [e.value for e in events], "ts_ms": [e.ts_ms for e in events],
        "context": [json.dumps(dict(e.context)) if e.context else None for e in events],
        "kafka_partition": [partition] * len(rows), "kafka_offset": [o for _, o in rows],
    }, schema=SCHEMA)
    with atomic_writer(path) as fh:
        pq.write_table(table, fh)
    return path


class Taken(Enum):
    """What became of an event handed to ``Parts.add``."""

    BUFFERED = "buffered"
    ALREADY_LANDED = "already_landed"  # this very record is in a landed file (re-read)
    DUPLICATE = "duplicate"  # its event id is landed or buffered already (a retry)


class Parts:
    """Events read but not yet landed, by (day, partition), and the event ids landed or
    buffered per day."""

    def __init__(self, events_dir: Path) -> None:
        self.events_dir = events_dir
        self.rows = 0  # buffered
        self._buffer: dict[tuple[str, int], list[Row]] = {}
        self._index = LandedIndex(events_dir)
        self._seen: OrderedDict[str, set[str]] = OrderedDict()  # day -> landed + buffered ids

    def add(self, partition: int, offset: int, event: WireEvent) -> Taken:
        """Buffer the event read at ``offset`` of ``partition``, unless its id is known."""
        day = format_day(event.ts_ms)
        seen = self._seen_ids(day)
        if event.event_id in seen:
            return (Taken.ALREADY_LANDED if self._index.covers(day, partition, offset)
                    else Taken.DUPLICATE)
        seen.add(event.event_id)
        self._buffer.setdefault((day, partition), []).append((event, offset))
        self.rows += 1
        return Taken.BUFFERED

    def _seen_ids(self, day: str) -> set[str]:
        ids = self._seen.get(day)
        if ids is None:
            ids = self._seen[day] = read_event_ids(self.events_dir, day)
        self._seen.move_to_end(day)
        return ids

    def write(self, landed: Callable[[list[Row]], None]) -> None:
        """Write every buffered (day, partition) durably, calling ``landed`` with the rows
        of each file written; then the buffer is empty."""
        for (day, partition), rows in sorted(self._buffer.items()):
            write_part(self.events_dir, day, partition, rows)
            self._index.add(day, partition, rows[0][1], rows[-1][1])
            landed(rows)
        self._buffer.clear()
        self.rows = 0
        while len(self._seen) > _CACHED_DAYS:  # the buffer is empty: any day may go
            self._seen.popitem(last=False)

    def drop(self) -> None:
        """Forget the buffer without writing it (its records will be re-read)."""
        self._buffer.clear()
        self.rows = 0
        self._seen.clear()  # it held the dropped rows' ids

    def rescan(self) -> None:
        """Learn what other landers landed meanwhile (partitions moved)."""
        self._index.rescan()
        self._seen.clear()
