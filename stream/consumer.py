"""The trainer consumer: micro-batches from Kafka → embedding-only step → publish → commit.

Invariants, enforced in ``_step``:

- offsets are committed only after the publisher made the step's delta durable (and
  after the dead letters the step covers were acknowledged);
- a checkpoint holds only state whose deltas were published, with the offsets that
  state includes; a restart restores it and seeks there, so a crash loses no update
  and re-applies only what the lost state had applied (at-least-once publishing,
  harmless because publishing overwrites).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from common.data.dataset import Dataset
from common.data.events import Events
from common.infra.kafka_clients import make_consumer, make_producer
from common.infra.settings import Settings
from common.infra.shutdown import StopFlag
from common.infra.telemetry import Heartbeat
from common.model.registry import Registry, RegistryError
from common.model.training import TrainingDivergedError
from publisher.base import Delta, Publisher, PublishError
from stream.buffer import Buffer
from stream.checkpoint import (
    CheckpointMeta,
    CheckpointWriter,
    load_checkpoint,
    restore_into,
    snapshot,
)
from stream.feed import Feed
from stream.fetcher import Fetcher
from stream.intake import Chunk, Intake
from stream.learner import LearnOutput, StreamLearner, stream_train_settings
from stream.lock import exclusive_lock
from stream.metrics import Recent, TrainerMetrics
from stream.rebase import RebaseError, replay_since, target_version
from stream.time_index import TimeIndex

log = logging.getLogger(__name__)
_KEEPALIVE_EVERY_S = 0.1  # rebalances are seen at most this late
_RETRY_MAX_S = 30.0  # publish retries back off up to this
_PUBLISH_FAILING_S = 60.0  # publishing failed this long: /healthz says unhealthy


class StepAbandonedError(RuntimeError):
    """Shutdown was requested while a delta could not be published; nothing committed."""


@dataclass
class PendingStep:
    """A step handed to the learner thread: what it covers and its result to come."""

    chunks: list[Chunk]
    offsets: dict[int, int]  # the state's offsets once this step is applied
    started: float
    future: Future[tuple[LearnOutput, Delta, PublishError | None]]


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: TrainerConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.owner.on_revoked(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.owner.on_assigned(assigned)


class TrainerConsumer:
    """Consumer group ``trainer`` on the interactions topic."""

    def __init__(self, settings: Settings, dataset: Dataset, publisher: Publisher,
                 bootstrap: str, metrics: TrainerMetrics | None = None,
                 stop: StopFlag | None = None) -> None:
        self.s, self.dataset, self.publisher, self.bootstrap = settings, dataset, publisher, \
            bootstrap
        self.metrics = metrics or TrainerMetrics()
        self.stop = stop or StopFlag()
        self.registry = Registry(settings.models_dir)
        self.ckpt_dir = settings.checkpoints_dir / "trainer"
        self.topic = settings.kafka.topic
        self.buffer = Buffer()
        self.freshness = Recent(1_000_000)  # per event, for benchmarks
        self.step_no = self.events_applied = 0
        self.offsets: dict[int, int] = {}
        self.time_index = TimeIndex()
        # The loop may be silent for the group's poll limit plus one publish retry wait.
        self.heartbeat = Heartbeat(settings.kafka.max_poll_interval_ms / 1000 + _RETRY_MAX_S)
        self._publish_failing: tuple[float, str] | None = None  # since when, last error
        self._lock = exclusive_lock(self.ckpt_dir)
        try:
            self._start(settings, bootstrap)
        except BaseException:
            self._lock.close()
            raise

    def _start(self, settings: Settings, bootstrap: str) -> None:
        self.learner = self._restore()
        self.last_checkpoint_step = self.step_no
        self._next_rebase_check = 0.0
        self._next_lag_update = 0.0
        self._next_keepalive = 0.0
        self._skip_versions: set[str] = set()
        self.pending: PendingStep | None = None
        self.max_steps: int | None = None
        self.consumer = make_consumer(settings.kafka, bootstrap, settings.stream.trainer_group)
        self.intake = Intake(make_producer(settings.kafka, bootstrap), self.topic,
                             settings.kafka.dlq_topic, settings.kafka.max_message_bytes,
                             self.metrics)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner")
        self._writer = CheckpointWriter(self.ckpt_dir, settings.stream.checkpoints_kept,
                                        lambda: self.metrics.last_checkpoint.set(time.time()))
        self.feed = Feed(Fetcher(settings.kafka, bootstrap, self.topic,
                                 settings.kafka.max_message_bytes))

    # -- start-up ---------------------------------------------------------------------

    def _restore(self) -> StreamLearner:
        found = load_checkpoint(self.ckpt_dir)
        if found is None:
            bundle, meta = self.registry.load("champion")
            log.info("starting from the champion", extra={"version": meta["version"]})
            return self._learner(bundle, meta["version"])
        ckpt, payload = found
        bundle, _ = self.registry.load(ckpt.base_version)
        restore_into(bundle, payload)
        self.step_no, self.events_applied = ckpt.step, ckpt.events_applied
        self.offsets, self.time_index = dict(ckpt.offsets), ckpt.time_index
        self.metrics.last_checkpoint.set(ckpt.created_at)
        log.info("restored checkpoint", extra={"step": ckpt.step, "version": ckpt.base_version,
                                               "offsets": ckpt.offsets})
        return self._learner(bundle, ckpt.base_version)

    def _learner(self, bundle: Any, version: str) -> StreamLearner:
        self.metrics.version.info({"version": version})
        return StreamLearner(bundle, self.dataset, stream_train_settings(self.s), version)

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
        if self.pending is None:  # mid-step the learner holds an unpublished update
            self.checkpoint()

    # -- the loop ---------------------------------------------------------------------

    def run(self, max_steps: int | None = None) -> None:
        """Poll, step, publish, commit until stopped (or ``max_steps``); then checkpoint.

        The checkpoint on the way out is skipped when a step did not finish (publish
        abandoned, an error mid-step): the learner then holds updates that were never
        published, and a restart must replay them from the last checkpoint instead.
        """
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        self.max_steps = max_steps
        try:
            while not self.stop.is_set() and not self._enough_steps():
                self.poll_once()
            self._finish_step(block=True)
            if self.buffer and not self._enough_steps():
                self._step(self.buffer.take(self.buffer.events))
        except StepAbandonedError:
            log.warning("stopped with an unpublished step: nothing committed or checkpointed; "
                        "a restart replays it")
        finally:
            try:
                if self.pending is not None:
                    wait([self.pending.future])  # never save while the learner writes
                else:
                    self.checkpoint()
            finally:
                self.close()

    def poll_once(self) -> None:
        """One poll and whatever steps, rebases and gauges are due."""
        self.heartbeat.beat()
        self._writer.written(block=False)  # a failed save stops the trainer here
        self._receive()
        self._finish_step(block=False)
        if self.pending is not None and self.buffer.events >= self.s.stream.max_batch_events:
            # The next batch is ready: polling further only takes the GIL from the learner.
            self._finish_step(block=True)
        stream = self.s.stream
        if self.pending is None and self.buffer.due(stream.update_interval_s,
                                                    stream.max_batch_events) \
                and not self._enough_steps():
            self._start_step(self.buffer.take(stream.max_batch_events))
        now = time.monotonic()
        if now >= self._next_rebase_check:
            self._next_rebase_check = now + self.s.stream.rebase_check_s
            self._maybe_rebase()
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
            self.keepalive(timeout_ms=0 if assigned else self.s.stream.poll_timeout_ms)
        # A step still learning will be published and committed: resume after it.
        self.feed.reassign(self.consumer, self.pending.offsets if self.pending is not None
                           else self.offsets)
        timeout_s = self.s.stream.poll_timeout_ms / 1000 if assigned else 0.0
        # Back-pressure: a pipe not read blocks the fetch process.
        while self.buffer.events < 2 * self.s.stream.max_batch_events:
            fetched = self.feed.receive(timeout_s)
            if fetched is None:
                return
            timeout_s = 0.0
            with self.feed.lock:
                if fetched.generation == self.feed.generation:  # else a rebalance voided it
                    self.buffer.add(self.intake.accept(fetched))

    def _enough_steps(self) -> bool:
        return self.max_steps is not None and self.step_no >= self.max_steps

    # -- one step ---------------------------------------------------------------------

    # A step learns and publishes on the learner thread while this thread keeps polling
    # (torch releases the GIL); committing and checkpointing stay on this thread.

    def _step(self, chunks: list[Chunk]) -> None:
        """One whole step, synchronously."""
        self._start_step(chunks)
        self._finish_step(block=True)

    def _start_step(self, chunks: list[Chunk]) -> None:
        first_sight: dict[int, int] = {}
        for c in chunks:
            if c.partition not in self.offsets and len(c):
                first_sight.setdefault(c.partition, int(c.offsets[0]))
        if first_sight:
            # Record where the state starts reading a partition before any offset of it
            # is committed: otherwise a crash before the next checkpoint would resume at
            # the committed offset, past events the restored state never learned.
            self.offsets.update(first_sight)
            self.checkpoint(force=True)
        offsets = dict(self.offsets)
        for c in chunks:
            if len(c):  # chunks are in offset order per partition
                offsets[c.partition] = int(c.offsets[-1]) + 1
        self.pending = PendingStep(chunks, offsets, time.perf_counter(), self._pool.submit(
            self._learn_and_publish, chunks, offsets, self.step_no + 1))

    def _learn_and_publish(self, chunks: list[Chunk], offsets: dict[int, int],
                           step_no: int) -> tuple[LearnOutput, Delta, PublishError | None]:
        events = Events.concat(c.events for c in chunks)
        out = self._learn(events, step_no)
        delta = out.delta(self.learner.version, offsets,
                          int(events.ts_ms.max()) if len(events) else 0, step_no)
        try:
            self.publisher.publish_delta(delta)
        except PublishError as exc:
            return out, delta, exc  # retried on the consumer thread, which can keep alive
        return out, delta, None

    def _finish_step(self, block: bool) -> None:
        step = self.pending
        if step is None or (not block and not step.future.done()):
            return
        out, delta, error = step.future.result()
        if error is None:
            self.metrics.last_publish.set(time.time())
        else:
            self.publish(delta, error)
        self.intake.flush()  # the dead letters this step covers, before its offsets move on
        # Only now, with the delta durable, may the offsets move on.
        self._commit(delta.offsets)
        self._record(step.chunks, delta.offsets, out, time.perf_counter() - step.started)
        self.pending = None
        if self.step_no - self.last_checkpoint_step >= self.s.stream.checkpoint_every_steps:
            self.checkpoint(wait=False)  # written while the next step learns

    def _learn(self, events: Any, step_no: int) -> LearnOutput:
        out = self.learner.step(events, step_no)
        if out.diverged:
            # The chunks before the bad one were applied and are published with this
            # step; the rest stay in the landed data for the nightly.
            self.metrics.diverged.inc()
            log.error("step diverged; its remaining examples were skipped",
                      extra={"step": step_no, "applied_examples": out.n_examples})
        return out

    def publish(self, delta: Delta, error: PublishError | None = None) -> None:
        """Publish (after ``error``, publish again) with backoff until it succeeds; the
        consumer stays in its group meanwhile."""
        delay = 0.5
        while True:
            if error is None:
                try:
                    self.publisher.publish_delta(delta)
                except PublishError as exc:
                    error = exc
                else:
                    self.metrics.last_publish.set(time.time())
                    self._publish_failing = None
                    return
            since = self._publish_failing[0] if self._publish_failing else time.monotonic()
            self._publish_failing = (since, str(error))
            self.metrics.publish_failures.inc()
            log.warning("publish failed, retrying", extra={"error": str(error),
                                                           "retry_in_s": delay})
            self.keepalive()
            if self.stop.wait(delay):
                raise StepAbandonedError(str(error)) from error
            delay, error = min(delay * 2, _RETRY_MAX_S), None

    def health(self) -> str | None:
        """Why the trainer is unhealthy (its ``/healthz``), or None: its loop is stuck, or
        its deltas have failed to publish for over a minute."""
        stuck = self.heartbeat.check()
        if stuck is not None:
            return stuck
        if self._publish_failing is not None:
            since, error = self._publish_failing
            failing_s = time.monotonic() - since
            if failing_s > _PUBLISH_FAILING_S:
                return f"publishing has failed for {failing_s:.0f} s: {error}"
        return None

    def keepalive(self, timeout_ms: int = 0) -> None:
        """Poll the group consumer: stays in the group (rebalances happen here).

        Its partitions are paused, so it returns nothing; should a partition slip through
        unpaused, what it returned is pushed back (seek) so that nothing is skipped.
        """
        self.heartbeat.beat()
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms).items():
            if records:
                self.consumer.seek(tp, records[0].offset)

    def _commit(self, offsets: dict[int, int]) -> None:
        assigned = {tp.partition for tp in self.consumer.assignment()}
        to_commit = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                     for p, o in offsets.items() if p in assigned}
        try:
            self.consumer.commit(to_commit)
        except (CommitFailedError, KafkaError) as exc:
            # The checkpoint, not the group's offsets, decides where a restart resumes.
            log.warning("offset commit failed", extra={"error": str(exc)})

    def _record(self, chunks: list[Chunk], offsets: dict[int, int], out: LearnOutput,
                seconds: float) -> None:
        now_ms = time.time() * 1000
        stamps = [c.record_ts_ms[c.valid] for c in chunks]
        fresh = (now_ms - np.concatenate(stamps)) / 1000 if stamps else np.zeros(0)
        self.freshness.extend(fresh)
        self.metrics.observe_freshness(fresh)
        first: dict[int, int] = {}
        max_ts: dict[int, int] = {}
        for c in chunks:
            if c.n_events:
                first.setdefault(c.partition, int(c.offsets[c.valid][0]))
                max_ts[c.partition] = max(max_ts.get(c.partition, 0), int(c.events.ts_ms.max()))
        for p, off in first.items():
            self.time_index.add(p, off, max_ts[p])
        self.offsets = offsets
        self.step_no += 1
        self.events_applied += len(fresh)
        self.metrics.record_step(len(fresh), seconds, out.n_examples, len(out.user_ids),
                                 len(out.item_ids), out.loss)

    # -- checkpoints, rebase, gauges, shutdown ------------------------------------------

    def checkpoint(self, force: bool = False, wait: bool = True) -> None:
        """Save the learned state with the offsets it includes (atomic), if it moved on.

        The state is copied here, between steps; the checkpoint thread writes the files.
        With ``wait`` this returns once they are durable; else a failed save is raised
        by the next ``checkpoint`` or poll (``CheckpointError``: the last good checkpoint
        stays, and a restart resumes from it).
        """
        if force or self.step_no != self.last_checkpoint_step:
            if self.pending is not None:
                raise RuntimeError("checkpoint while a step is in flight (a bug): refusing")
            self.time_index.prune(int(self.s.stream.time_index_days * 86_400_000))
            self._writer.written(block=True)  # two copies of the tables at most, not three
            self._writer.submit(snapshot(self.learner.bundle, CheckpointMeta(
                self.learner.version, self.step_no, dict(self.offsets), self.time_index,
                self.events_applied)))
            self.last_checkpoint_step = self.step_no
        if wait:
            self._writer.written(block=True)

    def _maybe_rebase(self) -> None:
        version = None
        try:
            version = target_version(self.registry, self.publisher, self.learner.version,
                                     self._skip_versions)
            if version is not None:
                self.rebase(version)
        except (RegistryError, RebaseError, TrainingDivergedError, PublishError) as exc:
            # The stream carries on with the version it has; the publisher's timeout
            # decides about the new one.
            log.error("rebase failed; staying on the current version",
                      extra={"error": str(exc), "version": self.learner.version})
            if version is not None:
                self._skip_versions.add(version)

    def rebase(self, version: str) -> None:
        """Load ``version``, replay every consumed event after its cutoff onto it, switch.

        The buffer is stepped into the old version first, so the replay covers exactly
        the offsets the old state included; then the new learner takes over. The
        publisher hears of it before the checkpoint: after a crash in between, the
        restart (on the old version) simply rebases again.
        """
        self._finish_step(block=True)
        if self.buffer:
            self._step(self.buffer.take(self.buffer.events))
        bundle, meta = self.registry.load(version)
        learner = StreamLearner(bundle, self.dataset, stream_train_settings(self.s), version)
        replayed = replay_since(self, learner, int(meta["cutoff_ms"]))
        self.learner = learner
        self.metrics.version.info({"version": version})
        self.publisher.rebased(version, dict(self.offsets))
        self.checkpoint(force=True)
        self.metrics.rebases.inc()
        log.info("rebased", extra={"version": version, "replayed_events": replayed})

    def _update_lag(self) -> None:
        assigned = {tp.partition for tp in self.consumer.assignment()}
        for partition, lag in self.feed.lag().items():
            if partition in assigned:
                self.metrics.lag.labels(str(partition)).set(lag)

    def close(self) -> None:
        # Each part closes even when one before it raised (a checkpoint that fails in the
        # revoke on close, say): a fetch process left running would block the exit.
        try:
            self.intake.flush(timeout_s=5)
            self.intake.dlq.close(timeout=5)
        finally:
            try:
                self.consumer.close(autocommit=False)
            finally:
                try:
                    self.feed.close()
                finally:
                    self._pool.shutdown(wait=True)
                    try:
                        self._writer.close()  # raises a failed last save
                    finally:
                        self._lock.close()
