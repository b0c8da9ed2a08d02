"""A step's delta published until it goes through, the trainer staying in its group.

The offsets a delta covers wait for it (``stream.steps``), so a publisher that fails is
retried with backoff, never skipped; only a shutdown gives up, and then nothing is
committed or checkpointed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from common.infra.shutdown import StopFlag
from publisher.base import Delta, Publisher, PublishError
from stream.metrics import TrainerMetrics

log = logging.getLogger(__name__)
RETRY_MAX_S = 30.0  # publish retries back off up to this


class StepAbandonedError(RuntimeError):
    """Shutdown was requested while a delta could not be published; nothing committed."""


class Publishing:
    """Publishes deltas with retries and knows since when publishing has been failing."""

    def __init__(self, publisher: Publisher, metrics: TrainerMetrics, stop: StopFlag,
                 keepalive: Callable[[], None]) -> None:
        self.publisher, self.metrics, self.stop = publisher, metrics, stop
        self.keepalive = keepalive  # polls the group consumer: its membership survives
        self._failing: tuple[float, str] | None = None  # since when (monotonic), last error

    def attempt(self, delta: Delta) -> PublishError | None:
        """One try (on any thread); the error, if it failed."""
        try:
            self.publisher.publish_delta(delta)
        except PublishError as exc:
            return exc
        return None

    def published(self) -> None:
        self.metrics.last_publish.set(time.time())
        self._failing = None

    def publish(self, delta: Delta, error: PublishError | None = None) -> None:
        """Publish (after ``error``, publish again) with backoff until it succeeds;
        raises ``StepAbandonedError`` if the trainer is stopped meanwhile."""
        delay = 0.5
        while True:
            if error is None:
                error = self.attempt(delta)
                if error is None:
                    self.published()
                    return
            since = self._failing[0] if self._failing else time.monotonic()
            self._failing = (since, str(error))
            self.metrics.publish_failures.inc()
            log.warning("publish failed, retrying", extra={"error": str(error),
                                                           "retry_in_s": delay})
            self.keepalive()
            if self.stop.wait(delay):
                raise StepAbandonedError(str(error)) from error
            delay, error = min(delay * 2, RETRY_MAX_S), None

    def failing(self) -> tuple[float, str] | None:
        """Since when (``time.monotonic``) publishing has been failing, and its last error;
        None while it works."""
        return self._failing
