"""The trainer's buffer of decoded chunks: steps take a prefix of each partition."""

from __future__ import annotations

import numpy as np
import pytest

import stream.buffer as buffer_module
from common.data.events import Events
from stream.buffer import Buffer
from stream.intake import Chunk


def _chunk(partition: int, first_offset: int, valid: list[bool]) -> Chunk:
    n = sum(valid)
    obj = np.array([f"e{first_offset + k}" for k in range(n)], dtype=object)
    events = Events(obj, obj, obj, np.array(["click"] * n, dtype=object),
                    np.full(n, np.nan, np.float32), np.arange(n, dtype=np.int64))
    offsets = np.arange(first_offset, first_offset + len(valid), dtype=np.int64)
    return Chunk(partition, offsets, offsets * 10, np.array(valid), events)


def test_take_stops_at_the_limit_and_keeps_the_rest_in_order() -> None:
    buffer = Buffer()
    buffer.add(_chunk(0, 0, [True, True, True]))
    buffer.add(_chunk(1, 5, [True, True]))
    taken = buffer.take(4)
    assert [(c.partition, c.offsets.tolist()) for c in taken] == [(0, [0, 1, 2]), (1, [5])]
    assert sum(c.n_events for c in taken) == 4 and buffer.events == 1
    assert [(c.partition, c.offsets.tolist(), c.events.event_id.tolist())
            for c in buffer.chunks] == [(1, [6], ["e6"])]


def test_dead_letters_after_the_last_event_taken_go_with_it() -> None:
    buffer = Buffer()
    buffer.add(_chunk(0, 0, [True, False, False, True]))
    buffer.add(_chunk(1, 0, [False, False]))
    head = buffer.take(1)
    assert [c.offsets.tolist() for c in head] == [[0, 1, 2]]
    rest = buffer.take(1)
    assert [(c.partition, c.offsets.tolist()) for c in rest] == [(0, [3]), (1, [0, 1])]
    assert not buffer and buffer.events == 0


def test_a_step_is_due_at_max_events_or_after_the_interval() -> None:
    buffer = Buffer()
    assert not buffer.due(0.0, 10)
    buffer.add(_chunk(0, 0, [True] * 3))
    assert buffer.due(0.0, 10) and buffer.due(60.0, 3) and not buffer.due(60.0, 4)


class _Clock:
    """Stands in for ``time`` in stream.buffer: monotonic and wall time move together."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize(("in_flight_s", "due_after_s"), [
    (0.0, 1.0),   # fetched the moment it was sent: the whole interval
    (0.3, 0.7),   # 0.3 s on the way already: 0.3 s sooner
    (5.0, 0.5),   # looks 5 s old (a producer's clock behind): at most half the interval
    (-2.0, 1.0),  # from a clock ahead (sent "in the future"): no credit
])
def test_the_interval_counts_the_time_the_oldest_record_was_on_the_way(
        monkeypatch: pytest.MonkeyPatch, in_flight_s: float, due_after_s: float) -> None:
    clock = _Clock()
    monkeypatch.setattr(buffer_module, "time", clock)
    chunk = _chunk(0, 0, [True] * 3)
    sent_ms = int((clock.now - in_flight_s) * 1000)
    buffer = Buffer()
    buffer.add(Chunk(0, chunk.offsets, np.array([sent_ms + 40, sent_ms, sent_ms + 80]),
                     chunk.valid, chunk.events))
    clock.now += due_after_s - 0.01
    assert not buffer.due(1.0, 100)
    clock.now += 0.02
    assert buffer.due(1.0, 100)
    buffer.add(_chunk(1, 0, [True]))  # arrives meanwhile; stays after the step
    buffer.take(3)
    assert buffer.events == 1  # what stays was read during that step: the whole interval
    clock.now += 0.99
    assert not buffer.due(1.0, 100)
    clock.now += 0.02
    assert buffer.due(1.0, 100)


def test_records_without_a_timestamp_or_dead_lettered_give_no_credit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(buffer_module, "time", clock)
    chunk = _chunk(0, 0, [True, True, False])
    old_ms = int((clock.now - 0.4) * 1000)  # only the dead letter is old
    buffer = Buffer()
    buffer.add(Chunk(0, chunk.offsets, np.array([-1, 0, old_ms]), chunk.valid, chunk.events))
    clock.now += 0.99
    assert not buffer.due(1.0, 100)
    clock.now += 0.02
    assert buffer.due(1.0, 100)
