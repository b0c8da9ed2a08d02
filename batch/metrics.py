"""Prometheus figures of the nightly job and the scheduler that runs it.

The scheduler serves them on its ``/metrics``; a nightly run on its own writes them to
``RECSTREAM_HOME/metrics/nightly.prom`` (node_exporter's textfile format).
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

from batch.guard import GuardMetrics
from common.infra.telemetry import register_build_info

STEPS = ("landed", "train", "evaluate", "gate", "register", "publish", "promote")
RESULTS = ("released", "up_to_date", "refused", "failed")


class NightlyMetrics:
    """The nightly's figures, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        register_build_info(self.registry)
        r = self.registry
        self.runs = Counter("recstream_nightly_runs", "Nightly runs by result", ["result"],
                            registry=r)
        for result in RESULTS:
            self.runs.labels(result)
        self.gate = Counter("recstream_nightly_gate_decisions",
                            "Gate decisions on nightly candidates", ["decision"], registry=r)
        for decision in ("pass", "refuse"):
            self.gate.labels(decision)
        self.duration = Gauge("recstream_nightly_duration_seconds",
                              "Wall time of the last nightly run", registry=r)
        self.step_duration = Gauge("recstream_nightly_step_duration_seconds",
                                   "Wall time of each step of the last nightly run", ["step"],
                                   registry=r)
        self.last_run = Gauge("recstream_nightly_last_run_timestamp_seconds",
                              "When the last nightly run ended", registry=r)
        self.last_success = Gauge("recstream_nightly_last_success_timestamp_seconds",
                                  "When a nightly run last released a version", registry=r)
        self.examples_per_s = Gauge("recstream_nightly_examples_per_second",
                                    "Training throughput of the last nightly", registry=r)
        self.loss = Gauge("recstream_nightly_train_loss", "Final training loss of the last "
                          "nightly", registry=r)
        self.eval = Gauge("recstream_nightly_eval_metric", "Held-out figures of the last "
                          "nightly's candidate and of the champion on the same events",
                          ["metric", "model"], registry=r)
        self.version = Gauge("recstream_nightly_version_number", "Number of the version the "
                             "last nightly registered (v000123 -> 123)", registry=r)
        self.lock_skips = Counter("recstream_scheduler_lock_skipped_runs",
                                  "Runs skipped because another scheduler held the lock",
                                  registry=r)
        self.next_run = Gauge("recstream_scheduler_next_run_timestamp_seconds",
                              "When the scheduler runs the nightly next", registry=r)
        self.redis_memory = Gauge("recstream_redis_used_memory_bytes",
                                  "Memory the Redis of the published versions uses",
                                  registry=r)
        self.published = Gauge("recstream_published_versions",
                               "Versions published completely in Redis", registry=r)
        self.guard = GuardMetrics(r)

    def step(self, name: str, seconds: float) -> None:
        self.step_duration.labels(name).set(seconds)

    def finished(self, result: str, seconds: float) -> None:
        self.runs.labels(result).inc()
        self.duration.set(seconds)
        self.last_run.set(time.time())
        if result == "released":
            self.last_success.set(time.time())

    def write_textfile(self, path: Path) -> None:
        """Write every figure in the Prometheus text format, atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)
