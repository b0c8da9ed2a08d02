"""SIGKILL the lander after a rename before its commit, mid-flush and between flushes
while events flow (some sent twice): after the restarts every event is landed exactly
once and the committed offsets are the produced ones."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_lander import (
    REPO,
    committed,
    event,
    landed_ids,
    landed_rows,
    lander_env,
    produce_events,
    wait_until,
)

from common.data.landed import landed_parts
from common.infra.kafka_clients import ensure_topics
from common.infra.settings import Settings, load_settings


class LanderProcesses:
    """``recstream land`` subprocesses started one after another, each with its own log."""

    def __init__(self, home: Path, bootstrap: str, topic: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
        self.env.update(lander_env(home, bootstrap, topic, RECSTREAM_LOG_LEVEL="INFO"))
        self.home, self.logs = home, list[Path]()

    def start(self) -> subprocess.Popen:
        self.logs.append(self.home / f"lander-{len(self.logs)}.log")
        with open(self.logs[-1], "ab") as log:
            return subprocess.Popen([sys.executable, "-m", "recstream", "land"], cwd=REPO,
                                    env=self.env, stdout=log, stderr=log)

    def log_text(self) -> str:
        return self.logs[-1].read_text()

    def kill_when(self, condition: Callable[[], bool], what: str) -> None:
        """Start one and SIGKILL it the moment ``condition`` holds."""
        proc = self.start()
        try:
            wait_until(condition, 30, what)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)


def test_sigkilled_lander_restarts_with_every_event_landed_once(fault, tmp_path: Path,
                                                                kafka_bootstrap: str,
                                                                topic: str) -> None:
    settings = load_settings(lander_env(tmp_path, kafka_bootstrap, topic))
    ensure_topics(settings.kafka, kafka_bootstrap, [topic])
    events = [event(n, day=n % 3) for n in range(450)]
    ends: dict[int, int] = {}
    producing = threading.Thread(target=produce_slowly, args=(settings, events, ends),
                                 daemon=True)
    producing.start()
    landers = LanderProcesses(tmp_path, kafka_bootstrap, topic)

    def rows() -> int:
        return landed_rows(settings.events_dir)

    def files() -> int:
        return len(landed_parts(settings.events_dir))

    rows_before = rows()
    landers.kill_when(lambda: rows() > rows_before, "a file: after a rename, before a commit")
    files_before = files()
    landers.kill_when(lambda: files() >= files_before + 2, "a second file: mid-flush")
    landers.kill_when(lambda: "committed" in landers.log_text(), "a commit: between flushes")
    fault.injected += 3
    proc = landers.start()
    try:
        # Its SIGTERM handler is installed before it logs that it starts.
        wait_until(lambda: "lander starting" in landers.log_text(), 30, "the last start")
        producing.join(60)
        wait_until(lambda: rows() >= len(events), 60, f"all {len(events)} events to land")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert committed(settings, 3) == {p: ends[p] + 1 if p in ends else None for p in range(3)}
    counts = collections.Counter(landed_ids(settings.events_dir))
    assert set(counts) == {e["event_id"] for e in events}
    assert max(counts.values()) == 1
    fault.events_lost += len({e["event_id"] for e in events} - set(counts))
    fault.recovered += 3


def produce_slowly(settings: Settings, events: list[dict[str, Any]], ends: dict[int, int]
                   ) -> None:
    """Produce over several seconds, re-sending some (as retries do); note the last offsets."""
    for start in range(0, len(events), 15):
        batch = events[start:start + 15]
        for meta in produce_events(settings, batch + batch[:2]):
            ends[meta.partition] = max(ends.get(meta.partition, -1), meta.offset)
        time.sleep(0.4)  # pacing the producer, not waiting for a condition
