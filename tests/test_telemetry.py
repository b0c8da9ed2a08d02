"""A daemon's endpoint: /metrics from its own registry, /healthz from its health check."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from common.infra.launcher import free_port
from common.infra.telemetry import Heartbeat, serve_metrics


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_answers_the_daemons_check_and_metrics_stay_as_they_were() -> None:
    registry, port = CollectorRegistry(), free_port()
    Counter("recstream_test_things", "things", registry=registry).inc(3)
    with serve_metrics(registry, "127.0.0.1", port) as endpoint:
        assert _get(port, "/healthz") == (200, "ok\n")  # no check yet: answering is healthy
        reasons: list[str | None] = ["its loop has not run for 99 s (limit 60 s)"]
        endpoint.health = lambda: reasons[-1]
        assert _get(port, "/healthz") == (503, "unhealthy: its loop has not run for 99 s "
                                               "(limit 60 s)\n")
        reasons.append(None)
        assert _get(port, "/healthz") == (200, "ok\n")

        def broken() -> str | None:
            raise RuntimeError("no state yet")

        endpoint.health = broken
        assert _get(port, "/healthz") == (503, "unhealthy: the health check failed: "
                                               "RuntimeError('no state yet')\n")
        status, text = _get(port, "/metrics")
    assert status == 200
    assert "recstream_test_things_total 3.0" in text and "recstream_build_info{" in text


def test_a_heartbeat_goes_stale_and_a_beat_revives_it() -> None:
    heartbeat = Heartbeat(max_silence_s=60.0)
    assert heartbeat.check() is None
    heartbeat.at -= 61
    reason = heartbeat.check()
    assert reason is not None and reason.startswith("its loop has not run for 61 s")
    heartbeat.beat()
    assert heartbeat.check() is None


@pytest.mark.parametrize("path", ["/healthz/", "/health"])
def test_only_healthz_is_the_health_check(path: str) -> None:
    port = free_port()
    with serve_metrics(CollectorRegistry(), "127.0.0.1", port) as endpoint:
        endpoint.health = lambda: "stuck"
        status, text = _get(port, path)
    assert status == 200 and "recstream_build_info" in text  # the metrics page, as before
