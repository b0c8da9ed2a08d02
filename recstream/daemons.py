"""Start and stop `recstream` daemons as real processes, the way the demo, the soak
benchmark and the tests run them: ``python -m recstream …`` with its own log file and a
free /metrics port set through an env setting, stopped by pid (SIGTERM, then SIGKILL),
and its counters read back from that port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common.infra.launcher import free_port
from common.infra.telemetry import scrape
from recstream.demo_report import counter

TRAINER_PORT = "RECSTREAM_STREAM_TRAINER_METRICS_PORT"
LANDER_PORT = "RECSTREAM_STREAM_LANDER_METRICS_PORT"


class Daemon:
    """One `recstream …` process, its log file ``{log_dir}/{name}.log`` and its /metrics
    port (``port``, else a free one), passed to it as ``port_setting``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 port_setting: str, preexec: Callable[[], None] | None = None,
                 port: int | None = None) -> None:
        self.name, self.argv, self.log = name, argv, log_dir / f"{name}.log"
        self.port = free_port() if port is None else port
        self.env = {**os.environ, **env, port_setting: str(self.port)}
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "recstream", *self.argv],
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, preexec_fn=self.preexec)
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        """The exit status once it exited; None while it runs or before it started."""
        return None if self.proc is None else self.proc.poll()

    def metrics(self) -> str:
        return scrape(self.port)

    def counter(self, name: str) -> int:
        return counter(self.metrics(), name)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 30, wait_s: float = 10) -> int | None:
        """SIGTERM (then SIGKILL after ``timeout_s``); the exit status, waited for
        ``wait_s`` more (``subprocess.TimeoutExpired`` past that)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # Through the Popen handle (its pid), not stop_pid: that reaps the child
            # itself, and the exit status would be lost (Popen then reports 0).
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=wait_s)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Daemons:
    """Every daemon started through it, stopped together (on success or failure)."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def start(self, daemon: Daemon) -> Daemon:
        self.started.append(daemon)
        return daemon.start()

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


def trainer(env: dict[str, str], log_dir: Path, dataset: str = "synthetic",
            preexec: Callable[[], None] | None = None, port: int | None = None) -> Daemon:
    """`recstream stream --dataset {dataset}`, logging to ``stream.log``."""
    return Daemon("stream", ["stream", "--dataset", dataset], env, log_dir, TRAINER_PORT,
                  preexec, port)


def lander(env: dict[str, str], log_dir: Path, preexec: Callable[[], None] | None = None,
           port: int | None = None) -> Daemon:
    """`recstream land`, logging to ``lander.log``."""
    return Daemon("lander", ["land"], env, log_dir, LANDER_PORT, preexec, port)
