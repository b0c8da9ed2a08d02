"""``recstream demo``: the main job end to end on embedded defaults.

Fetch MovieLens-100K, start a broker and a Redis (embedded unless configured), bootstrap
a champion on everything before the last 30 days, then simulate those 30 days: each
day's events go through Kafka in time chunks into the running stream trainer and
lander processes; at each day boundary the nightly trains the day before, publishes it
and releases it after the trainer's rebase. Every chunk is scored before the system
sees it (prequential) by three arms on the same events: the nightly models alone, the
served state (nightly + stream, read from Redis and the FAISS index as the recall API
reads it) and a popularity baseline. Writes ``RECSTREAM_HOME/report/`` (Markdown, JSON,
PNG plots), prints the summary and stops everything it started.
"""

from __future__ import annotations

import time
from typing import Any

from batch.evaluation import default_train_before
from common.data.events import DAY_MS, format_day, parse_day
from common.data.movielens import load_dataset
from common.evaluation.baselines import PopularityScorer
from common.evaluation.prequential import prequential_arms
from common.evaluation.two_tower import ChampionScorer
from common.infra.redis_client import redacted
from common.infra.settings import Settings
from recstream.demo_report import counter, per_day_rows, read_histogram, write_report
from recstream.demo_system import DemoSystem
from serving.scorer import ServedScorer

TEST_DAYS = 30
KS = (10, 50)
CHUNK_MS = 6 * 3_600_000  # simulated time between the trainer's updates, at most
CHUNK_EVENTS = 300  # ... or this many events
ARMS = ("nightly-only", "nightly+stream", "popularity")


def run_demo(settings: Settings, dataset_name: str = "ml-100k", test_days: int = TEST_DAYS,
             chunk_events: int = CHUNK_EVENTS) -> dict[str, Any]:
    """Run the simulation and write the report; returns the summary (with ``env``: the
    settings the demo's daemons ran with, for a look at what it left behind)."""
    started = time.perf_counter()
    say(f"[1/5] loading {dataset_name} (cache: {settings.data_cache})")
    dataset = load_dataset(dataset_name, settings.data_cache)
    split = default_train_before(dataset.events, test_days)
    split_ms = parse_day(split)
    history, test = dataset.events.between(None, split_ms), dataset.events.between(split_ms)
    system = DemoSystem(settings, dataset, dataset_name, say)
    try:
        say(f"[2/5] broker {system.s.kafka.bootstrap}, Redis {redacted(system.s.redis.url)}, "
            f"state in {system.home}")
        say(f"[3/5] bootstrapping on {len(history):,} events before {split}")
        champion = system.bootstrap(split_ms)
        say(f"      {champion} released; starting the stream trainer and the lander")
        system.start_daemons()
        catalog = dataset.catalog()
        arms = {"nightly-only": ChampionScorer(system.registry, dataset, catalog),
                "nightly+stream": ServedScorer(system.service, dataset, catalog),
                "popularity": PopularityScorer(history, catalog,
                                               settings.train.rating_threshold)}
        say(f"[4/5] simulating {test_days} days ({len(test):,} events) through Kafka")
        progress = DayProgress(system, test.ts_ms.min() // DAY_MS, test_days)
        results = prequential_arms(arms, progress.advance, catalog, test, KS,
                                   chunk_events=chunk_events, chunk_ms=CHUNK_MS,
                                   rating_threshold=settings.train.rating_threshold,
                                   seen=history)
        progress.finish()
        system.drain()
        say("[5/5] writing the report")
        summary = _summary(system, dataset_name, results, time.perf_counter() - started,
                           len(test), test_days, chunk_events)
        freshness = read_histogram(system.trainer_metrics(), "recstream_stream_freshness_seconds")
        out = write_report(settings.home / "report", summary, per_day_rows(results, KS),
                           list(ARMS), KS, freshness)
    finally:
        system.close()
    print(out.read_text().split("\n## Per day")[0])
    print(f"report: {out} (+ demo.json, recall_per_day.png, freshness.png)")
    return {**summary, "env": {k: v for k, v in system.env.items()
                               if k.startswith("RECSTREAM_")}}


class DayProgress:
    """Advances the system chunk by chunk and prints a line per simulated day."""

    def __init__(self, system: DemoSystem, first_day: int, days: int) -> None:
        self.system, self.first_day, self.days = system, first_day, days
        self.day, self.events, self.started = first_day, 0, time.perf_counter()

    def advance(self, chunk: Any) -> None:
        day = int(chunk.ts_ms.min()) // DAY_MS
        if day != self.day:
            self._print_day()
            self.day, self.events, self.started = day, 0, time.perf_counter()
        self.system.advance(chunk)
        self.events += len(chunk)

    def _print_day(self) -> None:
        n = self.day - self.first_day + 1
        say(f"      day {n:2d}/{self.days} {format_day(self.day * DAY_MS)}: {self.events:5d} "
            f"events streamed in {time.perf_counter() - self.started:.1f} s")

    def finish(self) -> None:
        self._print_day()


def _summary(system: DemoSystem, dataset_name: str, results: dict[str, Any], wall_s: float,
             n_events: int, test_days: int, chunk_events: int) -> dict[str, Any]:
    text = system.trainer_metrics()
    freshness = read_histogram(text, "recstream_stream_freshness_seconds")
    steps = read_histogram(text, "recstream_stream_step_seconds")
    nightly = [n.report for n in system.nightlies]
    released = sum(r.result == "released" for r in nightly)
    return {
        "dataset": dataset_name, "days": test_days, "events": n_events,
        "setup": (f"Bootstrap on the data before the last {test_days} days; then each day's "
                  f"events through Kafka in chunks of at most {CHUNK_MS // 3_600_000} h or "
                  f"{chunk_events} events, each scored before the system sees it "
                  "(prequential, items the user had seen excluded). nightly-only: the "
                  "registry champion as trained; nightly+stream: the served state (Redis "
                  "user rows + FAISS index with the stream's deltas); popularity: positives "
                  "before the split."),
        "recall": {arm: {f"recall@{k}": round(per_k[k].recall, 4) for k in KS}
                   for arm, per_k in results.items()},
        "scored_positives": len(next(iter(results.values()))[KS[0]].hit),
        "nightly": {"released": released, "not_released": len(nightly) - released,
                    "runs": [{"day": n.day, "result": n.report.result,
                              "version": n.report.version, "reason": n.report.reason,
                              "seconds": round(n.seconds, 2),
                              "recall@50": n.report.metrics.get("recall@50")}
                             for n in system.nightlies]},
        "counters": {"events_sent": n_events,
                     "trainer_consumed": counter(text, "recstream_stream_events_consumed"),
                     "trainer_applied": counter(text, "recstream_stream_events_applied"),
                     "lander_landed": counter(system.lander_metrics(), "recstream_lander_events")},
        "freshness_p50_s": freshness.quantile(0.5), "freshness_p99_s": freshness.quantile(0.99),
        "trainer_steps": steps.count,
        "trainer_events_per_s": round(freshness.count / steps.total, 1) if steps.total else 0.0,
        "wall_s": round(wall_s, 1),
    }


def say(line: str) -> None:
    print(line, flush=True)
