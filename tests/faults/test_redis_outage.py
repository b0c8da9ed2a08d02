"""Redis goes away under `recstream serve`: every request still gets an answer (popular
items saying why, or a 503), never a 500; /healthz says unavailable; once Redis is back
the model answers again."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from publishing import publish_env, publish_settings, released_champion
from streaming import wait_for

from common.data.synthetic import SyntheticConfig, generate
from recstream.daemons import Daemon


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_redis_down_under_serving_gets_fallbacks_or_503_and_recovers(
        tmp_path: Path, redis_server: Any, prefix: str, fault, daemons) -> None:
    if redis_server.embedded is None:
        pytest.skip("needs the embedded Redis (a configured or container Redis is not "
                    "stopped by tests)")
    data = generate(SyntheticConfig(n_users=300, n_items=200, n_days=3, events_per_day=2000))
    settings = publish_settings(tmp_path, redis_server.url, prefix)
    version = released_champion(settings, data.dataset, int(data.day_start_ms[2]))
    env = publish_env(tmp_path, redis_server.url, prefix,
                      RECSTREAM_REDIS_SOCKET_TIMEOUT_S="1")
    serve = daemons.start(Daemon("serving", ["serve"], env, tmp_path,
                                 "RECSTREAM_SERVING_PORT"))
    base = f"http://127.0.0.1:{serve.port}"
    wait_for(lambda: _ok(f"{base}/healthz"), 60, "serve to become healthy")
    users = [f"u{i}" for i in range(1, 21)]
    assert all(_get(f"{base}/recall?user_id={u}&k=5")[1]["fallback"] is None for u in users[:3])
    redis_server.stop()
    fault.injected += 1
    try:
        answers = [_get(f"{base}/recall?user_id={u}&k=5") for u in users]
        assert {status for status, _ in answers} <= {200, 503}, answers
        for status, body in answers:
            if status == 200:  # the popular list, and the reason
                assert body["fallback"] == "user store unavailable" and len(body["items"]) == 5
        status, health = _get(f"{base}/healthz")
        assert status == 503 and health["redis"] is False
        assert serve.alive()
    finally:
        redis_server.start()
    back = time.monotonic()
    wait_for(lambda: _ok(f"{base}/healthz"), 60, "serve to become healthy again")
    status, body = _get(f"{base}/recall?user_id=u1&k=5")
    assert status == 200 and body["fallback"] is None and body["version"] == version
    fault.recovered += 1
    fault.recovery_s.append(time.monotonic() - back)


def _ok(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False
