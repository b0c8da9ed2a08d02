"""The offsets a trainer's state includes, and committing them to its group.

Per partition, the state includes every record before an offset (the next one it reads
there). The checkpoint, not the group's committed offsets, decides where a restart
resumes; a commit tells the group (and its lag) how far the published state has got.

>>> import numpy as np
>>> from common.data.events import Events
>>> def chunk(partition, first, n):
...     offsets = np.arange(first, first + n, dtype=np.int64)
...     return Chunk(partition, offsets, offsets, np.ones(n, bool), Events.empty())
>>> chunks = [chunk(0, 10, 3), chunk(1, 0, 2), chunk(0, 13, 1)]
>>> first_seen(chunks, {0: 10})
{1: 0}
>>> offsets_after({0: 10, 1: 0, 2: 7}, chunks)
{0: 14, 1: 2, 2: 7}
"""

from __future__ import annotations

import logging
from typing import Any

from kafka import TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from stream.intake import Chunk
from stream.time_index import TimeIndex

log = logging.getLogger(__name__)


def first_seen(chunks: list[Chunk], offsets: dict[int, int]) -> dict[int, int]:
    """The first offset read of each partition in ``chunks`` that ``offsets`` lacks."""
    first: dict[int, int] = {}
    for c in chunks:
        if c.partition not in offsets and len(c):
            first.setdefault(c.partition, int(c.offsets[0]))
    return first


def offsets_after(offsets: dict[int, int], chunks: list[Chunk]) -> dict[int, int]:
    """``offsets`` moved past every record of ``chunks`` (in offset order per partition)."""
    after = dict(offsets)
    for c in chunks:
        if len(c):
            after[c.partition] = int(c.offsets[-1]) + 1
    return after


def index_times(time_index: TimeIndex, chunks: list[Chunk]) -> None:
    """Record where each partition's events in ``chunks`` start and how recent they reach."""
    first: dict[int, int] = {}
    max_ts: dict[int, int] = {}
    for c in chunks:
        if c.n_events:
            first.setdefault(c.partition, int(c.offsets[c.valid][0]))
            max_ts[c.partition] = max(max_ts.get(c.partition, 0), int(c.events.ts_ms.max()))
    for p, off in first.items():
        time_index.add(p, off, max_ts[p])


def commit(consumer: Any, topic: str, offsets: dict[int, int]) -> None:
    """Commit the offsets of the partitions the group consumer holds now; a failure is
    logged, not raised."""
    assigned = {tp.partition for tp in consumer.assignment()}
    to_commit = {TopicPartition(topic, p): OffsetAndMetadata(o, "", -1)
                 for p, o in offsets.items() if p in assigned}
    try:
        consumer.commit(to_commit)
    except (CommitFailedError, KafkaError) as exc:
        # The checkpoint, not the group's offsets, decides where a restart resumes.
        log.warning("offset commit failed", extra={"error": str(exc)})
