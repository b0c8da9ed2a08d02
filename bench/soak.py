"""Soak: the stream trainer, the lander and the recall API as real processes under a
sustained event replay and a concurrent query load; are they still right, and bounded?

    python bench/soak.py --duration 60 --rate 2000 --qps 50 --json bench/results/soak.json
    python bench/soak.py --duration 3600                 # long mode

A fresh home with a broker and a Redis (``RECSTREAM_KAFKA_BOOTSTRAP`` /
``RECSTREAM_REDIS_URL`` if set, else embedded ones), a champion bootstrapped on the first
days of the default synthetic data set (what ``recstream stream --dataset synthetic``
loads) and released, then ``recstream stream``, ``land`` and ``serve``. Once both
consumers hold their partitions and serving answers, this process replays the later days
at ``--rate`` events/s for ``--duration`` s (cycling with fresh event ids and event time
moved on a cycle's span when it needs more events than the data holds), with a share of
poison records (bad JSON, missing ids, unknown type, oversized) on a second producer,
while a second process sends keep-alive ``GET /recall?user_id=…&k=50`` at ``--qps``.
Every ``--sample-s`` the daemons' VmRSS is read from /proc. After the load the trainer
and the lander must drain, and their counters must reconcile with what was produced.

Exit status 1 when a correctness check fails: the reconciliation, RSS bounded (the last
third's peak within ``--rss-tolerance`` + ``--rss-slack-mib`` of the first third's),
no 5xx or failed request, every daemon alive. Speed figures never fail the run.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
from soak_load import Cycler, produce_load, start_queries
from soak_report import print_table, summarise

from batch.jobs import bootstrap_job
from common.data.events import DAY_MS, Events
from common.data.synthetic import SyntheticConfig, generate
from common.infra.kafka_clients import ensure_topics
from common.infra.settings import Settings, load_settings
from publisher.control import ReleaseControl
from publisher.redis_faiss import RedisFaissPublisher
from recstream.daemons import Daemon, lander, trainer
from recstream.demo_report import Histogram, counter, read_histogram
from stream.replayer import EventProducer

BOOTSTRAP_DAYS = 3  # the champion's history; the later days are replayed
READY_S = 120.0  # for the daemons to start, join their groups and answer
WARMUP_EVENTS = 200  # sent and settled before the load: both groups joined


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (1 h: 3600)")
    p.add_argument("--rate", type=float, default=2000.0, help="events per second offered")
    p.add_argument("--qps", type=float, default=50.0, help="recall requests per second")
    p.add_argument("--connections", type=int, default=2, help="keep-alive connections")
    p.add_argument("--poison-share", type=float, default=0.001,
                   help="poison records per good event (dead-lettered on purpose)")
    p.add_argument("--interval", type=float, default=1.0, help="trainer update interval, s")
    p.add_argument("--lander-flush", type=float, default=5.0, help="lander flush interval, s")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval, s")
    p.add_argument("--rss-tolerance", type=float, default=0.10,
                   help="last third's peak RSS may exceed the first third's by this share")
    p.add_argument("--rss-slack-mib", type=float, default=16.0, help="... plus this much")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds the daemons get to take in the last events")
    return harness.parse(p, argv)


# -- the system ---------------------------------------------------------------------------


class System:
    """The three daemons on the run's broker and Redis (``harness.servers``); ``close``
    stops the daemons, by pid."""

    def __init__(self, home: Path, servers: harness.Servers) -> None:
        self.home, self.servers = home, servers
        self.daemons: dict[str, Daemon] = {}
        self.env: dict[str, str] = {}
        (home / "logs").mkdir(parents=True, exist_ok=True)

    def configure(self, args: argparse.Namespace) -> None:
        """The daemons' settings: this run's own topics, groups and keys (the servers may
        be shared)."""
        bootstrap = self.servers.bootstrap
        run = f"soak{uuid.uuid4().hex[:8]}"
        self.env = {
            **os.environ, "RECSTREAM_HOME": str(self.home),
            "RECSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "RECSTREAM_REDIS_URL": self.servers.redis_url, "RECSTREAM_REDIS_PREFIX": run,
            "RECSTREAM_KAFKA_TOPIC": f"{run}.interactions",
            "RECSTREAM_KAFKA_DLQ_TOPIC": f"{run}.interactions.dlq",
            "RECSTREAM_STREAM_TRAINER_GROUP": f"{run}.trainer",
            "RECSTREAM_STREAM_LANDER_GROUP": f"{run}.lander",
            "RECSTREAM_STREAM_UPDATE_INTERVAL_S": str(args.interval),
            "RECSTREAM_STREAM_LANDER_FLUSH_S": str(args.lander_flush),
            "RECSTREAM_SERVING_VERSION_POLL_S": "1"}
        self.s: Settings = load_settings(self.env)
        ensure_topics(self.s.kafka, bootstrap, [self.s.kafka.topic, self.s.kafka.dlq_topic])

    def release_champion(self, data: Any) -> str:
        """Bootstrap on the first days, publish it fully and release it."""
        end_ms = int(data.day_start_ms[BOOTSTRAP_DAYS])
        version = bootstrap_job(self.s, data.dataset, None, end_ms, epochs=1,
                                promote=True).version
        control = ReleaseControl.from_settings(self.s, RedisFaissPublisher.from_settings(self.s))
        try:
            control.publish(version, data.dataset)
            control.promote(version)
        finally:
            control.pub.users.r.close()
        return version

    def start_daemons(self) -> None:
        logs = self.home / "logs"
        for daemon in (trainer(self.env, logs), lander(self.env, logs),
                       Daemon("serving", ["serve"], self.env, logs, "RECSTREAM_SERVING_PORT")):
            self.daemons[daemon.name] = daemon.start()

    def wait_ready(self) -> None:
        """Every daemon answers on its port and serving is healthy."""
        deadline = time.monotonic() + READY_S
        while not (all(self.daemons[n].metrics() for n in ("stream", "lander"))
                   and self._healthy()):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemons were not ready in {READY_S:.0f} s; see "
                                   f"{self.home / 'logs'}")
            time.sleep(0.2)

    def warm_up(self, events: Events) -> Histogram:
        """Send ``events`` and wait until both consumers settled them: the load then starts
        on joined groups. Returns the freshness histogram so far (the group join's)."""
        ks = self.s.kafka
        with EventProducer(ks, ks.bootstrap, ks.topic) as producer:
            producer.produce(events)
            producer.flush()
        c = drain(self, len(events), READY_S)
        if c["applied"] < len(events) or c["landed"] < len(events):
            self._check_alive()
            raise RuntimeError(f"the warm-up events were not applied and landed in "
                               f"{READY_S:.0f} s ({c}); see {self.home / 'logs'}")
        return read_histogram(self.daemons["stream"].metrics(),
                              "recstream_stream_freshness_seconds")

    def _check_alive(self) -> None:
        dead = [n for n, d in self.daemons.items() if not d.alive()]
        if dead:
            raise RuntimeError(f"{dead[0]} exited; see {self.home / 'logs' / dead[0]}.log")

    def _healthy(self) -> bool:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", self.daemons["serving"].port, 5)
            conn.request("GET", "/healthz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        return False

    def pids(self) -> dict[str, int]:
        procs = {n: d.proc.pid for n, d in self.daemons.items() if d.proc is not None}
        return {**procs, **self.servers.pids}

    def close(self) -> None:
        for daemon in self.daemons.values():
            with contextlib.suppress(Exception):
                daemon.stop()


# -- the run ------------------------------------------------------------------------------


def drain(system: System, produced: int, timeout_s: float) -> dict[str, int]:
    """Wait until the trainer and the lander have settled every record produced (applied
    or dead-lettered; landed or rejected), or the timeout; their counters then."""
    trainer, lander = system.daemons["stream"], system.daemons["lander"]
    deadline = time.monotonic() + timeout_s
    while True:
        t, la = trainer.metrics(), lander.metrics()
        c = {"applied": counter(t, "recstream_stream_events_applied"),
             "dead_lettered": counter(t, "recstream_stream_events_rejected"),
             "consumed": counter(t, "recstream_stream_events_consumed"),
             "landed": counter(la, "recstream_lander_events"),
             "lander_rejected": counter(la, "recstream_lander_rejected"),
             "lander_duplicates": counter(la, "recstream_lander_duplicates")}
        settled = (c["applied"] + c["dead_lettered"] >= produced
                   and c["landed"] + c["lander_rejected"] + c["lander_duplicates"] >= produced)
        if settled or time.monotonic() > deadline or not (trainer.alive() and lander.alive()):
            return c
        time.sleep(0.5)


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Set up, load, drain; every raw figure of the run."""
    data = generate(SyntheticConfig())  # what `recstream stream --dataset synthetic` loads
    replayed = data.dataset.events.sorted_by_time().between(
        int(data.day_start_ms[BOOTSTRAP_DAYS]), None)
    span_ms = int(data.day_start_ms[-1] - data.day_start_ms[BOOTSTRAP_DAYS]) + DAY_MS
    with harness.servers(load_settings(), home) as servers:
        system = System(home, servers)
        try:
            system.configure(args)
            f: dict[str, Any] = {"broker": servers.broker, "redis": servers.redis,
                                 "champion": system.release_champion(data)}
            system.start_daemons()
            system.wait_ready()
            users = sorted(set(replayed.user_id.tolist()))
            return {**f, **load(args, system, Cycler(replayed, span_ms), users)}
        finally:
            system.close()


def load(args: argparse.Namespace, system: System, cycler: Cycler,
         users: list[str]) -> dict[str, Any]:
    """Warm up, then the events and the queries at once with RSS sampled, then drain."""
    f: dict[str, Any] = {"warmup_events": WARMUP_EVENTS,
                         "freshness_at_warmup": system.warm_up(cycler.take(WARMUP_EVENTS))}
    proc, go, out = start_queries(system.daemons["serving"].port, users, args, READY_S)
    try:
        sampler = harness.RssSampler(system.pids(), args.sample_s)
        sampler.start()
        go.set()
        f["produced"] = produce_load(system.s, cycler, args)
        f["applied_at_load_end"] = system.daemons["stream"].counter(
            "recstream_stream_events_applied")
        f["load_end_s"] = time.monotonic() - sampler.t0
        f["queries"] = out.get(timeout=args.duration + READY_S)
        drain_start = time.monotonic()
        settled = WARMUP_EVENTS + f["produced"]["events"] + f["produced"]["poison"]
        f["counters"] = drain(system, settled, args.drain_timeout)
        f["drain_s"] = round(time.monotonic() - drain_start, 2)
        sampler.stop_flag.set()
        sampler.join()
        f["rss_samples"], f["rss_processes"] = sampler.samples, sampler.processes
        f["alive"] = {n: d.alive() for n, d in system.daemons.items()}
        f["trainer_metrics"] = system.daemons["stream"].metrics()
        f["serving_metrics"] = system.daemons["serving"].metrics()
        return f
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = harness.loadavg()
    home = Path(tempfile.mkdtemp(prefix="recstream-soak-"))
    try:
        result = summarise(args, run(args, home))
    except BaseException:
        print(f"soak failed; logs kept in {home / 'logs'}", file=sys.stderr)
        raise
    print_table(args, result)
    result["config"] = harness.config_of(args)
    result["machine"] = harness.machine(load_start)
    result["date"] = harness.now()
    harness.write_json(args.json, result)
    if result["passed"]:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"  logs kept in {home / 'logs'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
