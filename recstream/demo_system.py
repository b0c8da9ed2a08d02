"""The whole loop as ``recstream demo`` runs it, in a fresh home of its own.

A broker and a Redis (the configured ones, else embedded ones started here), the
stream trainer and the lander as real ``recstream stream`` / ``recstream land``
processes, the nightly job at each day boundary, and the served state read back the
way the recall API reads it. ``advance(chunk)`` is one lockstep window: the chunk goes
through Kafka and returns once the trainer has published it and committed the offsets
that cover it (publish, then commit: a committed offset means the served state holds
the chunk); on the first chunk of a new day the lander's commit is awaited too and the
nightly trains, publishes and releases the day before.
Everything started here is stopped by ``close`` (by pid).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition

from batch.jobs import bootstrap_job
from batch.metrics import NightlyMetrics
from batch.nightly import NightlyJob, NightlyReport
from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events, format_day
from common.infra.broker import EmbeddedBroker, home_broker
from common.infra.kafka_clients import ensure_topics, make_consumer
from common.infra.launcher import free_port
from common.infra.redis_server import EmbeddedRedis, home_redis
from common.infra.settings import Settings, load_settings
from common.infra.telemetry import scrape
from common.model.registry import Registry
from publisher.control import ReleaseControl
from publisher.redis_faiss import RedisFaissPublisher
from recstream.daemons import Daemon, lander, trainer
from serving.recall import RecallService
from stream.replayer import EventProducer

WAIT_S = 180.0  # for any one wait on a daemon; a stuck demo fails instead of hanging
POLL_S = 0.01  # between two reads of a group's committed offsets


class DemoError(RuntimeError):
    """A daemon of the demo did not keep up or exited; the message names its log."""


@dataclass
class DayNightly:
    """One nightly run of the demo and how long it took."""

    day: str
    report: NightlyReport
    seconds: float


class DemoSystem:
    """Servers, daemons, release control and served state of one demo run."""

    def __init__(self, base: Settings, dataset: Dataset, dataset_name: str,
                 progress: Callable[[str], None]) -> None:
        self.dataset, self.dataset_name, self.progress = dataset, dataset_name, progress
        self.home = base.home / "demo"
        self._servers: list[Any] = []
        self._daemons: dict[str, Daemon] = {}
        self._consumers: dict[str, Any] = {}
        self.nightlies: list[DayNightly] = []
        self.day: int | None = None
        self._reset_home()
        self.env = self._environment(base)
        self.s = load_settings(self.env)
        ensure_topics(self.s.kafka, self.s.kafka.bootstrap,
                      [self.s.kafka.topic, self.s.kafka.dlq_topic])
        self.control = ReleaseControl.from_settings(self.s,
                                                    RedisFaissPublisher.from_settings(self.s))
        self.registry: Registry = self.control.registry
        self.service = RecallService(self.s.serving, self.control.pub.users,
                                     self.control.pub.indexes, self.registry)
        self.producer = EventProducer(self.s.kafka, self.s.kafka.bootstrap, self.s.kafka.topic)
        self.nightly_metrics = NightlyMetrics()

    # -- set-up -----------------------------------------------------------------------

    def _reset_home(self) -> None:
        run_dir = self.home / "run"
        home_broker(run_dir).stop()  # left over from an interrupted demo, if any
        home_redis(run_dir).stop()
        shutil.rmtree(self.home, ignore_errors=True)
        (self.home / "logs").mkdir(parents=True)

    def _environment(self, base: Settings) -> dict[str, str]:
        bootstrap, redis_url = base.kafka.bootstrap, base.redis.url
        if not bootstrap:
            broker = EmbeddedBroker.start(log_path=self.home / "logs" / "broker.log")
            self._servers.append(broker)
            bootstrap = broker.bootstrap
        if not redis_url:
            redis = EmbeddedRedis.start(log_path=self.home / "logs" / "redis.log")
            self._servers.append(redis)
            redis_url = redis.url
        run = f"demo{int(time.time())}"  # fresh topics, groups and keys on shared servers
        self.trainer_metrics_port, self.lander_metrics_port = free_port(), free_port()
        # The stream's ID-row learning rate for MovieLens' small micro-batches, from a
        # prequential sweep (README, The demo); the default 0.2 suits 50k-event steps.
        tuned = {"RECSTREAM_STREAM_LR_EMBEDDING": "0.02"}
        return {**tuned, **os.environ,
                "RECSTREAM_HOME": str(self.home), "RECSTREAM_KAFKA_BOOTSTRAP": bootstrap,
                "RECSTREAM_REDIS_URL": redis_url, "RECSTREAM_REDIS_PREFIX": run,
                "RECSTREAM_KAFKA_TOPIC": f"{run}.interactions",
                "RECSTREAM_KAFKA_DLQ_TOPIC": f"{run}.interactions.dlq",
                "RECSTREAM_STREAM_TRAINER_GROUP": f"{run}.trainer",
                "RECSTREAM_STREAM_LANDER_GROUP": f"{run}.lander",
                # Lockstep: a window arrives whole and the demo waits for it, so the
                # trainer steps as soon as it has read it; days pass in seconds.
                "RECSTREAM_STREAM_UPDATE_INTERVAL_S": "0.02",
                "RECSTREAM_STREAM_REBASE_CHECK_S": "0.1",
                "RECSTREAM_STREAM_LANDER_FLUSH_S": "0.3",
                "RECSTREAM_STREAM_TRAINER_METRICS_PORT": str(self.trainer_metrics_port),
                "RECSTREAM_STREAM_LANDER_METRICS_PORT": str(self.lander_metrics_port),
                "RECSTREAM_NIGHTLY_LATENESS_S": "0",
                # Releases come daily here; a guard watching each would be cut short.
                "RECSTREAM_NIGHTLY_GUARD_EVENTS": "0",
                "RECSTREAM_PUBLISHER_REBASE_TIMEOUT_S": "60"}

    def bootstrap(self, end_ms: int) -> str:
        """Train the first champion on everything before ``end_ms``; publish, release."""
        result = bootstrap_job(self.s, self.dataset, None, end_ms, promote=True)
        self.control.publish(result.version, self.dataset)
        self.control.promote(result.version)
        self.day = end_ms // DAY_MS
        return result.version

    def start_daemons(self) -> None:
        """The stream trainer and the lander, as the processes operators run."""
        logs = self.home / "logs"
        # The trainer's wait for its fetch process is a cheap pipe poll: short, so that a
        # window read is stepped at once (the lander's poll is a broker round trip).
        for daemon in (trainer({**self.env, "RECSTREAM_STREAM_POLL_TIMEOUT_MS": "10"}, logs,
                               self.dataset_name, port=self.trainer_metrics_port),
                       lander(self.env, logs, port=self.lander_metrics_port)):
            self._daemons[daemon.name] = daemon.start()
        for name, group in (("stream", self.s.stream.trainer_group),
                            ("lander", self.s.stream.lander_group)):
            self._consumers[name] = make_consumer(self.s.kafka, self.s.kafka.bootstrap, group)

    # -- one tick ---------------------------------------------------------------------

    def advance(self, chunk: Events) -> None:
        """Send ``chunk`` through Kafka, wait until it is learned (and, at a new day,
        landed), then run the nightly for the day that ended."""
        self.producer.produce(chunk)
        self.producer.flush()
        ends = {TopicPartition(self.s.kafka.topic, p): end
                for p, end in self.producer.acked_offsets().items()}
        self._wait_committed("stream", ends)
        day = int(chunk.ts_ms.min()) // DAY_MS
        if self.day is not None and day > self.day:
            # Like the 02:00 run: the first hours of the new day have landed, so the
            # watermark has passed midnight and yesterday's partition is complete.
            self._wait_committed("lander", ends)
            self._nightly(format_day((day - 1) * DAY_MS))
        self.day = day

    def _nightly(self, day: str) -> None:
        start = time.perf_counter()
        job = NightlyJob(self.s, self.dataset, self.control, self.nightly_metrics)
        report = job.run(day)
        self.nightlies.append(DayNightly(day, report, time.perf_counter() - start))
        self.progress(f"      nightly {day}: {report.result}"
                      + (f" {report.version}" if report.version else "")
                      + (f" ({report.reason})" if report.reason and not report.ok else "")
                      + f" in {time.perf_counter() - start:.1f} s")

    def _wait_committed(self, name: str, ends: dict[TopicPartition, int]) -> None:
        consumer, daemon = self._consumers[name], self._daemons[name]
        deadline = time.monotonic() + WAIT_S
        while True:
            behind = [tp for tp, end in ends.items()
                      if end > 0 and (consumer.committed(tp) or 0) < end]
            if not behind:
                return
            if not daemon.alive():
                raise DemoError(f"the {name} process exited with status {daemon.returncode()}; "
                                f"see {self.home / 'logs' / (name + '.log')}")
            if time.monotonic() > deadline:
                raise DemoError(f"the {name} process did not take in the events within "
                                f"{WAIT_S:.0f} s; see {self.home / 'logs' / (name + '.log')}")
            time.sleep(POLL_S)

    # -- the end ----------------------------------------------------------------------

    def drain(self) -> None:
        """Wait until the trainer and the lander took in everything sent."""
        ends = {TopicPartition(self.s.kafka.topic, p): end
                for p, end in self.producer.acked_offsets().items()}
        self._wait_committed("stream", ends)
        self._wait_committed("lander", ends)

    def trainer_metrics(self) -> str:
        """The stream trainer's /metrics text (empty if it does not answer)."""
        return scrape(self.trainer_metrics_port)

    def lander_metrics(self) -> str:
        """The lander's /metrics text (empty if it does not answer)."""
        return scrape(self.lander_metrics_port)

    def close(self) -> None:
        """Stop the daemons (SIGTERM, then by force) and the servers started here."""
        with contextlib.suppress(Exception):
            self.producer.close()
        for consumer in self._consumers.values():
            with contextlib.suppress(Exception):
                consumer.close(autocommit=False)
        for daemon in self._daemons.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.stop(timeout_s=30, wait_s=5)
        for server in reversed(self._servers):
            server.stop()

