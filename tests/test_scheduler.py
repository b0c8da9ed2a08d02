"""`recstream schedule`: the cron trigger fires the nightly, a Redis lock keeps two
schedulers apart, a failing run leaves the champion serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from publishing import control_for, released_champion
from streaming import produce, wait_for
from test_nightly_job import day_ms_of, land_day, nightly_env, world  # noqa: F401

from batch.metrics import NightlyMetrics
from batch.scheduler import LockHeldError, NightlyScheduler, RunLock
from common.data.events import DAY_MS
from common.data.synthetic import SyntheticData
from common.infra.kafka_clients import ensure_topics
from common.infra.launcher import free_port
from common.infra.redis_client import connect
from common.infra.settings import load_settings
from common.infra.shutdown import StopFlag
from common.model.registry import Registry
from recstream.cli import main


def two_hours_after(day_ms: int) -> float:
    """02:00 on the day after ``day_ms``, in seconds: the nightly's usual slot."""
    return (day_ms + DAY_MS + 7_200_000) / 1000


def test_the_cron_trigger_fires_the_nightly(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:  # noqa: F811
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix,
                                         RECSTREAM_NIGHTLY_CRON="* * * * * *"))  # every second
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    stop, metrics = StopFlag(), NightlyMetrics()
    scheduler = NightlyScheduler(settings, world.dataset, control_for(settings), metrics, stop,
                                 clock=lambda: two_hours_after(day_ms))
    thread = threading.Thread(target=scheduler.serve)
    thread.start()
    try:
        wait_for(lambda: Registry(settings.models_dir).aliases()["champion"] != champion, 120,
                 "the scheduled nightly to release a version")
    finally:
        stop.set("test")
        thread.join(60)
    assert not thread.is_alive()
    assert metrics.runs.labels("released")._value.get() == 1
    assert control_for(settings).pub.users.release().champion != champion
    assert metrics.next_run._value.get() > 0


def test_two_schedulers_never_run_the_job_at_once(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:  # noqa: F811
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    # Two processes' worth of state: separate Redis clients, registries and metrics.
    schedulers = [NightlyScheduler(settings, world.dataset, control_for(settings),
                                   NightlyMetrics(), clock=lambda: two_hours_after(day_ms))
                  for _ in range(2)]
    barrier = threading.Barrier(2)
    outcomes: list[Any] = [None, None]

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = schedulers[i].run_once()
        except LockHeldError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    skipped = [o for o in outcomes if isinstance(o, LockHeldError)]
    ran = [o for o in outcomes if isinstance(o, list)]
    assert len(skipped) == 1 and len(ran) == 1, outcomes
    assert [r.result for r in ran[0]] == ["released"]
    assert len(Registry(settings.models_dir).versions()) == 2  # the bootstrap and one nightly
    assert Registry(settings.models_dir).meta(ran[0][0].version)["parent"] == champion
    assert sum(s.metrics.lock_skips._value.get() for s in schedulers) == 1


def test_a_failing_run_leaves_the_champion_and_exits_non_zero(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = nightly_env(tmp_path, redis_url, prefix)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(env)
    # The oldest pending day is the one after the champion's data, and nothing of it has
    # landed.
    champion = released_champion(settings, world.dataset, day_ms_of(world))
    assert main(["schedule", "--run-now", "--dataset", "synthetic"]) == 1
    err = capsys.readouterr().err
    assert "recstream schedule: error: landed: " in err
    assert control_for(settings).pub.users.release().champion == champion
    assert Registry(settings.models_dir).versions() == [champion]


def test_the_lock_is_renewed_while_held_and_free_after(
        tmp_path: Path, redis_url: str, prefix: str) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    client = connect(settings, redis_url)
    key = f"{prefix}:lock:test"
    lock = RunLock(client, key, ttl_s=2.0)
    assert lock.acquire()
    assert not RunLock(client, key, ttl_s=2.0).acquire()
    time.sleep(3.0)  # longer than the TTL: only renewal keeps it
    assert lock.held() and client.pttl(key) > 0
    lock.release()
    assert client.exists(key) == 0
    again = RunLock(client, key, ttl_s=2.0)
    assert again.acquire()
    again.release()


def test_the_daemon_serves_metrics_and_stops_on_sigterm(
        tmp_path: Path, redis_url: str, prefix: str) -> None:
    port = free_port()
    env = {**os.environ, **nightly_env(tmp_path, redis_url, prefix,
                                       RECSTREAM_NIGHTLY_METRICS_PORT=str(port))}
    proc = subprocess.Popen([sys.executable, "-m", "recstream", "schedule", "--dataset",
                             "synthetic"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        def scraped() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                return ""

        wait_for(lambda: "recstream_scheduler_next_run_timestamp_seconds " in scraped()
                 and "recstream_scheduler_next_run_timestamp_seconds 0.0" not in scraped(),
                 60, "the scheduler's /metrics")
        body = scraped()
        assert "recstream_build_info{" in body
        assert 'recstream_nightly_runs_total{result="released"} 0.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_release_is_watched_by_the_guard_in_the_background(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        kafka_bootstrap: str, topic: str) -> None:
    settings = load_settings(nightly_env(
        tmp_path, redis_url, prefix, RECSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap,
        RECSTREAM_KAFKA_TOPIC=topic, RECSTREAM_NIGHTLY_GUARD_EVENTS="1000",
        RECSTREAM_NIGHTLY_GUARD_TIMEOUT_S="120"))
    ensure_topics(settings.kafka, kafka_bootstrap, [topic])
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    metrics = NightlyMetrics()
    scheduler = NightlyScheduler(settings, world.dataset, control_for(settings), metrics,
                                 clock=lambda: two_hours_after(day_ms))
    [report] = scheduler.run_once()
    assert report.result == "released" and report.previous == champion
    assert scheduler.guard_thread is not None and scheduler.guard_thread.is_alive()
    next_day = world.dataset.events.between(day_ms + DAY_MS, day_ms + 2 * DAY_MS)
    produce(kafka_bootstrap, topic, next_day)
    scheduler.guard_thread.join(120)
    assert not scheduler.guard_thread.is_alive()
    # The nightly learned the day; on the next one it is no worse than the bootstrap.
    assert metrics.guard.checks.labels("keep")._value.get() == 1
    assert metrics.guard.auto_rollbacks._value.get() == 0
    assert control_for(settings).pub.users.release().champion == report.version
