"""Start, find and stop the embedded servers (the broker, Redis) by pid.

A server runs on a free loopback port; ``RecordedServer`` shares one server between
the processes of one ``RECSTREAM_HOME``: the first starts it detached and records its
pid and port in ``run/{name}.json``, the others find it there. Servers are stopped by
that pid, never by name, after checking the pid still runs the expected binary.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from common.infra.atomic import write_text_atomic


class LaunchError(RuntimeError):
    """An embedded server could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError:
        return False
    return True


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None,
                  what: str = "server") -> None:
    """Wait until ``host:port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LaunchError(f"{what} exited with status {proc.returncode} before answering "
                              f"on {host}:{port}")
        if port_answers(host, port):
            return
        time.sleep(0.05)
    raise LaunchError(f"{what} did not answer on {host}:{port} within {timeout_s:.0f} s")


def stop_pid(pid: int, timeout_s: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL one process by pid (never by name)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: fall through to the signal-0 probe
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runs_binary(pid: int, marker: bytes) -> bool:
    """Whether ``pid`` still runs a command line containing ``marker`` (pids get reused)."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and pid_alive(pid)  # no procfs: trust it
    except OSError:
        return False


@dataclass
class ServerProcess:
    """A server process listening on ``host:port``."""

    pid: int
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        stop_pid(self.pid)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


S = TypeVar("S", bound=ServerProcess)


def launch(cls: type[S], argv: Sequence[str], port: int, what: str, *,
           log_path: Path | None = None, timeout_s: float = 20.0, detached: bool = False) -> S:
    """Start ``argv`` and wait until it answers on ``port``; ``detached`` outlives us."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=detached)
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]
    server = cls(proc.pid, port, proc=proc)
    try:
        wait_for_port(server.host, port, timeout_s, proc, what)
    except LaunchError:
        server.stop()
        raise
    return server


class RecordedServer(Generic[S]):
    """The one server of a kind shared by the processes of a home (``run/{name}.json``)."""

    def __init__(self, run_dir: Path, name: str, cls: type[S], marker: bytes,
                 start: Callable[[Path], S]) -> None:
        self.run_dir, self.name, self.cls, self.marker, self._start = \
            run_dir, name, cls, marker, start

    @property
    def state_file(self) -> Path:
        return self.run_dir / f"{self.name}.json"

    def alive(self) -> S | None:
        """The recorded server if its process is alive (answering or not)."""
        try:
            state = json.loads(self.state_file.read_text())
            server = self.cls(int(state["pid"]), int(state["port"]))
        except (OSError, ValueError, KeyError):
            return None
        return server if pid_alive(server.pid) and runs_binary(server.pid, self.marker) \
            else None

    def answering(self, timeout_s: float = 5.0) -> S | None:
        """The recorded server if its process is alive and answering."""
        server = self.alive()
        if server is None:
            return None
        try:
            wait_for_port(server.host, server.port, timeout_s, what=self.name)
        except LaunchError:
            return None
        return server

    def ensure(self) -> S:
        """The home's server, started (detached) if none is running."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / f".{self.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two daemons starting at once share one
            server = self.answering()
            if server is None:
                stale = self.alive()
                if stale is not None:  # alive but deaf: stop it rather than leak it
                    stale.stop()
                server = self._start(self.run_dir)
                write_text_atomic(self.state_file,
                                  json.dumps({"pid": server.pid, "port": server.port}))
            return server

    def stop(self) -> bool:
        """Stop the recorded server by its pid; False if none was running."""
        server = self.alive()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if server is None:
            return False
        server.stop()
        return True
