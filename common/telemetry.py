"""A daemon's Prometheus endpoint, serving its own registry (no global one).

>>> from prometheus_client import CollectorRegistry
>>> with serve_metrics(CollectorRegistry(), "127.0.0.1", 0):  # port 0: no endpoint
...     pass
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, start_http_server


@contextmanager
def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> Iterator[None]:
    """Serve ``/metrics`` on ``host:port`` while the block runs; port 0 serves nothing."""
    if not port:
        yield
        return
    server, _ = start_http_server(port, addr=host, registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
