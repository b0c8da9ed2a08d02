"""A daemon's Prometheus endpoint, serving its own registry (no global one), and the
``recstream_build_info`` every daemon exports.

>>> from prometheus_client import CollectorRegistry
>>> with serve_metrics(CollectorRegistry(), "127.0.0.1", 0):  # port 0: no endpoint
...     pass
"""

from __future__ import annotations

import platform
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata

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


@contextmanager
def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Iterator[None]:
    """Serve ``/metrics`` on ``host:port`` while the block runs; port 0 serves nothing."""
    register_build_info(registry)
    if not port:
        yield
        return
    server, _ = start_http_server(port, addr=host, registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def scrape(port: int, host: str = "127.0.0.1") -> str:
    """A daemon's /metrics text (empty when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""
