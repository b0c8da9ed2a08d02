"""Rebase: carry what the stream learned after a new version's cutoff onto that version.

The nightly trains V on the landed data through cutoff T. The stream has meanwhile
applied the events after T to the old version; ``replay_since`` reads them again from
Kafka (offsets from the trainer's own time index, never ListOffsets) up to the
offsets the old state includes, applies them to V in order and publishes the deltas
into V's namespace. Only then does the stream switch, and tell the publisher that V
may be flipped to champion.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kafka import TopicPartition

from common.data.wire import WireEvent, decode_event, to_events
from common.infra.kafka_clients import make_consumer
from common.infra.settings_groups import KafkaSettings
from common.model.bundle import ModelBundle
from common.model.registry import CorruptVersionError, Registry, RegistryError
from common.model.training import TrainingDivergedError
from publisher.base import Delta, Publisher, PublishError
from stream.learner import StreamLearner
from stream.metrics import TrainerMetrics
from stream.time_index import TimeIndex

log = logging.getLogger(__name__)
_IDLE_GIVE_UP_S = 30.0
REBASE_KINDS = ("nightly",)


class RebaseError(RuntimeError):
    """The replay onto a new version could not complete; the version is not switched to."""


class Replayed(Protocol):
    """What a replay needs of the trainer whose state it carries over."""

    @property
    def offsets(self) -> Mapping[int, int]:
        """Per partition, the next offset the state includes: where the replay ends."""

    @property
    def time_index(self) -> TimeIndex:
        """Per partition, where the state's events of a given time start."""

    @property
    def step_no(self) -> int:
        """The state's step, recorded in the replayed deltas."""

    def keepalive(self) -> None:
        """Stay in the consumer group while the replay reads."""

    def publish(self, delta: Delta) -> None:
        """Publish a delta, retrying until it goes through."""


class Rebased(Replayed, Protocol):
    """What a rebase needs of the trainer (``stream.consumer.TrainerConsumer`` is one):
    a replay's needs, and switching it to the new version."""

    @property
    def learner(self) -> StreamLearner:
        """The version trained now."""

    def settle(self) -> None:
        """Finish the step in flight and step what is buffered, into the current version."""

    def switch(self, learner: StreamLearner) -> None:
        """Train ``learner`` from now on."""

    def checkpoint(self) -> None:
        """Save the state now (durably)."""


class Rebaser:
    """Moves the trainer onto the version it should train when there is one: a newer
    published nightly, or the champion after a rollback."""

    def __init__(self, registry: Registry, publisher: Publisher,
                 learner_for: Callable[[ModelBundle, str], StreamLearner],
                 kafka: KafkaSettings, bootstrap: str, batch_events: int,
                 metrics: TrainerMetrics) -> None:
        self.registry, self.publisher, self.learner_for = registry, publisher, learner_for
        self.kafka, self.bootstrap, self.batch_events = kafka, bootstrap, batch_events
        self.metrics = metrics
        self._skip: set[str] = set()  # versions a rebase failed on

    def check(self, trainer: Rebased) -> None:
        """Rebase ``trainer`` if a version is due; a failure leaves it where it is."""
        version = None
        try:
            version = target_version(self.registry, self.publisher, trainer.learner.version,
                                     self._skip)
            if version is not None:
                self.rebase(trainer, version)
        except (RegistryError, RebaseError, TrainingDivergedError, PublishError) as exc:
            # The stream carries on with the version it has; the publisher's timeout
            # decides about the new one.
            log.error("rebase failed; staying on the current version",
                      extra={"error": str(exc), "version": trainer.learner.version})
            if version is not None:
                self._skip.add(version)

    def rebase(self, trainer: Rebased, version: str) -> None:
        """Load ``version``, replay every consumed event after its cutoff onto it, switch.

        What is buffered is stepped into the old version first, so the replay covers
        exactly the offsets the old state included; then the new learner takes over.
        The publisher hears of it before the checkpoint: after a crash in between, the
        restart (on the old version) simply rebases again.
        """
        trainer.settle()
        bundle, meta = self.registry.load(version)
        learner = self.learner_for(bundle, version)
        replayed = replay_since(trainer, learner, int(meta["cutoff_ms"]), self.kafka,
                                self.bootstrap, self.batch_events)
        trainer.switch(learner)
        self.publisher.rebased(version, dict(trainer.offsets))
        trainer.checkpoint()
        self.metrics.rebases.inc()
        log.info("rebased", extra={"version": version, "replayed_events": replayed})


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


def _ranges(old: Replayed, topic: str, cutoff_ms: int
            ) -> dict[TopicPartition, tuple[int, int]]:
    ranges = {}
    for p, end in old.offsets.items():
        start = old.time_index.offset_for(p, cutoff_ms)
        if start is None or start >= end:
            continue
        if not old.time_index.covers(p, cutoff_ms):
            log.warning("time index does not reach back to the cutoff; replaying what it has",
                        extra={"partition": p, "cutoff_ms": cutoff_ms})
        ranges[TopicPartition(topic, p)] = (start, end)
    return ranges


def replay_since(old: Replayed, learner: StreamLearner, cutoff_ms: int, kafka: KafkaSettings,
                 bootstrap: str, batch_events: int) -> int:
    """Apply the events ``old`` consumed with ``ts >= cutoff_ms`` to ``learner``, in steps
    of up to ``batch_events``, reading ``kafka.topic``; returns how many."""
    ranges = _ranges(old, kafka.topic, cutoff_ms)
    if not ranges:
        return 0
    reader = make_consumer(kafka, bootstrap, group_id=None)
    try:
        reader.assign(list(ranges))
        for tp, (start, _) in ranges.items():
            reader.seek(tp, start)
        return _drain(old, learner, reader, ranges, cutoff_ms, kafka.max_message_bytes,
                      batch_events)
    finally:
        reader.close()


def _drain(old: Replayed, learner: StreamLearner, reader: Any,
           ranges: dict[TopicPartition, tuple[int, int]], cutoff_ms: int, max_bytes: int,
           batch: int) -> int:
    pending: list[WireEvent] = []
    done: set[TopicPartition] = set()
    # What the new version includes so far: the start of each range, then past each read.
    reached = {tp.partition: start for tp, (start, _) in ranges.items()}
    replayed, batches, last_data, last_alive = 0, 0, time.monotonic(), time.monotonic()
    while len(done) < len(ranges):
        for tp, records in reader.poll(timeout_ms=200).items():
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
            if reader.position(tp) >= end:
                done.add(tp)
        if len(pending) >= batch or (pending and len(done) == len(ranges)):
            batches += 1
            replayed += _apply(old, learner, pending, reached, batches)
            pending = []
        if time.monotonic() - last_alive > 1.0:
            old.keepalive()
            last_alive = time.monotonic()
        if time.monotonic() - last_data > _IDLE_GIVE_UP_S:
            raise RebaseError(f"replay onto {learner.version} stalled after {replayed} events "
                              "(did the broker lose data?)")
    return replayed + (_apply(old, learner, pending, reached, batches + 1) if pending else 0)


def _apply(old: Replayed, learner: StreamLearner, events: list[WireEvent],
           reached: dict[int, int], batch_no: int) -> int:
    # Seeded apart from the live steps' numbers so grown rows differ between batches.
    out = learner.step(to_events(events), -batch_no)
    old.publish(out.delta(learner.version, dict(reached), max(e.ts_ms for e in events),
                          old.step_no))
    return len(events)
