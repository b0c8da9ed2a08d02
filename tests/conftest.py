"""Shared fixtures. Integration tests get a real broker and a real Redis: the
``RECSTREAM_KAFKA_BOOTSTRAP`` / ``RECSTREAM_REDIS_URL`` they name if set, else
apache/kafka and redis containers when a Docker engine answers, else the embedded
launchers (the same ones the daemons use). The run prints which it took."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from common.infra.redis_client import redacted

# Fuzz profiles (tests/test_fuzz_*.py): "ci", the default, is reproducible (derandomized)
# and quick; HYPOTHESIS_PROFILE=long runs 50x the cases with fresh randomness. Not a
# RECSTREAM_* variable: the settings loader refuses names it does not know.
hypothesis_settings.register_profile(
    "ci", max_examples=1000, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.register_profile(
    "long", max_examples=50_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
    from common.infra.broker import EmbeddedBroker

    with EmbeddedBroker.start() as broker:
        _say(pytestconfig, f"[broker] embedded tansu on {broker.bootstrap}")
        yield broker.bootstrap


@dataclass
class RedisServer:
    """The test session's Redis; ``restart`` is possible only for the embedded one."""

    url: str
    embedded: Any = None
    data_dir: Path | None = None

    def stop(self) -> None:
        self.embedded.stop()

    def start(self) -> None:
        """Start the embedded server again on the same port (its data kept on disk)."""
        from common.infra.redis_server import EmbeddedRedis

        self.embedded = EmbeddedRedis.start(self.data_dir, port=self.embedded.port)


@pytest.fixture(scope="session")
def redis_server(pytestconfig: pytest.Config,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis for this test session."""
    configured = os.environ.get("RECSTREAM_REDIS_URL")
    if configured:
        _say(pytestconfig, f"[redis] RECSTREAM_REDIS_URL={redacted(configured)}")
        yield RedisServer(configured)
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.4") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            _say(pytestconfig, "[redis] testcontainers redis:7.4")
            yield RedisServer(f"redis://{host}:{port}/0")
        return
    from common.infra.redis_server import EmbeddedRedis

    data_dir = tmp_path_factory.mktemp("redis")
    server = RedisServer("", EmbeddedRedis.start(data_dir), data_dir)
    server.url = server.embedded.url
    _say(pytestconfig, f"[redis] embedded {server.url}")
    try:
        yield server
    finally:
        server.embedded.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    """A fresh Redis key prefix for one test (tests share the session's server)."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A fresh topic name (and its DLQ name + ``.dlq``) for one test."""
    return f"t-{uuid.uuid4().hex[:10]}"
