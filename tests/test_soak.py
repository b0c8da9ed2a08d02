"""The soak's CI mode (`make soak`): one minute of replay at 2,000 events/s with 50
recall requests/s against the stream trainer, the lander and serving as processes, on
this session's broker and Redis. Only correctness is asserted, never speed: every event
produced is applied or dead-lettered and landed or rejected, the daemons' memory stays
bounded, no request failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 420  # about 80 s on the shared 2-core machine; a hung run fails instead


@pytest.fixture(scope="module")
def soak(kafka_bootstrap: str, redis_server: Any,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    env = {**os.environ, "RECSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "RECSTREAM_REDIS_URL": redis_server.url}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "60",
                           "--rate", "2000", "--qps", "50", "--json", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert out.exists(), f"the soak wrote no result:\n{done.stdout}\n{done.stderr[-3000:]}"
    result = json.loads(out.read_text())
    result["stdout"] = done.stdout
    result["returncode"] = done.returncode
    return result


def test_every_event_produced_is_applied_or_dead_lettered(soak: dict[str, Any]) -> None:
    rc = soak["reconciliation"]
    assert rc["poison_sent"] > 0
    assert rc["produced"] == rc["applied"] + rc["dead_lettered"], soak["stdout"]
    assert rc["dead_lettered"] == rc["poison_sent"], soak["stdout"]


def test_every_event_produced_is_landed_or_rejected_once(soak: dict[str, Any]) -> None:
    rc = soak["reconciliation"]
    assert rc["produced"] == rc["landed"] + rc["lander_rejected"], soak["stdout"]
    assert rc["lander_rejected"] == rc["poison_sent"], soak["stdout"]
    assert rc["lander_duplicates"] == 0, soak["stdout"]


@pytest.mark.parametrize("daemon", ["stream", "lander", "serving"])
def test_daemon_memory_stays_bounded(soak: dict[str, Any], daemon: str) -> None:
    assert soak["rss"][daemon]["bounded"], soak["stdout"]


def test_no_request_failed_or_got_a_5xx(soak: dict[str, Any]) -> None:
    serving = soak["serving"]
    assert serving["requests"] > 0
    assert serving["errors_5xx"] == 0 and serving["failed"] == 0, soak["stdout"]


def test_daemons_survive_and_the_run_passes(soak: dict[str, Any]) -> None:
    assert soak["checks"]["daemons_alive"], soak["stdout"]
    assert soak["passed"] and soak["returncode"] == 0, soak["stdout"]
