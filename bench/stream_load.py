"""What the stream throughput benchmark sends: a synthetic world's events, flat out into a
topic (the backlog) or paced at a steady rate from a process of its own (freshness)."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import numpy as np
from tqdm import tqdm

from common.data.dataset import Dataset
from common.data.events import Events
from common.data.synthetic import SyntheticConfig, generate
from common.data.wire_batch import check_events
from common.infra.settings import Settings
from common.infra.settings_groups import KafkaSettings
from stream.replayer import CHUNK_EVENTS, EventProducer

EVENTS_PER_DAY = 200_000


def world(args: argparse.Namespace) -> tuple[Dataset, Events, Events]:
    """The data set, the champion's training slice, and the events to stream after it."""
    streamed = args.events + math.ceil(args.rate * args.duration * 1.2)
    n_days = 1 + math.ceil(streamed / EVENTS_PER_DAY)
    data = generate(SyntheticConfig(n_users=100_000, n_items=20_000, n_clusters=50,
                                    n_days=n_days, events_per_day=EVENTS_PER_DAY,
                                    seed=args.seed))
    events = data.dataset.events.sorted_by_time()
    check_events(events)
    history = events.take(np.arange(min(args.bootstrap_events, len(events))))
    after = events.between(int(data.day_start_ms[1]), None)
    return data.dataset, history, after


def produce_all(settings: Settings, events: Events) -> dict[str, float]:
    """Every event into the settings' topic, flat out; the rate includes the final flush."""
    ks = settings.kafka
    with harness.Timer() as timer, EventProducer(ks, ks.bootstrap, ks.topic) as producer, \
            tqdm(total=len(events), unit="ev", unit_scale=True, desc="produce") as bar:
        for lo in range(0, len(events), CHUNK_EVENTS):
            chunk = events.take(np.arange(lo, min(lo + CHUNK_EVENTS, len(events))))
            producer.produce(chunk, checked=True)
            bar.update(len(chunk))
        producer.flush()
    return {"produce_s": round(timer.s, 2), "produce_per_s": round(len(events) / timer.s)}


def paced_replay(ks: KafkaSettings, topic: str, events: Events, rate: float,
                 out: Any) -> None:
    """Send ``events`` at ``rate`` per second of wall time (slices of 10 ms); runs in a
    process of its own so the trainer has the interpreter to itself."""
    step = max(1, round(rate / 100))
    with EventProducer(ks, ks.bootstrap, topic) as producer:
        producer.produce(events.take(np.arange(1)), checked=True)  # metadata, connections
        producer.flush()
        start = time.monotonic()
        for lo in range(1, len(events), step):
            delay = start + (lo - 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            producer.produce(events.take(np.arange(lo, min(lo + step, len(events)))),
                             checked=True)
        seconds = time.monotonic() - start
        producer.flush()
    out.put({"sent": len(events), "send_s": seconds})
