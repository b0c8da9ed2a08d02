"""A real Prometheus scrapes the four daemons while the loop runs, and every dashboard
query returns data. Runs where Debian's `prometheus` is installed (on PATH, or named by
PROMETHEUS_BIN; `.ci/run` fetches it), skips with that reason elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from publishing import control_for, publish_env, released_champion
from streaming import SMALL_MODEL, produce, wait_for
from test_dashboards import DASHBOARDS, queries

from common.data.events import DAY_MS
from common.data.synthetic import SyntheticConfig, generate
from common.infra.kafka_clients import ensure_topics
from common.infra.launcher import free_port, stop_pid, wait_for_port
from common.infra.settings import load_settings
from common.model.registry import Registry
from recstream.daemons import LANDER_PORT, TRAINER_PORT, Daemon

PROMETHEUS = next((p for p in (os.environ.get("PROMETHEUS_BIN"), shutil.which("prometheus"))
                   if p and os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus is not installed (apt-get install "
    "prometheus, or set PROMETHEUS_BIN): the dashboards' queries were not run for real")
DAEMONS = {"stream": ["stream", "--dataset", "synthetic"], "lander": ["land"],
           "serving": ["serve"], "scheduler": ["schedule", "--dataset", "synthetic"]}
PORT_SETTINGS = {"stream": TRAINER_PORT, "lander": LANDER_PORT,
                 "serving": "RECSTREAM_SERVING_PORT", "scheduler": "RECSTREAM_NIGHTLY_METRICS_PORT"}


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


class Running:
    """The daemons' processes and ports, and the Prometheus that scrapes them."""

    def __init__(self, home: Path) -> None:
        self.home, self.ports = home, {n: free_port() for n in DAEMONS}
        self.ports["prometheus"] = free_port()
        self.daemons: list[Daemon] = []
        self.prometheus: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """Every daemon's port setting: each of them sees all four, as an operator's."""
        return {PORT_SETTINGS[name]: str(self.ports[name]) for name in DAEMONS}

    def start(self, env: dict[str, str]) -> None:
        for name, argv in DAEMONS.items():
            self.daemons.append(Daemon(name, argv, env, self.home, PORT_SETTINGS[name],
                                       port=self.ports[name]).start())
        config = self.home / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n" + "".join(
            f"  - job_name: {name}\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{self.ports[name]}']\n" for name in DAEMONS))
        with open(self.home / "prometheus.log", "ab") as log:
            self.prometheus = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={config}",
                 f"--storage.tsdb.path={self.home / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}"],
                stdout=log, stderr=log)
        wait_for_port("127.0.0.1", self.ports["prometheus"], 30, self.prometheus, "prometheus")

    def query(self, expr: str) -> list[Any]:
        url = (f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        answer = _get(url)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def up(self) -> set[str]:
        return {r["metric"]["job"] for r in self.query("up == 1")}

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop(timeout_s=20)
        if self.prometheus is not None and self.prometheus.poll() is None:
            stop_pid(self.prometheus.pid, timeout_s=20)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str,
            redis_server: Any) -> Iterator[Running]:
    home = tmp_path_factory.mktemp("scraped")
    world = generate(SyntheticConfig())
    run = Running(home)
    env = {**os.environ, **publish_env(home, redis_server.url, "scrape", **{
        "RECSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSTREAM_KAFKA_TOPIC": "scrape",
        "RECSTREAM_KAFKA_DLQ_TOPIC": "scrape.dlq",
        "RECSTREAM_STREAM_UPDATE_INTERVAL_S": "0.5", "RECSTREAM_STREAM_LANDER_FLUSH_S": "0.5",
        "RECSTREAM_STREAM_REBASE_CHECK_S": "0.5", "RECSTREAM_STREAM_THREADS": "1",
        **run.env(),
        "RECSTREAM_NIGHTLY_CRON": "*/2 * * * * *", "RECSTREAM_NIGHTLY_LATENESS_S": "0",
        "RECSTREAM_NIGHTLY_GUARD_EVENTS": "100", "RECSTREAM_NIGHTLY_GUARD_TIMEOUT_S": "120",
        "RECSTREAM_PUBLISHER_REBASE_TIMEOUT_S": "30", **SMALL_MODEL})}
    settings = load_settings({k: v for k, v in env.items() if k.startswith("RECSTREAM_")})
    ensure_topics(settings.kafka, kafka_bootstrap, ["scrape", "scrape.dlq"])
    day = int(world.day_start_ms[3])
    champion = released_champion(settings, world.dataset, day)
    events = world.dataset.events
    try:
        run.start(env)
        # The day, the first hours of the next (its landing completes the day), a poison.
        first = events.between(day + DAY_MS, None).take(np.arange(500))
        produce(kafka_bootstrap, "scrape", events.between(day, day + DAY_MS), [b"{not json"])
        produce(kafka_bootstrap, "scrape", first)
        wait_for(lambda: Registry(settings.models_dir).aliases()["champion"] != champion, 180,
                 "the scheduled nightly to release the landed day")
        # Events after the release: the guard scores them, serving answers requests.
        produce(kafka_bootstrap, "scrape", events.between(day + DAY_MS, None)
                .take(np.arange(500, 3000)))
        for user in ("u1", "u2", "u3", "nobody-knows-me"):
            _get(f"http://127.0.0.1:{run.ports['serving']}/recall?user_id={user}&k=10")
        wait_for(lambda: bool(run.query("sum(recstream_guard_checks_total) > 0")), 180,
                 "the guard to judge the release")
        wait_for(lambda: run.up() == set(DAEMONS), 30, "every daemon to be up")
        time.sleep(3)  # a few more scrapes: rate() needs two samples in its window
        yield run
    finally:
        run.stop()
        control_for(settings).pub.users.r.close()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_returns_data(running: Running, path: Path) -> None:
    empty = [f"{title}: {expr}" for title, expr in queries(json.loads(path.read_text()))
             if not running.query(expr)]
    assert not empty, "queries without data:\n" + "\n".join(empty)
