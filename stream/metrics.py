"""Prometheus metrics of the trainer consumer, on a registry of its own (no globals)."""

from __future__ import annotations

import math
import time

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
_FRESHNESS_SAMPLES = 200  # per step into the histogram (observing every event costs ~5%)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TrainerMetrics:
    """Every figure the stream dashboard reads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.consumed = Counter("recstream_stream_events_consumed_total",
                                "Records read from the topic", registry=r)
        self.rejected = Counter("recstream_stream_events_rejected_total",
                                "Records sent to the dead-letter topic", ["reason"], registry=r)
        self.applied = Counter("recstream_stream_events_applied_total",
                               "Valid events included in a published step", registry=r)
        self.steps = Counter("recstream_stream_steps_total", "Micro-batch steps published",
                             registry=r)
        self.diverged = Counter("recstream_stream_diverged_steps_total",
                                "Steps skipped because the loss was NaN/inf or too large",
                                registry=r)
        self.publish_failures = Counter("recstream_stream_publish_failures_total",
                                        "Delta publishes that raised (retried)", registry=r)
        self.rebases = Counter("recstream_stream_rebases_total",
                               "Rebases onto a new model version", registry=r)
        self.step_seconds = Histogram("recstream_stream_step_seconds",
                                      "Learn + publish + commit time of one step",
                                      buckets=STEP_BUCKETS, registry=r)
        self.examples_per_s = Gauge("recstream_stream_examples_per_second",
                                    "Training examples per second in the last step", registry=r)
        self.lag = Gauge("recstream_stream_lag_records",
                         "Highwater minus position per partition", ["partition"], registry=r)
        self.freshness = Histogram("recstream_stream_freshness_seconds",
                                   "Record timestamp to its delta being published",
                                   buckets=FRESHNESS_BUCKETS, registry=r)
        self.touched = Histogram("recstream_stream_touched_keys",
                                 "Ids whose vectors a step published", ["kind"],
                                 buckets=(1, 10, 100, 1000, 10_000, 100_000), registry=r)
        self.loss = Gauge("recstream_stream_loss", "Mean loss of the last step", registry=r)
        self.last_publish = Gauge("recstream_stream_last_publish_timestamp_seconds",
                                  "Unix time of the last successful publish", registry=r)
        self.last_checkpoint = Gauge("recstream_stream_last_checkpoint_timestamp_seconds",
                                     "Unix time of the last checkpoint", registry=r)
        since_publish = Gauge("recstream_stream_seconds_since_last_publish",
                              "Seconds since the last successful publish", registry=r)
        since_publish.set_function(lambda: _since(self.last_publish))
        ckpt_age = Gauge("recstream_stream_checkpoint_age_seconds",
                         "Seconds since the last checkpoint", registry=r)
        ckpt_age.set_function(lambda: _since(self.last_checkpoint))
        self.version = Info("recstream_stream_model", "Model version the stream trains",
                            registry=r)

    def observe_freshness(self, seconds: np.ndarray) -> None:
        """A step's freshness figures, evenly subsampled into the histogram."""
        for x in seconds[:: max(1, len(seconds) // _FRESHNESS_SAMPLES)].tolist():
            self.freshness.observe(x)

    def record_step(self, events: int, seconds: float, examples: int, users: int, items: int,
                    loss: float) -> None:
        """Counters and gauges of one finished step."""
        self.steps.inc()
        self.applied.inc(events)
        self.step_seconds.observe(seconds)
        self.examples_per_s.set(examples / max(seconds, 1e-9))
        self.touched.labels("user").observe(users)
        self.touched.labels("item").observe(items)
        if math.isfinite(loss):
            self.loss.set(loss)


class Recent:
    """The last ``capacity`` values of a series, oldest first, in a float32 ring (4 bytes
    a value; a deque of Python floats took ~33, tracemalloc: 33 MB for a million): the
    trainer's per-event freshness.

    >>> r = Recent(3)
    >>> r.extend(np.array([1.0, 2.0])); r.extend(np.array([3.0, 4.0]))
    >>> r.values().tolist(), len(r)
    ([2.0, 3.0, 4.0], 3)
    """

    def __init__(self, capacity: int) -> None:
        self._ring = np.zeros(capacity, np.float32)
        self._written = 0

    def __len__(self) -> int:
        return min(self._written, len(self._ring))

    def extend(self, values: np.ndarray) -> None:
        cap = len(self._ring)
        values = values[-cap:]
        at = (self._written + np.arange(len(values))) % cap
        self._ring[at] = values
        self._written += len(values)

    def values(self) -> np.ndarray:
        if self._written <= len(self._ring):
            return self._ring[:self._written].copy()
        at = self._written % len(self._ring)
        return np.concatenate([self._ring[at:], self._ring[:at]])


def _since(gauge: Gauge) -> float:
    last = gauge._value.get()  # prometheus_client has no public read of a gauge's value
    return time.time() - last if last else float("nan")
