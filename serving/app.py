"""``recstream serve``: the recall API over HTTP (stdlib server, one thread per request).

``GET /recall?user_id=U&k=K`` → ``{"user_id", "version", "fallback", "items": [{"item_id",
"score"}]}``; ``GET /healthz`` → 200 when a version is served and Redis answers, else
503; ``GET /metrics`` → Prometheus text. Bad parameters get a 400 with a message, an
unknown path a 404, a URL over ``MAX_URL_CHARS`` a 414; nothing answers with a stack trace.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.infra.settings import Settings
from serving.recall import NotReadyError, RecallService

log = logging.getLogger(__name__)
_PARAMS = {"user_id", "k"}
_MAX_ID = 256
# A recall URL is a few hundred characters; http.server itself only stops at 64 KiB.
MAX_URL_CHARS = 2048


class BadRequestError(ValueError):
    """A request parameter is missing or invalid (answered with a 400)."""


def parse_recall(query: str, default_k: int, max_k: int) -> tuple[str, int]:
    """``user_id`` and ``k`` from a query string, or ``BadRequestError`` saying why."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=8)
    except ValueError as exc:
        raise BadRequestError(f"unreadable query string: {exc}") from None
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise BadRequestError(f"unknown parameter {unknown[0]!r}; known: k, user_id")
    if any(len(v) > 1 for v in params.values()):
        raise BadRequestError("each parameter may be given once")
    user_id = params.get("user_id", [""])[0]
    if not user_id or len(user_id) > _MAX_ID:
        raise BadRequestError(f"user_id is required (1-{_MAX_ID} characters)")
    raw_k = params.get("k", [str(default_k)])[0]
    try:
        k = int(raw_k)
    except ValueError:
        raise BadRequestError(f"k must be an integer, got {raw_k[:32]!r}") from None
    if not 1 <= k <= max_k:
        raise BadRequestError(f"k must be between 1 and {max_k}, got {k}")
    return user_id, k


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: a load generator reuses its connection
    # Headers and body go out as two writes: without TCP_NODELAY, Nagle + delayed ACK
    # held every keep-alive response ~40 ms (bench/publish.py: p50 48 ms -> 6 ms).
    disable_nagle_algorithm = True
    # An idle keep-alive connection (or a slow client) gives its thread back after this.
    timeout = 60

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if len(self.path) > MAX_URL_CHARS:
            self._json(414, {"error": f"URL longer than {MAX_URL_CHARS} characters"}, "other")
            return
        url = urlsplit(self.path)
        route = {"/recall": self._recall, "/healthz": self._healthz,
                 "/metrics": self._metrics}.get(url.path)
        if route is None:
            self._json(404, {"error": f"no such path {url.path[:64]!r}; try /recall, "
                                      "/healthz, /metrics"}, "other")
            return
        try:
            route(url.query)
        except Exception:  # noqa: BLE001 - the loop boundary: log once, answer 500 tidily
            log.exception("request failed", extra={"path": url.path})
            self._json(500, {"error": "internal error (logged)"}, url.path.strip("/"))

    def _recall(self, query: str) -> None:
        svc, t0 = self.server.service, time.perf_counter()
        try:
            user_id, k = parse_recall(query, svc.serving.default_k, svc.serving.max_k)
        except BadRequestError as exc:
            self._json(400, {"error": str(exc)}, "recall")
            return
        try:
            answer = svc.recall(user_id, k)
        except NotReadyError as exc:
            self._json(503, {"error": str(exc)}, "recall")
            return
        self._json(200, answer.to_dict(), "recall")
        svc.metrics.latency.observe(time.perf_counter() - t0)

    def _healthz(self, query: str) -> None:
        svc = self.server.service
        served = svc.current
        try:
            redis_ok = bool(svc.users.r.ping())
        except redis.RedisError:
            redis_ok = False
        ok = served is not None and redis_ok
        self._json(200 if ok else 503, {"status": "ok" if ok else "unavailable",
                                        "version": served.version if served else None,
                                        "redis": redis_ok}, "healthz")

    def _metrics(self, query: str) -> None:
        body = generate_latest(self.server.service.metrics.registry)
        self._send(200, body, CONTENT_TYPE_LATEST, "metrics")

    def _json(self, status: int, payload: dict[str, Any], endpoint: str) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", endpoint)

    def _send(self, status: int, body: bytes, content_type: str, endpoint: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.server.service.metrics.requests.labels(endpoint, str(status)).inc()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return  # access logs are metrics here; errors are logged where they happen


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: RecallService) -> None:
        super().__init__(address, _Handler)
        self.service = service


@contextmanager
def serve_http(service: RecallService, host: str, port: int) -> Iterator[_Server]:
    """Serve the API on ``host:port`` (0 = a free port) while the block runs."""
    server = _Server((host, port), service)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_serving(settings: Settings, stop: Any = None) -> None:
    """``recstream serve``: follow releases and answer until SIGTERM/SIGINT."""
    from common.infra.shutdown import StopFlag
    from common.model.registry import Registry
    from publisher.redis_faiss import RedisFaissPublisher
    from serving.watcher import ReleaseWatcher

    stop = StopFlag.for_daemon(stop)
    if settings.serving.threads:
        import faiss
        import torch

        # One thread per request already; OpenMP pools per request would oversubscribe.
        torch.set_num_threads(settings.serving.threads)
        faiss.omp_set_num_threads(settings.serving.threads)
    pub = RedisFaissPublisher.from_settings(settings)
    service = RecallService(settings.serving, pub.users, pub.indexes,
                            Registry(settings.models_dir))
    with ReleaseWatcher(service, settings.serving.version_poll_s), \
            serve_http(service, settings.serving.host, settings.serving.port) as server:
        log.warning("serving", extra={"address": f"{server.server_address[0]}:"
                                                 f"{server.server_address[1]}"})
        while not stop.wait(0.5):
            pass
