"""What the soak sends: the replayed events, endlessly and at a steady rate, with poison
records on a second producer; and the recall queries, paced, from a second process."""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import random
import threading
import time
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness  # noqa: F401
import numpy as np

from common.data.events import Events
from common.infra.kafka_clients import make_producer
from common.infra.settings import Settings
from stream.replayer import EventProducer

K = 50
TICK_S = 0.01  # the producer sends what is due this often
UNKNOWN_USERS = 0.02  # share of queries for users nobody knows (the fallback path)
POISON = (b"{not json", b'{"event_id": "p", "item_id": "i1", "ts_ms": 1}',
          b'{"event_id": "p", "user_id": "u1", "item_id": "i1", "event_type": "teleport", '
          b'"ts_ms": 1}', b'{"event_id": 7, "user_id": [], "item_id": "i1", "ts_ms": "x"}',
          b'{"pad": "' + b"x" * 70_000 + b'"}')


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


def start_queries(port: int, users: list[str], args: argparse.Namespace,
                  ready_s: float) -> tuple[Any, Any, Any]:
    """The query load's process, imported and waiting for ``go``."""
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    params = {"qps": args.qps, "connections": args.connections, "duration": args.duration,
              "seed": args.seed}
    proc = ctx.Process(target=query_load, name="soak-queries", daemon=True,
                       args=(port, users, params, go, out))
    proc.start()
    if out.get(timeout=ready_s) != "ready":
        raise RuntimeError("the query load process did not start")
    return proc, go, out


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
