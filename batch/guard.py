"""Guard after promotion: a new champion that does worse live than the one it replaced
is rolled back automatically.

After a promotion the guard reads the interactions topic from where it ended at that
moment, takes the first ``nightly.guard_events`` positives, and scores the new and the
previous champion on exactly those events (prequential Recall@K, K from the gate
metric, seen items excluded as serving does; the registry's models, which do not
learn). Below the previous figure by more than ``nightly.guard_tolerance`` it rolls
back to the previous version, which withdraws the new one, but only while the
release is still exactly (champion = new, previous = previous): an operator's promote
or rollback in the meantime wins. Too few events before ``nightly.guard_timeout_s``:
no decision, nothing changes.

Start positions are partition ends read from a fetch response's high watermark, not
``end_offsets()`` (ListOffsets is wrong on the embedded broker; ARCHITECTURE, broker
facts).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from common.data.dataset import Dataset
from common.data.events import Events
from common.data.wire import InvalidEventError, WireEvent, decode_event, to_events
from common.evaluation.prequential import prequential_arms
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.kafka_clients import make_consumer
from common.infra.settings_groups import (
    EvalSettings,
    KafkaSettings,
    NightlySettings,
    TrainSettings,
)
from common.model.bundle import Features
from common.model.registry import RegistryError
from publisher.base import PublishError
from publisher.control import ReleaseControl
from publisher.redis_users import VersionStateError

log = logging.getLogger(__name__)

DECISIONS = ("keep", "rollback", "undecided")
# An automatic rollback is an alert; a check that could not decide deserves a look.
_LEVELS = {"keep": logging.INFO, "rollback": logging.ERROR, "undecided": logging.WARNING}


class GuardError(RuntimeError):
    """The guard cannot find where the interactions topic ends (no such topic?)."""


class GuardMetrics:
    """The guard's figures, registered on the registry of the daemon that runs it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.auto_rollbacks = Counter(
            "recstream_auto_rollbacks", "Champions rolled back automatically because they "
            "did worse live than the version they replaced", registry=registry)
        self.checks = Counter("recstream_guard_checks", "Guard checks after a promotion by "
                              "decision", ["decision"], registry=registry)
        for decision in DECISIONS:
            self.checks.labels(decision)
        self.recall = Gauge("recstream_guard_recall", "Prequential recall of the new "
                            "champion and of the previous version on the guard's events",
                            ["model"], registry=registry)


@dataclass(frozen=True)
class GuardResult:
    """What a check found: ``decision`` is keep, rollback or undecided, ``reason`` why."""

    version: str
    previous: str
    decision: str
    reason: str
    events: int = 0  # positives read after the promotion
    scored: int = 0  # of them, those scored (item in the catalogue, not seen before)
    champion_recall: float = float("nan")
    previous_recall: float = float("nan")
    k: int = 0


def stream_end_offsets(ks: KafkaSettings, bootstrap: str,
                       timeout_s: float = 30.0) -> dict[int, int]:
    """Where each partition of the interactions topic ends now: the guard's start."""
    consumer = make_consumer(ks, bootstrap, group_id=None,
                             max_partition_fetch_bytes=64 * 1024, fetch_max_wait_ms=100)
    deadline = time.monotonic() + timeout_s
    try:
        partitions = consumer.partitions_for_topic(ks.topic)
        if not partitions:
            raise GuardError(f"topic {ks.topic!r} has no partitions (does it exist?)")
        tps = [TopicPartition(ks.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, 0)  # any fetch answers with the high watermark
        while any(consumer.highwater(tp) is None for tp in tps):
            if time.monotonic() > deadline:
                raise GuardError(f"no fetch answer from {ks.topic!r} within {timeout_s:g} s")
            consumer.poll(timeout_ms=100)
        return {tp.partition: int(consumer.highwater(tp)) for tp in tps}
    finally:
        consumer.close()


class PromotionGuard:
    """Checks a promotion on live events and rolls back a champion that does worse.

    Its knobs are ``ns.guard_*``; it reads the interactions topic with ``ks`` from
    ``bootstrap``, takes K from the gate metric in ``es``, and counts as positives the
    events ``ts.rating_threshold`` says are."""

    def __init__(self, ns: NightlySettings, es: EvalSettings, ts: TrainSettings,
                 ks: KafkaSettings, bootstrap: str, dataset: Dataset,
                 control: ReleaseControl, metrics: GuardMetrics | None = None) -> None:
        self.ns, self.es, self.ts, self.ks, self.bootstrap = ns, es, ts, ks, bootstrap
        self.dataset, self.control = dataset, control
        self.metrics = metrics or GuardMetrics(CollectorRegistry())

    @property
    def k(self) -> int:
        """K of the gate metric (``recall@50`` → 50); the largest ``eval.ks`` without one."""
        _, _, k = self.es.gate_metric.partition("@")
        return int(k) if k.isdigit() else max(self.es.ks)

    def check(self, version: str, previous: str, start_offsets: dict[int, int],
              keep_waiting: Callable[[], bool] = lambda: True) -> GuardResult:
        """Wait for the first ``guard_events`` positives after ``start_offsets`` (partition
        → offset), score both versions on them, keep or roll back. Blocks up to
        ``guard_timeout_s``; ``keep_waiting`` turning false (a shutdown) ends the wait."""
        n = self.ns.guard_events
        if n == 0:
            return GuardResult(version, previous, "undecided", "guard off (guard_events=0)")
        events, positives = self._collect(start_offsets, n, keep_waiting)
        if positives < n:
            result = GuardResult(version, previous, "undecided",
                                 f"only {positives} of {n} positives streamed in before the "
                                 f"guard stopped waiting (timeout "
                                 f"{self.ns.guard_timeout_s:g} s)", positives, k=self.k)
        else:
            result = self._judge(version, previous, events, positives)
        self.metrics.checks.labels(result.decision).inc()
        log.log(_LEVELS[result.decision], "promotion guard",
                extra={"version": version, "previous": previous,
                       "decision": result.decision, "reason": result.reason})
        return result

    def _collect(self, start_offsets: dict[int, int], n: int,
                 keep_waiting: Callable[[], bool]) -> tuple[Events, int]:
        """The events read from ``start_offsets`` up to the ``n``-th positive (or all read
        by the timeout), with their number of positives."""
        ks, deadline = self.ks, time.monotonic() + self.ns.guard_timeout_s
        consumer = make_consumer(ks, self.bootstrap, group_id=None)
        read: list[Events] = []
        positives = 0
        try:
            _assign(consumer, ks.topic, start_offsets)
            while positives < n and time.monotonic() < deadline and keep_waiting():
                for records in consumer.poll(timeout_ms=200).values():
                    batch = to_events(e for e in (_decoded(r.value, ks.max_message_bytes)
                                                  for r in records) if e is not None)
                    batch, found = _up_to(batch, n - positives, self.ts.rating_threshold)
                    read.append(batch)
                    positives += found
        finally:
            consumer.close()
        return Events.concat(read), positives

    def _judge(self, version: str, previous: str, events: Events,
               positives: int) -> GuardResult:
        """Score both versions on the events; roll back when the new one is worse."""
        new_r, old_r, scored = self._recalls(version, previous, events)
        self.metrics.recall.labels("champion").set(new_r)
        self.metrics.recall.labels("previous").set(old_r)
        figures = dict(events=positives, scored=scored, champion_recall=new_r,
                       previous_recall=old_r, k=self.k)
        if not (math.isfinite(new_r) and math.isfinite(old_r)):
            return GuardResult(version, previous, "undecided", f"none of the {positives} "
                               "positives could be scored (all seen or not in the catalogue)",
                               **figures)
        tol = self.ns.guard_tolerance
        compared = (f"recall@{self.k} {new_r:.4f} against {previous}'s {old_r:.4f} on "
                    f"{scored} events (tolerance {tol:g})")
        if new_r >= old_r - tol:
            return GuardResult(version, previous, "keep", compared, **figures)
        decision, reason = self._roll_back(version, previous, compared)
        return GuardResult(version, previous, decision, reason, **figures)

    def _recalls(self, version: str, previous: str, events: Events
                 ) -> tuple[float, float, int]:
        catalog = self.dataset.catalog()
        # What a user saw before the first event is filtered out, as serving does, and is
        # the history a model that reads histories starts from.
        seen = self.dataset.events.between(None, int(events.ts_ms.min()))
        arms = {}
        for name, ref in (("champion", version), ("previous", previous)):
            bundle, _ = self.control.registry.load(ref)
            features = Features.build(bundle, self.dataset.users, self.dataset.items)
            arms[name] = TwoTowerScorer(bundle, features, catalog,
                                        rating_threshold=self.ts.rating_threshold, seen=seen)
        out = prequential_arms(arms, _no_learning, catalog, events, (self.k,),
                               rating_threshold=self.ts.rating_threshold, seen=seen)
        new, old = out["champion"][self.k], out["previous"][self.k]
        return new.recall, old.recall, len(new.hit)

    def _roll_back(self, version: str, previous: str, compared: str) -> tuple[str, str]:
        """Roll back to ``previous`` if the release is still the one checked."""
        release = self.control.pub.users.release()
        if (release.champion, release.previous) != (version, previous):
            return "undecided", (f"{compared}, but the release changed meanwhile (champion "
                                 f"{release.champion}, previous {release.previous}); left "
                                 "as it is")
        try:
            self.control.rollback(to=previous, expected=release)
        except (VersionStateError, PublishError, RegistryError) as exc:
            return "undecided", f"{compared}; the rollback failed: {exc}"
        self.metrics.auto_rollbacks.inc()
        return "rollback", f"{compared}: rolled back to {previous}, {version} withdrawn"


def _assign(consumer: KafkaConsumer, topic: str, start_offsets: dict[int, int]) -> None:
    tps = {TopicPartition(topic, p): offset for p, offset in start_offsets.items()}
    consumer.assign(list(tps))
    for tp, offset in tps.items():
        consumer.seek(tp, offset)


def _decoded(raw: bytes | None, max_bytes: int) -> WireEvent | None:
    """The event, or None for a record the stream dead-letters anyway."""
    try:
        return decode_event(raw, max_bytes)
    except InvalidEventError:
        return None


def _up_to(batch: Events, wanted: int, rating_threshold: float) -> tuple[Events, int]:
    """The batch cut after its ``wanted``-th positive, and the positives it keeps."""
    hits = batch.positive_mask(rating_threshold).cumsum()
    if len(hits) and hits[-1] > wanted:
        cut = int((hits >= wanted).argmax()) + 1
        return batch.take(np.arange(cut)), wanted
    return batch, int(hits[-1]) if len(hits) else 0


def _no_learning(events: Events) -> None:
    """The registry's versions are scored as they are: they do not learn."""
