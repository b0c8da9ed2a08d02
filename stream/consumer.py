"""The trainer consumer: micro-batches from Kafka → embedding-only step → publish → commit.

Here: start and stop, group membership, the poll loop. Elsewhere: the steps and the
rules they keep (``stream.steps``), the state (``stream.state``), offsets and commits
(``stream.offsets``), publish retries (``stream.publishing``), what a started trainer
holds (``stream.lifecycle``), the rebase (``stream.rebase``).

A trainer runs once: constructed without side effects, ``start()`` (or ``with``), then
``run()``, which checkpoints and closes on the way out (``close()`` again: nothing).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer

from common.data.dataset import Dataset
from common.infra.settings import Settings
from common.infra.settings_groups import KafkaSettings, StreamSettings, TrainSettings
from common.infra.shutdown import StopFlag
from common.infra.telemetry import Heartbeat
from common.model.registry import Registry
from publisher.base import Delta, Publisher
from stream.buffer import Buffer
from stream.feed import Feed
from stream.intake import Intake
from stream.learner import StreamLearner, stream_train_settings
from stream.lifecycle import Clients
from stream.metrics import Recent, TrainerMetrics
from stream.offsets import commit
from stream.publishing import RETRY_MAX_S, Publishing, StepAbandonedError
from stream.rebase import Rebaser
from stream.state import restore
from stream.steps import Steps
from stream.time_index import TimeIndex

log = logging.getLogger(__name__)
_KEEPALIVE_EVERY_S = 0.1  # rebalances are seen at most this late
_PUBLISH_FAILING_S = 60.0  # publishing failed this long: /healthz says unhealthy


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: TrainerConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner.on_revoked(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner.on_assigned(assigned)


class TrainerConsumer:
    """Consumer group ``trainer`` on the interactions topic; its state (model rows and
    what they include) lives in ``ckpt_dir``."""

    # From start() on:
    consumer: KafkaConsumer  # the group member; it never fetches
    intake: Intake
    feed: Feed
    steps: Steps

    def __init__(self, dataset: Dataset, publisher: Publisher, registry: Registry,
                 ckpt_dir: Path, *, kafka: KafkaSettings, bootstrap: str,
                 stream: StreamSettings, train: TrainSettings,
                 metrics: TrainerMetrics | None = None, stop: StopFlag | None = None) -> None:
        self.dataset, self.publisher, self.registry = dataset, publisher, registry
        self.ckpt_dir, self.kafka, self.bootstrap = ckpt_dir, kafka, bootstrap
        self.stream, self.train = stream, train  # train: the stream's (stream_train_settings)
        self.metrics = metrics or TrainerMetrics()
        self.stop = stop or StopFlag()
        self.buffer = Buffer()
        self.freshness = Recent(1_000_000)  # per event, for benchmarks
        # The loop may be silent for the group's poll limit plus one publish retry wait.
        self.heartbeat = Heartbeat(kafka.max_poll_interval_ms / 1000 + RETRY_MAX_S)
        self.publishing = Publishing(publisher, self.metrics, self.stop, self.keepalive)
        self.max_steps: int | None = None
        self._clients: Clients | None = None
        self.rebaser = Rebaser(registry, publisher, self._learner, kafka, bootstrap,
                               stream.max_batch_events, self.metrics)
        self._next_rebase_check = self._next_lag_update = self._next_keepalive = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, dataset: Dataset, publisher: Publisher,
                      bootstrap: str, metrics: TrainerMetrics | None = None,
                      stop: StopFlag | None = None) -> TrainerConsumer:
        """A trainer with ``settings``' groups and its state under ``settings.home``."""
        return cls(dataset, publisher, Registry(settings.models_dir),
                   settings.checkpoints_dir / "trainer", kafka=settings.kafka,
                   bootstrap=bootstrap, stream=settings.stream,
                   train=stream_train_settings(settings), metrics=metrics, stop=stop)

    # -- start and stop -----------------------------------------------------------------

    def start(self) -> None:
        """Take the home's lock (``TrainerLockedError`` if another trainer holds it), open
        the clients, threads and fetch process, restore the state to train on."""
        if self._clients is not None:
            raise RuntimeError("a trainer starts once")
        self.heartbeat.beat()
        clients = Clients.open(self.kafka, self.bootstrap, self.stream, self.ckpt_dir,
                               self.metrics)
        try:
            state = restore(self.ckpt_dir, self.registry, self._learner, self.metrics)
        except BaseException:
            clients.close()
            raise
        self._clients = clients
        self.metrics.version.info({"version": state.learner.version})
        self.consumer, self.intake, self.feed = clients.consumer, clients.intake, clients.feed
        self.steps = Steps(state, self.stream, self.publishing, clients.intake,
                            functools.partial(commit, clients.consumer, self.kafka.topic),
                            clients.learner_thread, clients.writer, self.metrics,
                            self.freshness)

    def __enter__(self) -> TrainerConsumer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what ``start`` opened (again: nothing); raises a failed last save."""
        if self._clients is not None:
            self._clients.close()

    def _learner(self, bundle: Any, version: str) -> StreamLearner:
        return StreamLearner(bundle, self.dataset, self.train, version, self.stream,
                             self.publisher)

    # -- what a started trainer has ----------------------------------------------------

    @property
    def learner(self) -> StreamLearner:
        return self.steps.state.learner

    @property
    def offsets(self) -> dict[int, int]:
        """Per partition, the next offset the learned state includes."""
        return self.steps.state.offsets

    @property
    def time_index(self) -> TimeIndex:
        return self.steps.state.time_index

    @property
    def step_no(self) -> int:
        return self.steps.state.step_no

    @property
    def events_applied(self) -> int:
        return self.steps.state.events_applied

    # Both hooks run on kafka-python's IO thread, where blocking consumer calls (commit,
    # position) are not allowed: they only pause, drop and checkpoint. The group consumer
    # never fetches (its partitions stay paused): the fetch process reads, from the
    # state's offsets, once the trainer's loop hands it the new assignment
    # (``Feed.reassign``).

    def on_assigned(self, assigned: Any) -> None:
        """Pause the partitions and have them read from the state's offsets."""
        self.consumer.pause(*assigned)
        with self.feed.lock:
            self.feed.changed()
        log.info("partitions assigned", extra={"partitions": sorted(t.partition
                                                                    for t in assigned)})

    def on_revoked(self, revoked: Any) -> None:
        """Drop what is buffered (it is re-read from the state's offsets) and checkpoint."""
        with self.feed.lock:
            self.buffer.clear()
            self.feed.changed()  # what the fetch process still sends for them is dropped
        if self.steps.pending is None:  # mid-step the learner holds an unpublished update
            self.steps.checkpoint()

    # -- the loop -----------------------------------------------------------------------

    def run(self, max_steps: int | None = None) -> None:
        """Poll, step, publish, commit until stopped (or ``max_steps``); then checkpoint
        (``Steps.last_checkpoint``) and close."""
        if self._clients is None:
            raise RuntimeError("start() the trainer before run()")
        steps = self.steps
        self.consumer.subscribe([self.kafka.topic], listener=_Rebalance(self))
        self.max_steps = max_steps
        try:
            while not self.stop.is_set() and not self._enough_steps():
                self.poll_once()
            steps.finish(block=True)
            if self.buffer and not self._enough_steps():
                steps.step(self.buffer.take(self.buffer.events))
        except StepAbandonedError:
            log.warning("stopped with an unpublished step: nothing committed or checkpointed; "
                        "a restart replays it")
        finally:
            try:
                steps.last_checkpoint()
            finally:
                self.close()

    def poll_once(self) -> None:
        """One poll and whatever steps, rebases and gauges are due."""
        self.heartbeat.beat()
        steps, stream = self.steps, self.stream
        steps.writer.written(block=False)  # a failed save stops the trainer here
        self._receive()
        steps.finish(block=False)
        if steps.pending is not None and self.buffer.events >= stream.max_batch_events:
            # The next batch is ready: polling further only takes the GIL from the learner.
            steps.finish(block=True)
        if steps.pending is None and self.buffer.due(stream.update_interval_s,
                                                     stream.max_batch_events) \
                and not self._enough_steps():
            steps.start(self.buffer.take(stream.max_batch_events))
        now = time.monotonic()
        if now >= self._next_rebase_check:
            self._next_rebase_check = now + stream.rebase_check_s
            self.rebaser.check(self)
        if now >= self._next_lag_update:
            self._next_lag_update = now + 1.0
            self._update_lag()

    def _receive(self) -> None:
        """Keep the group membership, hand a new assignment to the fetch process, and
        take in what it read."""
        # While joining, the group consumer's poll is where the time goes; once assigned,
        # the wait is for the fetch process.
        assigned = bool(self.consumer.assignment())
        now = time.monotonic()
        if not assigned or now >= self._next_keepalive:
            # kafka-python's poll costs ~3 ms even with nothing to return: a few per
            # second keep the membership, on every loop they took a core's fifth.
            self._next_keepalive = now + _KEEPALIVE_EVERY_S
            self.keepalive(timeout_ms=0 if assigned else self.stream.poll_timeout_ms)
        feed = self.feed
        feed.reassign(self.consumer, self.steps.reading_from())
        timeout_s = self.stream.poll_timeout_ms / 1000 if assigned else 0.0
        # Back-pressure: a pipe not read blocks the fetch process.
        while self.buffer.events < 2 * self.stream.max_batch_events:
            fetched = feed.receive(timeout_s)
            if fetched is None:
                return
            timeout_s = 0.0
            with feed.lock:
                if fetched.generation == feed.generation:  # else a rebalance voided it
                    self.buffer.add(self.intake.accept(fetched))

    def _enough_steps(self) -> bool:
        return self.max_steps is not None and self.step_no >= self.max_steps

    def keepalive(self, timeout_ms: int = 0) -> None:
        """Poll the group consumer: stays in the group (rebalances happen here).

        Its partitions are paused, so it returns nothing; should a partition slip through
        unpaused, what it returned is pushed back (seek) so that nothing is skipped.
        """
        self.heartbeat.beat()
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms).items():
            if records:
                self.consumer.seek(tp, records[0].offset)

    def publish(self, delta: Delta) -> None:
        """Publish with backoff until it succeeds, staying in the group meanwhile."""
        self.publishing.publish(delta)

    def health(self) -> str | None:
        """Why the trainer is unhealthy (its ``/healthz``), or None: its loop is stuck, or
        its deltas have failed to publish for over a minute."""
        stuck = self.heartbeat.check()
        if stuck is not None:
            return stuck
        failing = self.publishing.failing()
        if failing is not None:
            since, error = failing
            failing_s = time.monotonic() - since
            if failing_s > _PUBLISH_FAILING_S:
                return f"publishing has failed for {failing_s:.0f} s: {error}"
        return None

    def _update_lag(self) -> None:
        assigned = {tp.partition for tp in self.consumer.assignment()}
        for partition, lag in self.feed.lag().items():
            if partition in assigned:
                self.metrics.lag.labels(str(partition)).set(lag)

    # -- what a rebase needs (stream.rebase.Rebased) ---------------------------------------

    def settle(self) -> None:
        """Finish the step in flight, then step what is buffered."""
        self.steps.finish(block=True)
        if self.buffer:
            self.steps.step(self.buffer.take(self.buffer.events))

    def switch(self, learner: StreamLearner) -> None:
        """Train ``learner`` from now on."""
        self.steps.state.learner = learner
        self.metrics.version.info({"version": learner.version})

    def checkpoint(self) -> None:
        self.steps.checkpoint(force=True)
