"""The daemons as operators run them: `recstream stream` and `recstream broker`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition
from streaming import bootstrap_champion, produce, stream_env, stream_settings, wait_for

from common.data.synthetic import SyntheticConfig, generate
from common.infra.launcher import free_port, pid_alive
from recstream.cli import main
from stream.checkpoint import load_checkpoint


def _scrape(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return {}
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_sigterm_steps_the_buffer_commits_checkpoints_and_exits_zero(
        tmp_path: Path, kafka_bootstrap: str, topic: str) -> None:
    world = generate(SyntheticConfig())
    port = free_port()
    extra = {"RECSTREAM_STREAM_UPDATE_INTERVAL_S": "3600",  # nothing steps until shutdown
             "RECSTREAM_STREAM_TRAINER_METRICS_PORT": str(port)}
    settings = stream_settings(tmp_path, kafka_bootstrap, topic, **extra)
    bootstrap_champion(settings, world.dataset, int(world.day_start_ms[2]))
    events = world.dataset.events.between(int(world.day_start_ms[2]), None).take(np.arange(300))
    produce(kafka_bootstrap, topic, events)
    log = tmp_path / "stream.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "recstream", "stream", "--dataset",
                                 "synthetic"], env={**os.environ, **stream_env(
                                     tmp_path, kafka_bootstrap, topic, **extra)},
                                stdout=out, stderr=out)
    try:
        wait_for(lambda: _scrape(port).get("recstream_stream_events_consumed_total") == 300,
                 60, "the daemon to consume the events")
        wait_for(lambda: any(k.startswith("recstream_stream_lag_records")
                             for k in _scrape(port)), 10, "the lag gauges")
        metrics = _scrape(port)
        assert metrics["recstream_stream_steps_total"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = load_checkpoint(settings.checkpoints_dir / "trainer")
    assert saved is not None and sum(saved[0].offsets.values()) == 300
    probe = KafkaConsumer(bootstrap_servers=kafka_bootstrap,
                          group_id=settings.stream.trainer_group)
    committed = [probe.committed(TopicPartition(topic, p)) or 0
                 for p in range(settings.kafka.partitions)]
    probe.close()
    assert sum(committed) == 300


def test_stream_without_a_champion_fails_in_one_line(
        tmp_path: Path, kafka_bootstrap: str, topic: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in stream_env(tmp_path, kafka_bootstrap, topic).items():
        monkeypatch.setenv(key, value)
    assert main(["stream", "--dataset", "synthetic"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "champion" in err


def test_stream_rejects_a_bad_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["stream", "--max-steps", "0"])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_broker_start_status_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("RECSTREAM_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path))
    assert main(["broker", "start"]) == 0
    bootstrap = capsys.readouterr().out.strip()
    assert main(["broker", "start"]) == 0  # the running one is reused
    assert capsys.readouterr().out.strip() == bootstrap
    assert main(["broker", "status"]) == 0
    status = capsys.readouterr().out
    pid = int(status.split("pid=")[1].split()[0])
    assert "running" in status and pid_alive(pid)
    assert main(["broker", "stop"]) == 0
    assert capsys.readouterr().out.strip() == "stopped"
    assert not pid_alive(pid)
    assert main(["broker", "status"]) == 0
    assert "not running" in capsys.readouterr().out
