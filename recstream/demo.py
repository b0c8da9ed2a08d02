"""``recstream demo``: the freshness story end to end on embedded defaults.

Fetch MovieLens-100K, start a broker and a Redis (embedded unless configured), bootstrap
a champion on everything before the test window (the last 30 days), then replay the
window's first days through Kafka in lockstep windows of one minute of event time: each
window's positives are scored from every arm first (prequential), then the window is
produced and the demo waits until the stream trainer has published it and committed the
offsets that cover it, so the next window is scored from a served state that includes
it. At each day boundary the nightly trains the day before, publishes it and releases
it after the trainer's rebase. Arms: nightly-only (the champion as trained, histories as
of its nightly), nightly+stream (the served state, read by the recall API's code path)
and popularity. Meanwhile a second process measures the offline freshness curve on the
same days. Writes ``RECSTREAM_HOME/report/`` (Markdown, JSON, PNG plots), prints the
summary and stops everything it started.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from batch.evaluation import default_train_before
from common.data.datasets import load_dataset
from common.data.events import DAY_MS, Events, format_day, parse_day
from common.evaluation.baselines import PopularityScorer
from common.evaluation.prequential import PrequentialResult, prequential_arms
from common.evaluation.two_tower import ChampionScorer
from common.infra.redis_client import redacted
from common.infra.settings import Settings
from recstream.demo_curve import OfflineCurve
from recstream.demo_report import counter, per_day_rows, read_histogram, write_report
from recstream.demo_system import DemoSystem
from serving.scorer import ServedScorer

TEST_DAYS = 30  # the test window; the bootstrap learns everything before it
WINDOW_MS = 60_000  # event time per lockstep window
REPLAY_BUDGET_S = 300.0  # the replay takes as many of the window's first days as fit
MIN_DAYS = 3
# What one lockstep window and one nightly cost on the 2-core reference machine, measured
# on a busy one (README, The demo: 0.10 s and 3 s). Days are planned from these, not from
# the clock, so the same command replays the same days anywhere and the offline curve can
# start on them at once.
WINDOW_COST_S = 0.1
NIGHTLY_COST_S = 3.0
CURVE_DELAYS_S = (60, 86400)
CURVE_MODELS = ("recent_popularity", "history_knn", "nightly", "nightly+stream")
KS = (10, 50)
ARMS = ("nightly-only", "nightly+stream", "popularity")


def plan_days(window: Events, window_ms: int = WINDOW_MS, budget_s: float = REPLAY_BUDGET_S,
              min_days: int = MIN_DAYS) -> int:
    """How many of the test window's first days the replay takes: as many as
    ``budget_s`` holds at the measured cost per non-empty window and per nightly, at
    least ``min_days`` (fewer only if the window is shorter).

    >>> ev = Events.from_columns(event_id=list("abcd"), user_id=list("uuuu"),
    ...                          item_id=list("ijkl"), ts_ms=[0, 1, DAY_MS, 2 * DAY_MS])
    >>> plan_days(ev, budget_s=0.0, min_days=1), plan_days(ev, budget_s=8.0, min_days=1)
    (1, 2)
    """
    day = window.ts_ms // DAY_MS
    cost, n = 0.0, 0
    for d in range(int(day.min()), int(day.max()) + 1):
        cost += len(np.unique(window.ts_ms[day == d] // window_ms)) * WINDOW_COST_S \
            + NIGHTLY_COST_S
        if cost > budget_s and n >= min_days:
            break
        n += 1
    return n


def run_demo(settings: Settings, dataset_name: str = "ml-100k", days: int | None = None,
             window_ms: int = WINDOW_MS, test_days: int = TEST_DAYS,
             curve_delays_s: Sequence[int] = CURVE_DELAYS_S,
             curve_models: Sequence[str] = CURVE_MODELS) -> dict[str, Any]:
    """Run the replay and the offline curve, write the report; returns the summary (with
    ``env``: the settings the demo's daemons ran with, for a look at what it left behind).

    ``days``: replay this many of the test window's first days instead of the plan.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    say(f"[1/6] loading {dataset_name} (cache: {settings.data_cache})")
    dataset = load_dataset(dataset_name, settings.data_cache)
    split_ms = parse_day(default_train_before(dataset.events, test_days))
    history, window = dataset.events.between(None, split_ms), dataset.events.between(split_ms)
    n_days = min(days or plan_days(window, window_ms), test_days)
    replay = window.between(None, split_ms + n_days * DAY_MS)
    system = DemoSystem(settings, dataset, dataset_name, say)
    curve: OfflineCurve | None = None
    try:
        say(f"[2/6] broker {system.s.kafka.bootstrap}, Redis {redacted(system.s.redis.url)}, "
            f"state in {system.home}")
        say(f"[3/6] bootstrapping on {len(history):,} events before {format_day(split_ms)}")
        mark = time.perf_counter()
        champion = system.bootstrap(split_ms)
        timings["bootstrap_s"] = time.perf_counter() - mark
        if curve_delays_s:
            curve = OfflineCurve(system.env, dataset_name, champion, split_ms, n_days,
                                 curve_delays_s, curve_models,
                                 system.home / "freshness_curve.json").start()
        say(f"      {champion} released; starting the stream trainer and the lander"
            + ("; the offline freshness curve runs alongside" if curve else ""))
        system.start_daemons()
        catalog = dataset.catalog()
        rt = settings.train.rating_threshold
        served = ServedScorer(system.service, dataset, catalog)
        nightly_only = ChampionScorer(system.registry, dataset, catalog, rt)
        arms = {"nightly-only": Timed(nightly_only), "nightly+stream": Timed(served),
                "popularity": Timed(PopularityScorer(history, catalog, rt))}

        def clock(ts_ms: int) -> None:
            # The history clock of both two-tower arms: the window's start in event time.
            served.now_ms = nightly_only.now_ms = ts_ms - ts_ms % window_ms

        n_windows = len(np.unique(replay.ts_ms // window_ms))
        say(f"[4/6] replaying {n_days} days ({len(replay):,} events, {n_windows:,} windows "
            f"of {window_ms / 1000:g} s) through Kafka in lockstep")
        progress = DayProgress(system, int(replay.ts_ms.min()) // DAY_MS, n_days, window_ms)
        mark = time.perf_counter()
        results = prequential_arms(arms, progress.advance, catalog, replay, KS,
                                   chunk_events=None, chunk_ms=window_ms, rating_threshold=rt,
                                   seen=history, before_chunk=clock)
        progress.finish()
        system.drain()
        timings["replay_s"] = time.perf_counter() - mark
        timings["scoring_s"] = sum(a.seconds for a in arms.values())
        timings["nightlies_s"] = sum(n.seconds for n in system.nightlies)
        curve_report = None
        if curve is not None:
            say("[5/6] waiting for the offline freshness curve")
            mark = time.perf_counter()
            curve_report = curve.result()
            timings["curve_wait_s"] = time.perf_counter() - mark
            timings["curve_s"] = curve_report["seconds_total"]
        say("[6/6] writing the report")
        timings["total_s"] = time.perf_counter() - started
        summary = _summary(system, dataset_name, results, timings, replay, history, n_days,
                           n_windows, window_ms, curve_report)
        freshness = read_histogram(system.trainer_metrics(), "recstream_stream_freshness_seconds")
        out = write_report(settings.home / "report", summary, per_day_rows(results, KS),
                           list(ARMS), KS, freshness, curve_report)
    finally:
        mark = time.perf_counter()
        if curve is not None:
            curve.stop()
        system.close()
        say(f"      stopped the daemons and servers in {time.perf_counter() - mark:.1f} s")
    print(out.read_text().split("\n## Per day")[0])
    print(f"report: {out} (+ demo.json, recall_per_day.png, freshness.png"
          + (", recall_vs_delay.png)" if curve_report else ")"))
    return {**summary, "env": {k: v for k, v in system.env.items()
                               if k.startswith("RECSTREAM_")}}


class Timed:
    """A scorer that adds up the time spent in its ``score``."""

    def __init__(self, scorer: Any) -> None:
        self.scorer, self.seconds = scorer, 0.0

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        mark = time.perf_counter()
        try:
            return np.asarray(self.scorer.score(user_ids))
        finally:
            self.seconds += time.perf_counter() - mark


class DayProgress:
    """Advances the system window by window and prints a line per replayed day."""

    def __init__(self, system: DemoSystem, first_day: int, days: int, window_ms: int) -> None:
        self.system, self.first_day, self.days = system, first_day, days
        self.window_ms = window_ms
        self.day, self.events, self.windows = first_day, 0, 0
        self.started = time.perf_counter()

    def advance(self, chunk: Events) -> None:
        day = int(chunk.ts_ms.min()) // DAY_MS
        if day != self.day:
            self._print_day()
            self.day, self.events, self.windows = day, 0, 0
            self.started = time.perf_counter()
        self.system.advance(chunk)
        self.events += len(chunk)
        self.windows += 1

    def _print_day(self) -> None:
        n = self.day - self.first_day + 1
        say(f"      day {n}/{self.days} {format_day(self.day * DAY_MS)}: {self.events:5d} "
            f"events in {self.windows:4d} windows, {time.perf_counter() - self.started:.1f} s")

    def finish(self) -> None:
        self._print_day()


def _summary(system: DemoSystem, dataset_name: str, results: dict[str, Any],
             timings: dict[str, float], replay: Events, history: Events, n_days: int,
             n_windows: int, window_ms: int, curve: dict[str, Any] | None) -> dict[str, Any]:
    text = system.trainer_metrics()
    freshness = read_histogram(text, "recstream_stream_freshness_seconds")
    steps = read_histogram(text, "recstream_stream_step_seconds")
    nightly = [n.report for n in system.nightlies]
    released = sum(r.result == "released" for r in nightly)
    first: PrequentialResult = next(iter(results.values()))[KS[0]]
    first_day = int(replay.ts_ms.min()) // DAY_MS * DAY_MS
    days = (format_day(first_day), format_day(first_day + (n_days - 1) * DAY_MS))
    return {
        "dataset": dataset_name, "days": n_days, "first_day": days[0], "last_day": days[1],
        "events": len(replay), "windows": n_windows, "window_s": window_ms / 1000,
        "setup": setup_paragraph(dataset_name, days, len(history), len(replay), n_windows,
                                 window_ms, len(first.hit), first.n_skipped_seen,
                                 len(system.nightlies)),
        "recall": {arm: {f"recall@{k}": round(per_k[k].recall, 4) for k in KS}
                   for arm, per_k in results.items()},
        "scored_positives": len(first.hit),
        "skipped_seen": first.n_skipped_seen,
        "nightly": {"released": released, "not_released": len(nightly) - released,
                    "runs": [{"day": n.day, "result": n.report.result,
                              "version": n.report.version, "reason": n.report.reason,
                              "seconds": round(n.seconds, 2),
                              "recall@50": n.report.metrics.get("recall@50")}
                             for n in system.nightlies]},
        "counters": {"events_sent": len(replay),
                     "trainer_consumed": counter(text, "recstream_stream_events_consumed"),
                     "trainer_applied": counter(text, "recstream_stream_events_applied"),
                     "lander_landed": counter(system.lander_metrics(), "recstream_lander_events")},
        "freshness_p50_s": freshness.quantile(0.5), "freshness_p99_s": freshness.quantile(0.99),
        "trainer_steps": steps.count,
        "trainer_events_per_s": round(freshness.count / steps.total, 1) if steps.total else 0.0,
        "timings_s": {k.removesuffix("_s"): round(v, 1) for k, v in timings.items()},
        "wall_s": round(timings["total_s"], 1),
        "offline_curve": curve,
    }


def setup_paragraph(dataset_name: str, days: tuple[str, str], n_history: int, n_events: int,
                    n_windows: int, window_ms: int, scored: int, skipped: int,
                    nightlies: int) -> str:
    """What was replayed and what each arm is, in one paragraph."""
    w = f"{window_ms / 1000:g}-second"
    return (
        f"A champion is bootstrapped on the {n_history:,} {dataset_name} events before "
        f"{days[0]}; then the days {days[0]} to {days[1]} ({n_events:,} events) are replayed "
        f"through Kafka in lockstep {w} windows of event time ({n_windows:,} non-empty "
        "windows; empty ones are skipped). For each window, every arm first ranks the whole "
        "catalogue for each positive in it (rating at or above the threshold; items the "
        "user already rated are excluded, and positives on them are not scored): the window "
        "is scored before the system sees it. Then the window is produced to Kafka and the "
        "demo waits until the stream trainer has committed offsets covering it, which it "
        "does only after publishing the window's deltas, so the next window is scored from "
        "a served state that includes this one. At each day boundary the nightly trains one "
        "epoch on the landed day, gates it on a held-out tail, publishes it and releases it "
        f"once the stream has rebased onto it ({nightlies} nightlies). **nightly+stream** is "
        "the served state: the users' rows in Redis, their histories as the stream wrote "
        "them, and the FAISS item index with the stream's deltas, read through "
        "serving.scorer.ServedScorer (the recall API's code path) with the history clock at "
        "the window's start. **nightly-only** is the released champion with its weights as "
        "trained and the users' histories as of its nightly (positives through the last day "
        "it trained on), nothing in between. **popularity** counts positives before the "
        f"replay. Recall@K is over {scored:,} scored positives ({skipped:,} positives on "
        "already-rated items skipped).")


def say(line: str) -> None:
    print(line, flush=True)
