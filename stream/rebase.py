"""Rebase: carry what the stream learned after a new version's cutoff onto that version.

The nightly trains V on the landed data through cutoff T. The stream has meanwhile
applied the events after T to the old version; ``replay_since`` reads them again from
Kafka (offsets from the consumer's own time index, never ListOffsets) up to the
offsets the old state includes, applies them to V in order and publishes the deltas
into V's namespace. Only then does the stream switch, and tell the publisher that V
may be flipped to champion.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kafka import TopicPartition

from common.data.wire import WireEvent, decode_event, to_events
from common.infra.kafka_clients import make_consumer
from common.model.registry import CorruptVersionError, Registry
from publisher.base import Publisher
from stream.learner import StreamLearner

if TYPE_CHECKING:
    from stream.consumer import TrainerConsumer

log = logging.getLogger(__name__)


class RebaseError(RuntimeError):
    """The replay onto a new version could not complete; the version is not switched to."""
_IDLE_GIVE_UP_S = 30.0
REBASE_KINDS = ("nightly",)


def newer_version(registry: Registry, current: str, skip: set[str],
                  ready: Callable[[str], bool]) -> str | None:
    """The newest intact nightly version registered after ``current`` that is published
    (``ready``) and not in ``skip``, if any."""
    for version in reversed([v for v in registry.versions() if v > current]):
        if version in skip:
            continue
        try:
            if registry.meta(version).get("kind") in REBASE_KINDS and ready(version):
                return version
        except CorruptVersionError as exc:
            log.error("ignoring a corrupt version", extra={"version": version,
                                                           "error": str(exc)})
            skip.add(version)
    return None


def target_version(registry: Registry, publisher: Publisher, current: str,
                   skip: set[str]) -> str | None:
    """The version the stream should move to, if not ``current``: a newer published
    nightly (it awaits its rebase before promotion), else the released champion when
    ``current`` was rolled back from or is older than it."""
    withdrawn = publisher.withdrawn()
    newer = newer_version(registry, current, skip,
                          lambda v: v not in withdrawn and publisher.ready(v))
    if newer is not None:
        return newer
    champion = publisher.champion()
    if champion is not None and champion != current and champion not in skip and (
            current in withdrawn or champion > current):
        return champion
    return None


def _ranges(owner: TrainerConsumer, cutoff_ms: int) -> dict[TopicPartition, tuple[int, int]]:
    ranges = {}
    for p, end in owner.offsets.items():
        start = owner.time_index.offset_for(p, cutoff_ms)
        if start is None or start >= end:
            continue
        if not owner.time_index.covers(p, cutoff_ms):
            log.warning("time index does not reach back to the cutoff; replaying what it has",
                        extra={"partition": p, "cutoff_ms": cutoff_ms})
        ranges[TopicPartition(owner.topic, p)] = (start, end)
    return ranges


def replay_since(owner: TrainerConsumer, learner: StreamLearner, cutoff_ms: int) -> int:
    """Apply the consumed events with ``ts >= cutoff_ms`` to ``learner``; returns how many."""
    ranges = _ranges(owner, cutoff_ms)
    if not ranges:
        return 0
    reader = make_consumer(owner.s.kafka, owner.bootstrap, group_id=None)
    try:
        reader.assign(list(ranges))
        for tp, (start, _) in ranges.items():
            reader.seek(tp, start)
        return _drain(owner, learner, reader, ranges, cutoff_ms)
    finally:
        reader.close()


def _drain(owner: TrainerConsumer, learner: StreamLearner, reader: object,
           ranges: dict[TopicPartition, tuple[int, int]], cutoff_ms: int) -> int:
    pending: list[WireEvent] = []
    done: set[TopicPartition] = set()
    # What the new version includes so far: the start of each range, then past each read.
    reached = {tp.partition: start for tp, (start, _) in ranges.items()}
    replayed, batches, last_data, last_alive = 0, 0, time.monotonic(), time.monotonic()
    max_bytes, batch = owner.s.kafka.max_message_bytes, owner.s.stream.max_batch_events
    while len(done) < len(ranges):
        for tp, records in reader.poll(timeout_ms=200).items():  # type: ignore[attr-defined]
            last_data = time.monotonic()
            end = ranges[tp][1]
            for r in records:
                if r.offset >= end:
                    break
                reached[tp.partition] = r.offset + 1
                try:
                    event = decode_event(r.value, max_bytes)
                except Exception:  # noqa: BLE001 - dead-lettered when first consumed
                    continue
                if event.ts_ms >= cutoff_ms:
                    pending.append(event)
            if reader.position(tp) >= end:  # type: ignore[attr-defined]
                done.add(tp)
        if len(pending) >= batch or (pending and len(done) == len(ranges)):
            batches += 1
            replayed += _apply(owner, learner, pending, reached, batches)
            pending = []
        if time.monotonic() - last_alive > 1.0:
            owner.keepalive()
            last_alive = time.monotonic()
        if time.monotonic() - last_data > _IDLE_GIVE_UP_S:
            raise RebaseError(f"replay onto {learner.version} stalled after {replayed} events "
                              "(did the broker lose data?)")
    return replayed + (_apply(owner, learner, pending, reached, batches + 1) if pending else 0)


def _apply(owner: TrainerConsumer, learner: StreamLearner, events: list[WireEvent],
           reached: dict[int, int], batch_no: int) -> int:
    # Seeded apart from the live steps' numbers so grown rows differ between batches.
    out = learner.step(to_events(events), -batch_no)
    owner.publish(out.delta(learner.version, dict(reached), max(e.ts_ms for e in events),
                            owner.step_no))
    return len(events)
