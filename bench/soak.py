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
import datetime as dt
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batch.jobs import bootstrap_job  # noqa: E402
from common.data.events import DAY_MS, Events  # noqa: E402
from common.data.synthetic import SyntheticConfig, generate  # noqa: E402
from common.infra.atomic import write_text_atomic  # noqa: E402
from common.infra.broker import EmbeddedBroker  # noqa: E402
from common.infra.kafka_clients import ensure_topics, make_producer  # noqa: E402
from common.infra.redis_server import EmbeddedRedis  # noqa: E402
from common.infra.settings import Settings, load_settings  # noqa: E402
from publisher.control import ReleaseControl  # noqa: E402
from publisher.redis_faiss import RedisFaissPublisher  # noqa: E402
from recstream.daemons import Daemon, lander, trainer  # noqa: E402
from recstream.demo_report import Histogram, counter, read_histogram  # noqa: E402
from stream.replayer import EventProducer  # noqa: E402

BOOTSTRAP_DAYS = 3  # the champion's history; the later days are replayed
K = 50
TICK_S = 0.01  # the producer sends what is due this often
UNKNOWN_USERS = 0.02  # share of queries for users nobody knows (the fallback path)
READY_S = 120.0  # for the daemons to start, join their groups and answer
WARMUP_EVENTS = 200  # sent and settled before the load: both groups joined
POISON = (b"{not json", b'{"event_id": "p", "item_id": "i1", "ts_ms": 1}',
          b'{"event_id": "p", "user_id": "u1", "item_id": "i1", "event_type": "teleport", '
          b'"ts_ms": 1}', b'{"event_id": 7, "user_id": [], "item_id": "i1", "ts_ms": "x"}',
          b'{"pad": "' + b"x" * 70_000 + b'"}')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every figure and the config here")
    return p.parse_args(argv)


class Cycler:
    """The replayed events in time order, endlessly: each pass after the first gets fresh
    event ids (``…~c``) and event time moved on by ``c`` times the span."""

    def __init__(self, events: Events, span_ms: int) -> None:
        self.base, self.span_ms = events, span_ms
        self.cycle, self.pos, self.current = 0, 0, events

    def take(self, n: int) -> Events:
        parts = []
        while n:
            if self.pos == len(self.current):
                self.cycle, self.pos = self.cycle + 1, 0
                c, b = self.cycle, self.base
                self.current = Events(np.array([f"{e}~{c}" for e in b.event_id], dtype=object),
                                      b.user_id, b.item_id, b.event_type, b.value,
                                      b.ts_ms + c * self.span_ms)
            hi = min(self.pos + n, len(self.current))
            parts.append(self.current.take(np.arange(self.pos, hi)))
            n, self.pos = n - (hi - self.pos), hi
        return Events.concat(parts)


# -- the query load (a second process) ----------------------------------------------------


def query_load(port: int, users: list[str], args: dict[str, float], go: Any, out: Any) -> None:
    """Keep-alive connections, each paced to its share of the QPS, until the time is up;
    latency measured here, from send to the whole answer read."""
    out.put("ready")
    go.wait()
    conns = int(args["connections"])
    begin, per_conn = time.perf_counter(), conns / args["qps"]
    end = begin + args["duration"]
    results: list[dict[str, Any]] = [{} for _ in range(conns)]

    def worker(t: int) -> None:
        rng = random.Random(int(args["seed"]) * 1000 + t)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        r: dict[str, Any] = {"lat": [], "status": {}, "failed": 0, "fallbacks": 0}
        due = begin + t * per_conn / conns
        while due < end:
            time.sleep(max(0.0, due - time.perf_counter()))
            due += per_conn
            user = (f"soak-unknown-{rng.randrange(1 << 30)}" if rng.random() < UNKNOWN_USERS
                    else rng.choice(users))
            t0 = time.perf_counter()
            try:
                conn.request("GET", f"/recall?user_id={user}&k={K}")
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                r["failed"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            r["lat"].append(time.perf_counter() - t0)
            r["status"][resp.status] = r["status"].get(resp.status, 0) + 1
            r["fallbacks"] += resp.status == 200 and b'"fallback": null' not in body
        conn.close()
        results[t] = r

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(conns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=args["duration"] + 60)
    status: dict[int, int] = {}
    for r in results:
        for code, n in r.get("status", {}).items():
            status[code] = status.get(code, 0) + n
    out.put({"latencies": [x for r in results for x in r.get("lat", [])], "status": status,
             "failed": sum(r.get("failed", 0) for r in results),
             "fallbacks": sum(r.get("fallbacks", 0) for r in results),
             "seconds": time.perf_counter() - begin})


# -- RSS ----------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (the trainer fetches in a child process of its own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


class RssSampler(threading.Thread):
    """Every ``every_s``: the seconds since start and the RSS in MiB of each process with
    its descendants (summed; how many processes is kept too)."""

    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.every_s = pids, every_s
        self.samples: dict[str, list[tuple[float, float]]] = {n: [] for n in pids}
        self.processes: dict[str, int] = {n: 0 for n in pids}
        self.stop_flag = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            t = round(time.monotonic() - self.t0, 2)
            for name, pid in self.pids.items():
                sizes = [m for p in process_tree(pid) if (m := rss_mib(p)) is not None]
                if sizes:
                    self.samples[name].append((t, round(sum(sizes), 1)))
                    self.processes[name] = max(self.processes[name], len(sizes))
            if self.stop_flag.wait(self.every_s):
                return


def rss_verdict(samples: list[tuple[float, float]], tolerance: float,
                slack_mib: float) -> dict[str, Any]:
    """Start, peak and end RSS; bounded when the last third's peak stays within the first
    third's peak × (1 + tolerance) + slack. The slope (least squares over the last two
    thirds, MiB/min) is reported beside it."""
    if len(samples) < 6:
        return {"samples": len(samples), "bounded": False, "why": "too few samples"}
    t, mib = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
    third = len(samples) // 3
    first_max, last_max = float(mib[:third].max()), float(mib[-third:].max())
    slope = float(np.polyfit(t[third:], mib[third:], 1)[0]) * 60
    return {"start_mib": float(mib[0]), "peak_mib": float(mib.max()), "end_mib": float(mib[-1]),
            "first_third_max_mib": first_max, "last_third_max_mib": last_max,
            "slope_mib_per_min": round(slope, 2), "samples": len(samples),
            "bounded": last_max <= first_max * (1 + tolerance) + slack_mib}


# -- the system ---------------------------------------------------------------------------


class System:
    """Broker, Redis (started here unless configured), the three daemons; ``close`` stops
    everything this started, by pid."""

    def __init__(self, home: Path) -> None:
        self.home, self.servers, self.daemons = home, {}, {}
        self.env: dict[str, str] = {}
        (home / "logs").mkdir(parents=True)

    def start_servers(self, args: argparse.Namespace) -> None:
        """The configured broker and Redis, else embedded ones; topics of this run."""
        base = load_settings()
        bootstrap, redis_url = base.kafka.bootstrap, base.redis.url
        self.broker_name = f"configured {bootstrap}" if bootstrap else "embedded tansu"
        self.redis_name = "configured" if redis_url else "embedded"
        if not bootstrap:
            broker = EmbeddedBroker.start(log_path=self.home / "logs" / "broker.log")
            self.servers["broker"], bootstrap = broker, broker.bootstrap
        if not redis_url:
            redis = EmbeddedRedis.start(log_path=self.home / "logs" / "redis.log")
            self.servers["redis"], redis_url = redis, redis.url
        run = f"soak{uuid.uuid4().hex[:8]}"  # own topics, groups and keys on shared servers
        self.env = {
            **os.environ, "RECSTREAM_HOME": str(self.home),
            "RECSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "RECSTREAM_REDIS_URL": redis_url, "RECSTREAM_REDIS_PREFIX": run,
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
        return {**procs, **{n: s.pid for n, s in self.servers.items()}}

    def close(self) -> None:
        for daemon in self.daemons.values():
            with contextlib.suppress(Exception):
                daemon.stop()
        for server in reversed(list(self.servers.values())):
            server.stop()


# -- the run ------------------------------------------------------------------------------


def produce_load(s: Settings, cycler: Cycler, args: argparse.Namespace) -> dict[str, Any]:
    """Good events at ``rate`` per second for ``duration`` s (what is due every tick), a
    poison record after every 1/poison-share good ones; then flush both producers."""
    ks = s.kafka
    poison_every = round(1 / args.poison_share) if args.poison_share > 0 else 0
    sent = poisoned = 0
    lost: list[BaseException] = []
    raw = make_producer(ks, ks.bootstrap)
    try:
        with EventProducer(ks, ks.bootstrap, ks.topic) as producer:
            t0 = time.monotonic()
            while (elapsed := time.monotonic() - t0) < args.duration:
                due = int(args.rate * elapsed) - sent
                if due <= 0:
                    time.sleep(TICK_S)
                    continue
                producer.produce(cycler.take(due))
                sent += due
                while poison_every and poisoned < sent // poison_every:
                    raw.send(ks.topic, key=b"soak-poison", value=POISON[poisoned % len(POISON)]
                             ).add_errback(lost.append)
                    poisoned += 1
            seconds = time.monotonic() - t0
            producer.flush()
        raw.flush(timeout=60)
    finally:
        raw.close(timeout=5)
    if lost:
        raise RuntimeError(f"{len(lost)} poison records were not delivered: {lost[0]}")
    return {"events": sent, "poison": poisoned, "seconds": round(seconds, 2),
            "events_per_s": round(sent / seconds, 1)}


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


def start_queries(system: System, users: list[str], args: argparse.Namespace
                  ) -> tuple[Any, Any, Any]:
    """The query load's process, imported and waiting for ``go``."""
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    params = {"qps": args.qps, "connections": args.connections, "duration": args.duration,
              "seed": args.seed}
    proc = ctx.Process(target=query_load, name="soak-queries", daemon=True,
                       args=(system.daemons["serving"].port, users, params, go, out))
    proc.start()
    if out.get(timeout=READY_S) != "ready":
        raise RuntimeError("the query load process did not start")
    return proc, go, out


def run(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    """Set up, load, drain; every raw figure of the run."""
    config = SyntheticConfig()  # what `recstream stream --dataset synthetic` loads
    data = generate(config)
    replayed = data.dataset.events.sorted_by_time().between(
        int(data.day_start_ms[BOOTSTRAP_DAYS]), None)
    span_ms = int(data.day_start_ms[-1] - data.day_start_ms[BOOTSTRAP_DAYS]) + DAY_MS
    system, proc = System(home), None
    try:
        system.start_servers(args)
        f: dict[str, Any] = {"broker": system.broker_name, "redis": system.redis_name,
                             "champion": system.release_champion(data)}
        system.start_daemons()
        system.wait_ready()
        cycler = Cycler(replayed, span_ms)
        f["warmup_events"] = WARMUP_EVENTS
        f["freshness_at_warmup"] = system.warm_up(cycler.take(WARMUP_EVENTS))
        proc, go, out = start_queries(system, sorted(set(replayed.user_id.tolist())), args)
        sampler = RssSampler(system.pids(), args.sample_s)
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
        if proc is not None:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
        system.close()


def minus(later: Histogram, earlier: Histogram) -> Histogram:
    """The observations ``later`` holds beyond ``earlier`` (same metric, scraped twice)."""
    if not earlier.count:
        return later
    return Histogram(later.bounds, [a - b for a, b in zip(later.cumulative, earlier.cumulative,
                                                          strict=True)],
                     later.total - earlier.total, later.count - earlier.count)


def by_label(text: str, name: str, label: str) -> dict[str, int]:
    """A labelled counter's values per ``label`` from a /metrics text."""
    return {str(x.labels[label]): int(x.value) for family in text_string_to_metric_families(text)
            if family.name == name for x in family.samples if x.name == name + "_total"}


def _ms(h: Histogram, q: float) -> float:
    return round(h.quantile(q) * 1e3, 2)


def summarise(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, Any]:
    """The figures, the RSS verdicts, the reconciliation and the checks."""
    p = f["produced"]
    fresh = minus(read_histogram(f["trainer_metrics"], "recstream_stream_freshness_seconds"),
                  f["freshness_at_warmup"])
    serving, rss, reconciliation = serving_figures(args, f), rss_report(args, f), reconcile(f)
    checks = {"reconciliation": reconciliation["trainer_holds"]
              and reconciliation["lander_holds"],
              "rss_bounded": all(r["bounded"] for r in rss.values() if r["judged"]),
              "no_5xx_or_failed_requests": serving["errors_5xx"] == 0
              and serving["failed"] == 0,
              "daemons_alive": all(f["alive"].values())}
    return {
        "passed": all(checks.values()), "checks": checks,
        "events": {**p, "offered_per_s": args.rate,
                   "trainer_applied_per_s_during_load": round(
                       (f["applied_at_load_end"] - f["warmup_events"]) / p["seconds"], 1),
                   "drain_s": f["drain_s"]},
        "freshness_p50_s": fresh.quantile(0.5), "freshness_p99_s": fresh.quantile(0.99),
        "freshness_count": fresh.count, "serving": serving, "rss": rss,
        "reconciliation": reconciliation,
        "broker": f["broker"], "redis": f["redis"], "champion": f["champion"]}


def serving_figures(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, Any]:
    """Latency as the load generator measured it and as the server's histogram has it."""
    q = f["queries"]
    server = read_histogram(f["serving_metrics"], "recstream_serving_request_seconds")
    lat = np.asarray(q["latencies"]) * 1e3 if q["latencies"] else np.zeros(1)
    return {"client_p50_ms": round(float(np.percentile(lat, 50)), 2),
            "client_p99_ms": round(float(np.percentile(lat, 99)), 2),
            "client_max_ms": round(float(lat.max()), 2), "qps_offered": args.qps,
            "qps_achieved": round(len(q["latencies"]) / q["seconds"], 1),
            "requests": len(q["latencies"]), "status": q["status"],
            "errors_5xx": sum(n for code, n in q["status"].items() if int(code) >= 500),
            "failed": q["failed"], "fallbacks": q["fallbacks"],
            "fallback_reasons": by_label(f["serving_metrics"], "recstream_serving_fallbacks",
                                         "reason"),
            "server_p50_ms": _ms(server, 0.5), "server_p99_ms": _ms(server, 0.99),
            "server_count": server.count}


def rss_report(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, Any]:
    """Each process tree's RSS verdict over the load (broker and Redis reported, not judged)."""
    rss = {}
    for name, samples in f["rss_samples"].items():
        in_load = [s for s in samples if s[0] <= f["load_end_s"]]
        rss[name] = {**rss_verdict(in_load, args.rss_tolerance, args.rss_slack_mib),
                     "judged": name not in ("broker", "redis"),
                     "processes": f["rss_processes"][name], "timeline": samples}
    return rss


def reconcile(f: dict[str, Any]) -> dict[str, Any]:
    """Produced = applied + dead-lettered = landed + lander rejects; dead letters = poison."""
    p, c = f["produced"], f["counters"]
    total = f["warmup_events"] + p["events"] + p["poison"]
    return {"produced": total, "warmup_events": f["warmup_events"], "poison_sent": p["poison"],
            **c, "dead_letter_reasons": by_label(f["trainer_metrics"],
                                                 "recstream_stream_events_rejected", "reason"),
            "trainer_holds": total == c["applied"] + c["dead_lettered"]
            and c["dead_lettered"] == p["poison"],
            "lander_holds": total == c["landed"] + c["lander_rejected"]
            and c["lander_rejected"] == p["poison"] and c["lander_duplicates"] == 0}


def print_table(args: argparse.Namespace, r: dict[str, Any]) -> None:
    e, sv, rc = r["events"], r["serving"], r["reconciliation"]
    print(f"soak: {args.duration:g} s at {args.rate:,.0f} events/s offered and {args.qps:g} "
          f"QPS, {os.cpu_count()} cpus, broker {r['broker']}, redis {r['redis']}")
    rows = [("events produced", f"{e['events']:,} + {e['poison']} poison in {e['seconds']} s:"
             f" {e['events_per_s']:,.0f} events/s"),
            ("trainer applied during load", f"{e['trainer_applied_per_s_during_load']:,.0f} "
             f"events/s (drained {e['drain_s']} s after the load)"),
            ("freshness (trainer histogram)", f"p50 {r['freshness_p50_s']} s, p99 "
             f"{r['freshness_p99_s']} s over {r['freshness_count']:,} events"),
            ("recall API (load generator)", f"p50 {sv['client_p50_ms']} ms, p99 "
             f"{sv['client_p99_ms']} ms, max {sv['client_max_ms']} ms; {sv['requests']:,} "
             f"requests at {sv['qps_achieved']} QPS, status {sv['status']}, "
             f"{sv['failed']} failed, fallbacks {sv['fallback_reasons']}"),
            ("recall API (server histogram)", f"p50 {sv['server_p50_ms']} ms, p99 "
             f"{sv['server_p99_ms']} ms over {sv['server_count']:,} requests")]
    for name, value in rows:
        print(f"  {name:<31}{value}")
    print(f"  {'RSS MiB':<12}{'start':>8}{'peak':>8}{'end':>8}{'1st⅓ max':>10}"
          f"{'last⅓ max':>11}{'MiB/min':>9}  verdict")
    for name, v in r["rss"].items():
        if "start_mib" not in v:
            print(f"  {name:<12}{v['why']}")
            continue
        verdict = ("bounded" if v["bounded"] else "UNBOUNDED") if v["judged"] else "(info)"
        print(f"  {name:<12}{v['start_mib']:>8.0f}{v['peak_mib']:>8.0f}{v['end_mib']:>8.0f}"
              f"{v['first_third_max_mib']:>10.0f}{v['last_third_max_mib']:>11.0f}"
              f"{v['slope_mib_per_min']:>9.1f}  {verdict}"
              + (f" ({v['processes']} processes)" if v["processes"] > 1 else ""))
    print(f"  reconciliation: produced {rc['produced']:,} = applied {rc['applied']:,} + "
          f"dead-lettered {rc['dead_lettered']:,} {rc['dead_letter_reasons']}: "
          f"{_holds(rc['trainer_holds'])}; = landed "
          f"{rc['landed']:,} + lander rejects {rc['lander_rejected']:,} (duplicates "
          f"{rc['lander_duplicates']}): {_holds(rc['lander_holds'])}")
    failed = [k for k, ok in r["checks"].items() if not ok]
    print(f"  verdict: {'PASS' if r['passed'] else 'FAIL: ' + ', '.join(failed)}")


def _holds(ok: bool) -> str:
    return "holds" if ok else "FAILS"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = round(os.getloadavg()[0], 2)
    home = Path(tempfile.mkdtemp(prefix="recstream-soak-"))
    try:
        result = summarise(args, run(args, home))
    except BaseException:
        print(f"soak failed; logs kept in {home / 'logs'}", file=sys.stderr)
        raise
    print_table(args, result)
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1m_start": load_start,
                         "loadavg_1m_end": round(os.getloadavg()[0], 2),
                         "processor": platform.processor() or platform.machine(),
                         "platform": platform.platform(), "python": platform.python_version()}
    result["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if result["passed"]:
        shutil.rmtree(home, ignore_errors=True)
    else:
        print(f"  logs kept in {home / 'logs'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
