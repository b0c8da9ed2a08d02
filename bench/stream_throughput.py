"""Stream throughput and freshness: how fast the trainer consumer works through a backlog,
against kafka-python's bare poll rate, and how fresh published deltas are at a steady rate.

    python bench/stream_throughput.py --events 1000000 --interval 1 \\
        --json bench/results/stream_throughput.json

Phase A (throughput): N events go into a fresh topic first (the replayer's producer, flat
out); then a group-less consumer only counts them (``raw_poll_per_s``), then the trainer
consumer applies them (``events_per_s``: N over the time from its first records (the
first chunk from its fetch process) to the last event applied, group join excluded;
``events_per_s_incl_join`` includes it).
Phase B (freshness): the trainer runs on another fresh topic while a separate process
replays events at ``--rate`` per second of wall time for ``--duration`` seconds; freshness
is the trainer's own per-event figure, record timestamp (send time) to the step being
recorded after its delta was published and its offsets committed: with ``--publisher
redis`` (the default, as ``recstream stream`` runs) users into Redis and items into the
FAISS index's delta log, with ``files`` the file publisher's hand-off.

Data (``bench/stream_load.py``): a synthetic world (100k users, 20k items at the start);
the champion is bootstrapped for one epoch on the first ``--bootstrap-events`` events; the
streamed events are the days after. Settings are the defaults plus any ``RECSTREAM_*``
variables set (the model and batch size among them); the broker is
``RECSTREAM_KAFKA_BOOTSTRAP`` or an embedded one.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import kafka
import numpy as np
import torch
from kafka import TopicPartition
from stream_load import paced_replay, produce_all, world
from tqdm import tqdm

from batch.jobs import bootstrap_job
from common.data.dataset import Dataset
from common.data.events import Events
from common.infra.kafka_clients import ensure_topics, make_consumer
from common.infra.settings import Settings, load_settings
from common.infra.shutdown import StopFlag
from publisher.control import ReleaseControl
from publisher.redis_faiss import RedisFaissPublisher
from stream.consumer import TrainerConsumer
from stream.daemon import make_publisher, settle_heap

_FRESH_TO = {"redis": "Redis + FAISS delta log", "files": "the file publisher hand-off"}
TIMEOUT_S = 900.0  # for any one wait on the trainer; a stuck run fails instead of hanging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--events", type=int, default=1_000_000, help="phase A backlog size")
    p.add_argument("--interval", type=float, default=1.0, help="update interval, seconds")
    p.add_argument("--rate", type=float, default=15_000.0, help="phase B events per second")
    p.add_argument("--duration", type=float, default=25.0, help="phase B seconds of replay")
    p.add_argument("--partitions", type=int, default=4, help="partitions of each topic")
    p.add_argument("--bootstrap-events", type=int, default=50_000,
                   help="events the champion is trained on (one epoch)")
    p.add_argument("--publisher", choices=["redis", "files"], default="redis",
                   help="where deltas go (default: Redis + FAISS, as the daemon does)")
    return harness.parse(p, argv)


# -- set-up -------------------------------------------------------------------------------


def make_settings(base: Settings, home: Path, bootstrap: str, redis_url: str, name: str,
                  args: argparse.Namespace) -> Settings:
    """The environment's settings on a temp home, one topic/DLQ/group/prefix of our own."""
    return base.model_copy(update={"home": home}).with_overrides(
        kafka={"bootstrap": bootstrap, "topic": name, "dlq_topic": f"{name}.dlq",
               "partitions": args.partitions},
        redis={"url": redis_url, "prefix": name},
        stream={"trainer_group": f"{name}-trainer", "update_interval_s": args.interval,
                "trainer_metrics_port": 0, "lander_metrics_port": 0,
                "publisher": args.publisher})


# -- phase A ------------------------------------------------------------------------------


def raw_poll(settings: Settings, n: int) -> dict[str, float]:
    """A group-less consumer with the project's settings reading ``n`` records, counting."""
    ks = settings.kafka
    consumer = make_consumer(ks, ks.bootstrap, None)
    try:
        consumer.assign([TopicPartition(ks.topic, p) for p in range(ks.partitions)])
        consumer.seek_to_beginning()
        count, first = 0, None
        with tqdm(total=n, unit="rec", unit_scale=True, desc="raw poll") as bar:
            deadline = time.monotonic() + TIMEOUT_S
            while count < n and time.monotonic() < deadline:
                got = sum(len(r) for r in consumer.poll(timeout_ms=100).values())
                if got and first is None:
                    first = time.perf_counter()
                count += got
                bar.update(got)
        seconds = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close()
    if count < n:
        raise RuntimeError(f"raw poll read {count} of {n} records in {TIMEOUT_S:.0f} s")
    return {"raw_poll_per_s": round(n / seconds), "raw_poll_s": round(seconds, 2)}


class TrainerThread:
    """A TrainerConsumer on a thread, with the time its first records arrived from its
    fetch process."""

    def __init__(self, settings: Settings, dataset: Dataset) -> None:
        self.stop = StopFlag()
        self.trainer = TrainerConsumer.from_settings(settings, dataset, make_publisher(settings),
                                                     settings.kafka.bootstrap, stop=self.stop)
        self.trainer.start()
        settle_heap()  # as the daemon does once started
        self.first_record_at: float | None = None
        self.error: BaseException | None = None
        receive = self.trainer.feed.receive

        def timed_receive(*a: Any, **kw: Any) -> Any:
            fetched = receive(*a, **kw)
            if fetched is not None and self.first_record_at is None:
                self.first_record_at = time.perf_counter()
            return fetched

        self.trainer.feed.receive = timed_receive  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self._run, name="trainer", daemon=True)

    def _run(self) -> None:
        try:
            self.trainer.run()
        except BaseException as exc:  # reported by the waits in the main thread
            self.error = exc

    def wait_for(self, condition: Any, what: str, bar: tqdm | None = None) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            if self.error is not None:
                raise RuntimeError(f"the trainer failed: {self.error!r}") from self.error
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the trainer stopped or timed out waiting for {what}")
            self._progress(bar)
            time.sleep(0.01)
        self._progress(bar)

    def _progress(self, bar: tqdm | None) -> None:
        if bar is not None and self.trainer.events_applied > bar.n:
            bar.update(self.trainer.events_applied - bar.n)

    def assigned(self) -> bool:
        return bool(self.trainer.consumer.assignment())

    def step_seconds(self) -> float:
        value = self.trainer.metrics.registry.get_sample_value(
            "recstream_stream_step_seconds_sum")
        return float(value or 0.0)


@contextmanager
def running(settings: Settings, dataset: Dataset) -> Iterator[TrainerThread]:
    t = TrainerThread(settings, dataset)
    t.thread.start()
    try:
        yield t
    finally:
        t.stop.set("bench over")
        t.thread.join(timeout=120)


def trainer_backlog(settings: Settings, dataset: Dataset, n: int) -> dict[str, Any]:
    """The trainer consumer working through an ``n``-event backlog, and the CPU each
    process spent per event while it did."""
    with running(settings, dataset) as t:
        started = time.perf_counter()
        with tqdm(total=n, unit="ev", unit_scale=True, desc="trainer") as bar:
            t.wait_for(lambda: t.first_record_at is not None, "the first records", bar)
            cpu_before = harness.cpu_under(os.getpid(), cpu_name)
            t.wait_for(lambda: t.trainer.events_applied >= n, f"{n} events applied", bar)
            cpu = {k: v - cpu_before.get(k, 0.0)
                   for k, v in harness.cpu_under(os.getpid(), cpu_name).items()}
        done = time.perf_counter()
        steps, step_s = t.trainer.step_no, t.step_seconds()
    assert t.first_record_at is not None
    seconds = done - t.first_record_at
    return {"events_per_s": round(n / seconds), "trainer_s": round(seconds, 2),
            "events_per_s_incl_join": round(n / (done - started)),
            "join_s": round(t.first_record_at - started, 2), "steps": steps,
            "mean_step_s": round(step_s / max(steps, 1), 3),
            "share_in_steps": round(step_s / seconds, 3),
            "cpu_us_per_event": {k: round(v / n * 1e6, 2) for k, v in sorted(cpu.items())},
            "cores_busy": round(sum(cpu.values()) / seconds, 2)}


def cpu_name(pid: int, command: str) -> str:
    """What a process under this one is, for the CPU figures: where a 2-core machine's
    time goes."""
    if pid == os.getpid():
        return "trainer (learner and consumer threads)"
    return "fetch process" if command.startswith("python") else command


# -- phase B ------------------------------------------------------------------------------


def freshness(settings: Settings, dataset: Dataset, events: Events,
              args: argparse.Namespace) -> dict[str, float]:
    """Freshness percentiles while the producer replays at a steady rate."""
    n = min(len(events), math.ceil(args.rate * args.duration))
    events = events.take(np.arange(n))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with running(settings, dataset) as t:
        t.wait_for(t.assigned, "a partition assignment")
        proc = ctx.Process(target=paced_replay, name="paced-replay",
                           args=(settings.kafka, settings.kafka.topic, events, args.rate, out))
        proc.start()
        try:
            with tqdm(total=n, unit="ev", unit_scale=True, desc="freshness") as bar:
                t.wait_for(lambda: t.trainer.events_applied >= n or not proc.is_alive(),
                           "the paced replay", bar)
                t.wait_for(lambda: t.trainer.events_applied >= n, f"{n} events applied", bar)
            sent = out.get(timeout=60)
        finally:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
        fresh = t.trainer.freshness.values().astype(np.float64)
        steps = t.trainer.step_no
    return {"freshness_p50_s": harness.percentile(fresh, 50),
            "freshness_p99_s": harness.percentile(fresh, 99),
            "freshness_max_s": round(float(fresh.max()), 3),
            "freshness_events": int(len(fresh)),
            "achieved_rate": round(sent["sent"] / sent["send_s"]),
            "replay_s": round(sent["send_s"], 2), "freshness_steps": steps}


# -- the run ------------------------------------------------------------------------------


def release(settings: Settings, dataset: Dataset, version: str) -> None:
    """Publish the champion fully to Redis + FAISS and release it (the stream's target)."""
    control = ReleaseControl.from_settings(settings, RedisFaissPublisher.from_settings(settings))
    control.publish(version, dataset)
    control.promote(version)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    base = load_settings()
    if base.train.threads:
        torch.set_num_threads(base.train.threads)
    dataset, history, after = world(args)
    if len(after) < args.events:
        raise SystemExit(f"the synthetic world has {len(after)} events to stream, "
                         f"fewer than --events {args.events}")
    with harness.temp_home() as home, \
            harness.servers(base, home, redis=args.publisher == "redis") as found:
        run_id = uuid.uuid4().hex[:8]
        a, b = (make_settings(base, home, found.bootstrap, found.redis_url, name, args)
                for name in (f"bench-{run_id}", f"bench-fresh-{run_id}"))
        figures = measure(args, a, b, dataset, history, after)
    redis = found.redis if args.publisher == "redis" else "none (file publisher)"
    result = report(args, a, figures, f"{found.broker}; redis: {redis}")
    harness.write_json(args.json, result)
    return result


def measure(args: argparse.Namespace, a: Settings, b: Settings, dataset: Dataset,
            history: Events, after: Events) -> dict[str, Any]:
    """The champion, then phase A on ``a``'s topic and prefix, B on ``b``'s."""
    for s in (a, b):
        ensure_topics(s.kafka, a.kafka.bootstrap, [s.kafka.topic, s.kafka.dlq_topic])
    figures: dict[str, Any] = {}
    with harness.Timer() as timer:
        version = bootstrap_job(a, dataset, None, int(history.ts_ms[-1]) + 1, epochs=1,
                                promote=True).version
    figures["bootstrap_s"] = round(timer.s, 1)
    if args.publisher == "redis":
        for s in (a, b):  # one prefix each: phase B starts from the champion again
            release(s, dataset, version)
    if a.stream.threads:  # the trainer daemon's setting, as `recstream stream` does
        torch.set_num_threads(a.stream.threads)
    figures.update(produce_all(a, after.take(np.arange(args.events))))
    figures.update(raw_poll(a, args.events))
    figures.update(trainer_backlog(a, dataset, args.events))
    figures["ratio_to_raw"] = round(figures["events_per_s"] / figures["raw_poll_per_s"], 3)
    shutil.rmtree(a.checkpoints_dir, ignore_errors=True)  # phase B starts afresh
    figures.update(freshness(b, dataset, after.take(np.arange(args.events, len(after))), args))
    return figures


def report(args: argparse.Namespace, s: Settings, figures: dict[str, Any],
           broker: str) -> dict[str, object]:
    """Print the table and return the JSON document."""
    result: dict[str, object] = {
        k: figures[k] for k in ("events_per_s", "raw_poll_per_s", "ratio_to_raw",
                                "freshness_p50_s", "freshness_p99_s")}
    result.update(events=args.events, interval_s=args.interval, rate=args.rate,
                  partitions=args.partitions, threads=torch.get_num_threads(),
                  publisher=args.publisher,
                  freshness_to=_FRESH_TO[args.publisher],
                  freshness_note="record timestamp (send time) to the step recorded after its "
                  "delta was published and its offsets committed")
    result["details"] = figures
    result["config"] = {
        "duration_s": args.duration, "bootstrap_events": args.bootstrap_events,
        "seed": args.seed, "max_batch_events": s.stream.max_batch_events,
        "checkpoint_every_steps": s.stream.checkpoint_every_steps,
        "stream_batch_size": s.stream.batch_size, "stream_threads": s.stream.threads,
        "embedding_dim": s.model.embedding_dim,
        "hidden_dims": list(s.model.hidden_dims), "output_dim": s.model.output_dim,
        "max_poll_records": s.kafka.max_poll_records, "broker": broker}
    result["machine"] = harness.machine(torch=torch.__version__, kafka_python=kafka.__version__)
    result["date"] = harness.now()
    f = figures
    print(f"stream throughput: {args.events:,} events, interval {args.interval} s, "
          f"{args.partitions} partitions, {torch.get_num_threads()} torch threads "
          f"({os.cpu_count()} cpus), broker: {broker}")
    rows = [("produce (replayer, flat out)", f"{f['produce_per_s']:,} ev/s"),
            ("raw kafka-python poll", f"{f['raw_poll_per_s']:,} rec/s"),
            ("trainer consumer, backlog", f"{f['events_per_s']:,} ev/s "
             f"(×{f['ratio_to_raw']} of raw; {f['events_per_s_incl_join']:,} with the "
             f"{f['join_s']} s join)"),
            ("  steps / mean step / in steps", f"{f['steps']} / {f['mean_step_s']} s / "
             f"{f['share_in_steps']:.0%}"),
            ("  CPU µs per event", ", ".join(f"{k} {v}" for k, v in
                                             f["cpu_us_per_event"].items()) +
             f" ({f['cores_busy']} cores busy)"),
            (f"freshness at {f['achieved_rate']:,} ev/s", f"p50 {f['freshness_p50_s']} s, "
             f"p99 {f['freshness_p99_s']} s (to {_FRESH_TO[args.publisher]})")]
    harness.print_rows(rows, 32)
    return result


if __name__ == "__main__":
    main()
