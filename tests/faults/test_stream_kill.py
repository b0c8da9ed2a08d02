"""SIGKILL the stream trainer at random points while events flow: nothing is lost, the
final published vectors equal an uninterrupted run's, and no offset is ever committed
ahead of what was published."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition
from streaming import bootstrap_champion, produce, stream_env, stream_settings, wait_for

from common.data.synthetic import SyntheticConfig, generate
from publisher.files import FilePublisher

BATCH = 250
STEPS = 40
TOLERANCE = 1e-5  # same batches in the same order on one thread: expected bit-identical
KILLS = 6


def _daemon(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "recstream", "stream", "--dataset", "synthetic",
             "--max-steps", str(STEPS)], env={**os.environ, **env}, stdout=out, stderr=out)


class CommitMonitor(threading.Thread):
    """Watches the group's committed offset and what the publisher holds; records any
    moment the committed offset is ahead of everything published so far."""

    def __init__(self, bootstrap: str, topic: str, group: str, publisher: FilePublisher,
                 version: str) -> None:
        super().__init__(daemon=True)
        self.probe = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                   enable_auto_commit=False)
        self.tp = TopicPartition(topic, 0)
        self.publisher, self.version = publisher, version
        self.violations: list[tuple[int, int]] = []
        self.checks = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            committed = self.probe.committed(self.tp) or 0
            # Read after the commit: publishes only grow, so a violation seen is real.
            published = self.publisher.read(self.version).offsets.get(0, 0)
            if committed > published:
                self.violations.append((committed, published))
            self.checks += 1
            time.sleep(0.02)
        self.probe.close()


def test_sigkill_loses_nothing_and_matches_an_uninterrupted_run(
        tmp_path: Path, kafka_bootstrap: str, topic: str, fault) -> None:
    world = generate(SyntheticConfig())  # what `--dataset synthetic` loads
    crash, ref = tmp_path / "crash", tmp_path / "ref"
    extra = {"RECSTREAM_KAFKA_PARTITIONS": "1", "RECSTREAM_STREAM_MAX_BATCH_EVENTS": str(BATCH),
             "RECSTREAM_STREAM_UPDATE_INTERVAL_S": "3600",
             "RECSTREAM_STREAM_CHECKPOINT_EVERY_STEPS": "3"}
    settings = stream_settings(crash, kafka_bootstrap, topic, **extra)
    version = bootstrap_champion(settings, world.dataset, int(world.day_start_ms[2]))
    shutil.copytree(crash / "models", ref / "models")
    starts = world.day_start_ms
    events = world.dataset.events.between(int(starts[2]), int(starts[4])).take(
        np.arange(BATCH * STEPS))
    assert len(events) == BATCH * STEPS
    produce(kafka_bootstrap, topic, events)

    reference = _daemon({**stream_env(ref, kafka_bootstrap, topic, **extra),
                         "RECSTREAM_STREAM_TRAINER_GROUP": "reference"}, tmp_path / "ref.log")
    published = FilePublisher(crash / "published")
    monitor = CommitMonitor(kafka_bootstrap, topic, settings.stream.trainer_group, published,
                             version)
    monitor.start()
    env = stream_env(crash, kafka_bootstrap, topic, **extra)
    rng, kills = random.Random(7), 0
    started = [reference]
    try:
        while kills < KILLS:
            proc = _daemon(env, tmp_path / "crash.log")
            started.append(proc)
            target = published.read(version).deltas + rng.randint(1, 3)

            def reached(proc: subprocess.Popen = proc, target: int = target) -> bool:
                return proc.poll() is not None or published.read(version).deltas >= target

            wait_for(reached, 120, "the trainer to publish")
            time.sleep(rng.uniform(0, 0.15))
            if proc.poll() is not None:
                break  # it finished every step before we could kill it again
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills += 1
        final = _daemon(env, tmp_path / "crash.log")
        started.append(final)
        assert final.wait(180) == 0, (tmp_path / "crash.log").read_text()[-3000:]
        assert reference.wait(180) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        monitor.done.set()
        monitor.join(10)
        for p in started:  # stop what a failed assertion left running, by pid
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert kills >= 5, f"only {kills} kills landed while the trainer ran"
    fault.injected += kills
    assert monitor.checks > 50 and monitor.violations == []
    got, want = published.read(version), FilePublisher(ref / "published").read(version)
    assert got.offsets == want.offsets == {0: len(events)}
    assert set(got.users) == set(want.users) and set(got.items) == set(want.items)
    user_diff = max(float(np.abs(got.users[u] - want.users[u]).max()) for u in want.users)
    item_diff = max(float(np.abs(got.items[i] - want.items[i]).max()) for i in want.items)
    print(f"\n{kills} SIGKILLs, {got.deltas} deltas published (reference {want.deltas}); "
          f"max |diff| users {user_diff:.2e}, items {item_diff:.2e}; "
          f"{monitor.checks} commit checks, 0 violations")
    assert user_diff <= TOLERANCE and item_diff <= TOLERANCE
    fault.events_lost += len(events) - got.offsets.get(0, 0)
    fault.recovered += kills
