"""The broker stops answering for 30 s while the stream trainer and the lander work:
neither crashes or restarts, the trainer reports how long it has not published, and
after the broker returns every event is applied and landed exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
from streaming import bootstrap_champion, produce, stream_env, stream_settings, wait_for

from common.data.events import DAY_MS, format_day
from common.data.landed import landed_parts, read_landed_day
from common.data.synthetic import SyntheticConfig, generate
from common.infra.broker import EmbeddedBroker
from recstream.daemons import lander, trainer
from recstream.demo_report import gauge

OUTAGE_S = 30.0
BATCH = 2000


def test_broker_unavailable_for_30s_then_everything_is_applied_and_landed_once(
        tmp_path: Path, fault, daemons) -> None:
    world = generate(SyntheticConfig())
    day_ms = int(world.day_start_ms[3])
    events = world.dataset.events.between(day_ms, day_ms + DAY_MS)
    first, second = events.take(np.arange(BATCH)), events.take(np.arange(BATCH, 2 * BATCH))
    # A broker of its own: the outage is a SIGSTOP of its process (connections stay open
    # and nothing answers: the harder case for clients than a refused connection).
    broker = EmbeddedBroker.start(log_path=tmp_path / "broker.log")
    try:
        extra = {"RECSTREAM_STREAM_UPDATE_INTERVAL_S": "0.5",
                 "RECSTREAM_STREAM_LANDER_FLUSH_S": "0.5"}
        settings = stream_settings(tmp_path, broker.bootstrap, "outage", **extra)
        bootstrap_champion(settings, world.dataset, day_ms)
        env = stream_env(tmp_path, broker.bootstrap, "outage", **extra)
        stream = daemons.start(trainer(env, tmp_path))
        land = daemons.start(lander(env, tmp_path))
        produce(broker.bootstrap, "outage", first)
        wait_for(lambda: stream.counter("recstream_stream_events_applied") == BATCH
                 and land.counter("recstream_lander_events") == BATCH, 120,
                 "the first batch applied and landed")
        os.kill(broker.pid, signal.SIGSTOP)
        fault.injected += 1
        stalled_at = time.monotonic()
        while time.monotonic() - stalled_at < OUTAGE_S:
            assert stream.alive() and land.alive(), "a daemon died while the broker was away"
            time.sleep(1.0)
        # The trainer says it has not published for the whole outage.
        assert gauge(stream.metrics(), "recstream_stream_seconds_since_last_publish") \
            >= OUTAGE_S - 5
        os.kill(broker.pid, signal.SIGCONT)
        resumed = time.monotonic()
        produce(broker.bootstrap, "outage", second)
        wait_for(lambda: stream.counter("recstream_stream_events_applied") == 2 * BATCH
                 and land.counter("recstream_lander_events") == 2 * BATCH, 180,
                 "both batches applied and landed after the outage")
        fault.recovered += 1
        fault.recovery_s.append(time.monotonic() - resumed)
        assert stream.starts == 1 and land.starts == 1 and stream.alive() and land.alive()
        landed = read_landed_day(settings.events_dir, format_day(day_ms))
        rows = sum(p.last_offset - p.first_offset + 1
                   for p in landed_parts(settings.events_dir))
        fault.events_lost += 2 * BATCH - len(landed)
        assert len(landed) == rows == 2 * BATCH  # each event landed once
    finally:
        daemons.stop_all()
        broker.stop()
    assert fault.events_lost == 0

