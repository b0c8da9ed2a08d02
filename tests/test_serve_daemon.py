"""``recstream serve`` as a process: answers from the released version, exits on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from publishing import publish_env, publish_settings, released_champion
from streaming import wait_for

from common.data.synthetic import SyntheticConfig, generate
from common.infra.launcher import free_port


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path, redis_url: str,
                                                    prefix: str) -> None:
    data = generate(SyntheticConfig(n_users=300, n_items=200, n_days=3, events_per_day=2000))
    settings = publish_settings(tmp_path, redis_url, prefix)
    version = released_champion(settings, data.dataset, int(data.day_start_ms[2]))
    port = free_port()
    env = {**os.environ, **publish_env(tmp_path, redis_url, prefix,
                                       RECSTREAM_SERVING_PORT=str(port))}
    proc = subprocess.Popen([sys.executable, "-m", "recstream", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(f"{base}/healthz")[0] == 200, 60, "serve to become healthy")
        status, body = _get(f"{base}/recall?user_id=nobody&k=3")
        assert status == 200 and body["version"] == version and len(body["items"]) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
