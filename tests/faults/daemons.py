"""Daemons as the fault cases run them: real `recstream` processes with their metrics
endpoints, and the counters read back from them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common.launcher import free_port, stop_pid
from common.telemetry import scrape
from recstream.demo_report import counter


class Daemon:
    """One `recstream …` process, its log file and its /metrics port."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path,
                 port_setting: str, preexec: Callable[[], None] | None = None) -> None:
        self.name, self.argv, self.log = name, argv, log_dir / f"{name}.log"
        self.port = free_port()
        self.env = {**os.environ, **env, port_setting: str(self.port)}
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "recstream", *self.argv],
                                         env=self.env, stdout=log, stderr=log,
                                         preexec_fn=self.preexec)
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self) -> str:
        return scrape(self.port)

    def counter(self, name: str) -> int:
        return counter(self.metrics(), name)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after 30 s); the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            stop_pid(self.proc.pid, timeout_s=30)
        return self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Daemons:
    """Every daemon a test starts, stopped when it ends (pass or fail): no orphans."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def start(self, daemon: Daemon) -> Daemon:
        self.started.append(daemon)
        return daemon.start()

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


def trainer(env: dict[str, str], log_dir: Path, **kw: object) -> Daemon:
    return Daemon("stream", ["stream", "--dataset", "synthetic"], env, log_dir,
                  "RECSTREAM_STREAM_TRAINER_METRICS_PORT", **kw)  # type: ignore[arg-type]


def lander(env: dict[str, str], log_dir: Path, **kw: object) -> Daemon:
    return Daemon("lander", ["land"], env, log_dir, "RECSTREAM_STREAM_LANDER_METRICS_PORT",
                  **kw)  # type: ignore[arg-type]
