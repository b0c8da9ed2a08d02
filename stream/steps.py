"""The trainer's steps: learn and publish a micro-batch, then commit, record, checkpoint.

Invariants, enforced here:

- offsets are committed only after the publisher made the step's delta durable (and
  after the dead letters the step covers were acknowledged): ``Steps.finish``;
- a checkpoint holds only state whose deltas were published, with the offsets that
  state includes (``Steps.checkpoint`` refuses while a step is in flight); a restart
  restores it and seeks there, so a crash loses no update and re-applies only what the
  lost state had applied (at-least-once publishing, harmless because publishing
  overwrites).

A step learns and publishes on the learner thread while the trainer's thread keeps
polling (torch releases the GIL); committing and checkpointing stay on the trainer's
thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from common.data.events import Events
from common.infra.settings_groups import StreamSettings
from publisher.base import Delta, PublishError
from stream.checkpoint import CheckpointMeta, CheckpointWriter, snapshot
from stream.intake import Chunk, Intake
from stream.learner import LearnOutput
from stream.metrics import Recent, TrainerMetrics
from stream.offsets import first_seen, index_times, offsets_after
from stream.publishing import Publishing
from stream.state import State

log = logging.getLogger(__name__)


@dataclass
class PendingStep:
    """A step handed to the learner thread: what it covers and its result to come."""

    chunks: list[Chunk]
    offsets: dict[int, int]  # the state's offsets once this step is applied
    started: float
    future: Future[tuple[LearnOutput, Delta, PublishError | None]]


class Steps:
    """Moves the state on, one step at a time (at most one in flight)."""

    def __init__(self, state: State, stream: StreamSettings, publishing: Publishing,
                 intake: Intake, commit: Callable[[dict[int, int]], None],
                 learner_thread: ThreadPoolExecutor, writer: CheckpointWriter,
                 metrics: TrainerMetrics, freshness: Recent) -> None:
        self.state, self.stream, self.publishing = state, stream, publishing
        self.intake, self.commit = intake, commit
        self.learner_thread, self.writer = learner_thread, writer
        self.metrics, self.freshness = metrics, freshness
        self.pending: PendingStep | None = None
        self.last_checkpoint_step = state.step_no

    def reading_from(self) -> dict[int, int]:
        """Where reading resumes: after the step still learning (it will be published and
        committed), else after the state."""
        return self.pending.offsets if self.pending is not None else self.state.offsets

    def step(self, chunks: list[Chunk]) -> None:
        """One whole step, synchronously."""
        self.start(chunks)
        self.finish(block=True)

    def start(self, chunks: list[Chunk]) -> None:
        """Hand ``chunks`` to the learner thread to be learned and published."""
        state = self.state
        first = first_seen(chunks, state.offsets)
        if first:
            # Record where the state starts reading a partition before any offset of it
            # is committed: otherwise a crash before the next checkpoint would resume at
            # the committed offset, past events the restored state never learned.
            state.offsets.update(first)
            self.checkpoint(force=True)
        offsets = offsets_after(state.offsets, chunks)
        self.pending = PendingStep(chunks, offsets, time.perf_counter(),
                                   self.learner_thread.submit(self._learn_and_publish, chunks,
                                                              offsets, state.step_no + 1))

    def _learn_and_publish(self, chunks: list[Chunk], offsets: dict[int, int],
                           step_no: int) -> tuple[LearnOutput, Delta, PublishError | None]:
        events = Events.concat(c.events for c in chunks)
        out = self._learn(events, step_no)
        delta = out.delta(self.state.learner.version, offsets,
                          int(events.ts_ms.max()) if len(events) else 0, step_no)
        # A failure is retried on the trainer's thread, which can keep the group alive.
        return out, delta, self.publishing.attempt(delta)

    def _learn(self, events: Events, step_no: int) -> LearnOutput:
        out = self.state.learner.step(events, step_no)
        if out.diverged:
            # The chunks before the bad one were applied and are published with this
            # step; the rest stay in the landed data for the nightly.
            self.metrics.diverged.inc()
            log.error("step diverged; its remaining examples were skipped",
                      extra={"step": step_no, "applied_examples": out.n_examples})
        return out

    def finish(self, block: bool) -> None:
        """Complete the step in flight once learned (or, with ``block``, wait for it):
        publish it if that failed, then commit and record it."""
        step = self.pending
        if step is None or (not block and not step.future.done()):
            return
        out, delta, error = step.future.result()
        if error is None:
            self.publishing.published()
        else:
            self.publishing.publish(delta, error)
        self.intake.flush()  # the dead letters this step covers, before its offsets move on
        # Only now, with the delta durable, may the offsets move on.
        self.commit(delta.offsets)
        self._record(step.chunks, delta.offsets, out, time.perf_counter() - step.started)
        self.pending = None
        if self.state.step_no - self.last_checkpoint_step >= self.stream.checkpoint_every_steps:
            self.checkpoint(wait=False)  # written while the next step learns

    def _record(self, chunks: list[Chunk], offsets: dict[int, int], out: LearnOutput,
                seconds: float) -> None:
        now_ms = time.time() * 1000
        stamps = [c.record_ts_ms[c.valid] for c in chunks]
        fresh = (now_ms - np.concatenate(stamps)) / 1000 if stamps else np.zeros(0)
        self.freshness.extend(fresh)
        self.metrics.observe_freshness(fresh)
        state = self.state
        index_times(state.time_index, chunks)
        state.offsets = offsets
        state.step_no += 1
        state.events_applied += len(fresh)
        self.metrics.record_step(len(fresh), seconds, out.n_examples, len(out.user_ids),
                                 len(out.item_ids), out.loss)

    def checkpoint(self, force: bool = False, wait: bool = True) -> None:
        """Save the learned state with the offsets it includes (atomic), if it moved on.

        The state is copied here, between steps; the checkpoint thread writes the files.
        With ``wait`` this returns once they are durable; else a failed save is raised
        by the next ``checkpoint`` or poll (``CheckpointError``: the last good checkpoint
        stays, and a restart resumes from it).
        """
        state = self.state
        if force or state.step_no != self.last_checkpoint_step:
            if self.pending is not None:
                raise RuntimeError("checkpoint while a step is in flight (a bug): refusing")
            state.time_index.prune(int(self.stream.time_index_days * 86_400_000))
            self.writer.written(block=True)  # two copies of the tables at most, not three
            self.writer.submit(snapshot(state.learner.bundle, CheckpointMeta(
                state.learner.version, state.step_no, dict(state.offsets), state.time_index,
                state.events_applied), state.learner.replay.state()))
            self.last_checkpoint_step = state.step_no
        if wait:
            self.writer.written(block=True)

    def last_checkpoint(self) -> None:
        """On the way out: checkpoint, unless a step did not finish (publish abandoned, an
        error mid-step): the learner then holds updates that were never published, and a
        restart must replay them from the last checkpoint instead."""
        if self.pending is not None:
            wait([self.pending.future])  # never save while the learner writes
        else:
            self.checkpoint()
