"""Shared fixtures. Integration tests get a real broker: ``RECSTREAM_KAFKA_BOOTSTRAP``
if set, else an apache/kafka container when a Docker engine answers, else the
embedded tansu launcher (the same one the daemons use)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests import their factories as a plain module.
sys.path.insert(0, str(Path(__file__).parent))


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _say(config: pytest.Config, line: str) -> None:
    """A line in the test run's output (not captured): which broker the run used."""
    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n{line}")


@pytest.fixture(scope="session")
def kafka_bootstrap(pytestconfig: pytest.Config) -> Iterator[str]:
    """Bootstrap servers of a real Kafka-compatible broker for this test session."""
    configured = os.environ.get("RECSTREAM_KAFKA_BOOTSTRAP")
    if configured:
        _say(pytestconfig, f"[broker] RECSTREAM_KAFKA_BOOTSTRAP={configured}")
        yield configured
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:3.8.0").with_kraft() as kafka:
            _say(pytestconfig, "[broker] testcontainers apache/kafka:3.8.0")
            yield kafka.get_bootstrap_server()
        return
    from common.broker import EmbeddedBroker

    with EmbeddedBroker.start() as broker:
        _say(pytestconfig, f"[broker] embedded tansu on {broker.bootstrap}")
        yield broker.bootstrap


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A fresh topic name (and its DLQ name + ``.dlq``) for one test."""
    return f"t-{uuid.uuid4().hex[:10]}"
