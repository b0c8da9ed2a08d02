"""A daemon's Prometheus endpoint, serving its own registry (no global one) and a
``/healthz`` (200 ``ok``, or 503 with the reason), and the ``recstream_build_info``
every daemon exports.

>>> from prometheus_client import CollectorRegistry
>>> with serve_metrics(CollectorRegistry(), "127.0.0.1", 0):  # port 0: no endpoint
...     pass
"""

from __future__ import annotations

import platform
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def register_build_info(registry: CollectorRegistry) -> None:
    """Add ``recstream_build_info{version,python,torch}`` = 1 (once per registry)."""
    if getattr(registry, "_recstream_build_info", False):
        return
    info = Gauge("recstream_build_info", "The running recstream build (always 1)",
                 ["version", "python", "torch"], registry=registry)
    info.labels(_version("recstream"), platform.python_version(), _version("torch")).set(1)
    registry._recstream_build_info = True  # type: ignore[attr-defined]


Health = Callable[[], "str | None"]  # None: healthy; else why not


class Endpoint:
    """What a daemon's endpoint answers on ``/healthz``: ``health`` (set once the daemon
    is built) decides; without one, answering at all is healthy."""

    def __init__(self) -> None:
        self.health: Health | None = None

    def wrap(self, app: Any) -> Any:
        """The metrics WSGI app with ``/healthz`` in front of it."""

        def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/healthz":
                return app(environ, start_response)  # type: ignore[no-any-return]
            try:
                reason = self.health() if self.health is not None else None
            except Exception as exc:  # noqa: BLE001 - a broken check is an unhealthy answer
                reason = f"the health check failed: {exc!r}"
            body = b"ok\n" if reason is None else f"unhealthy: {reason}\n".encode()
            start_response("200 OK" if reason is None else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
            return [body]

        return wsgi


@contextmanager
def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Iterator[Endpoint]:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` while the block runs; port 0
    serves nothing."""
    register_build_info(registry)
    endpoint = Endpoint()
    if not port:
        yield endpoint
        return
    server, _ = start_http_server(port, addr=host, registry=registry)
    server.set_app(endpoint.wrap(server.get_app()))
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


class Heartbeat:
    """When a daemon's loop last went round; silent longer than ``max_silence_s`` (the
    group would have evicted it by then) it is stuck.

    >>> hb = Heartbeat(30.0)
    >>> hb.check() is None
    True
    >>> hb.at -= 45; hb.check()
    'its loop has not run for 45 s (limit 30 s)'
    """

    def __init__(self, max_silence_s: float) -> None:
        self.max_silence_s = max_silence_s
        self.at = time.monotonic()

    def beat(self) -> None:
        self.at = time.monotonic()

    def check(self) -> str | None:
        silent = time.monotonic() - self.at
        if silent <= self.max_silence_s:
            return None
        return f"its loop has not run for {silent:.0f} s (limit {self.max_silence_s:.0f} s)"


def scrape(port: int, host: str = "127.0.0.1") -> str:
    """A daemon's /metrics text (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""
