"""Follows the release over Redis pub/sub: every message (promote, rollback, delta)
and every ``poll_s`` without one makes the service refresh. Pub/sub is fire and
forget, so the poll catches whatever a reconnect missed."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from publisher.base import PublishError
from serving.recall import RecallService

log = logging.getLogger(__name__)


class ReleaseWatcher:
    """A background thread keeping ``service`` on the released version."""

    def __init__(self, service: RecallService, poll_s: float) -> None:
        self.service, self.poll_s = service, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="release-watcher", daemon=True)

    def __enter__(self) -> ReleaseWatcher:
        self._refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        pubsub: Any = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.service.users.r.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.service.users.keys.channel)
                pubsub.get_message(timeout=self.poll_s)
            except redis.RedisError as exc:
                log.warning("release channel lost; polling", extra={"error": str(exc)})
                pubsub = None
                self._stop.wait(min(self.poll_s, 1.0))
            self._refresh()
        if pubsub is not None:
            pubsub.close()

    def _refresh(self) -> None:
        try:
            self.service.refresh()
        except (PublishError, redis.RedisError) as exc:
            log.warning("cannot read the release; serving what is loaded",
                        extra={"error": str(exc)})
