"""Graceful shutdown for daemons: SIGTERM/SIGINT set a flag the main loop checks.

A second signal while shutting down is left to the default handler, so an operator
can still force an exit.

>>> stop = StopFlag()
>>> stop.is_set()
False
>>> stop.set("test"); stop.is_set(), stop.reason
(True, 'test')
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopFlag:
    """A thread-safe stop request with the reason it was made."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    @classmethod
    def for_daemon(cls, stop: StopFlag | None) -> StopFlag:
        """``stop`` if a caller (a test) supplies one, else a flag set by SIGTERM/SIGINT."""
        if stop is not None:
            return stop
        flag = cls()
        flag.install_signal_handlers()
        return flag

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT request a stop (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            self.set(signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
