"""The trainer's learned state and what it includes: what a checkpoint saves and a start
restores (from the newest intact checkpoint, else from the champion)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.model.bundle import ModelBundle
from common.model.registry import Registry
from stream.checkpoint import load_checkpoint, restore_into
from stream.learner import StreamLearner
from stream.metrics import TrainerMetrics
from stream.time_index import TimeIndex

log = logging.getLogger(__name__)


@dataclass
class State:
    """A model version being trained, with the steps and events it has applied, the
    offsets it includes and where its events of a given time start (for rebases)."""

    learner: StreamLearner
    step_no: int = 0
    events_applied: int = 0
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    time_index: TimeIndex = field(default_factory=TimeIndex)


def restore(ckpt_dir: Path, registry: Registry,
            learner_for: Callable[[ModelBundle, str], StreamLearner],
            metrics: TrainerMetrics) -> State:
    """The state of the newest intact checkpoint in ``ckpt_dir``, else a fresh one on the
    champion."""
    found = load_checkpoint(ckpt_dir)
    if found is None:
        bundle, meta = registry.load("champion")
        log.info("starting from the champion", extra={"version": meta["version"]})
        return State(learner_for(bundle, meta["version"]))
    ckpt, payload = found
    bundle, _ = registry.load(ckpt.base_version)
    restore_into(bundle, payload)
    metrics.last_checkpoint.set(ckpt.created_at)
    log.info("restored checkpoint", extra={"step": ckpt.step, "version": ckpt.base_version,
                                           "offsets": ckpt.offsets})
    learner = learner_for(bundle, ckpt.base_version)
    learner.replay.restore(payload["replay"])
    return State(learner, ckpt.step, ckpt.events_applied, dict(ckpt.offsets),
                 ckpt.time_index)
