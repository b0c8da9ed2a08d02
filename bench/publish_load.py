"""The recall API's load in the publish benchmark: a second process keeping keep-alive
connections busy with random known users, latency timed by the client."""

from __future__ import annotations

import argparse
import http.client
import multiprocessing as mp
import queue
import random
import threading
import time
from typing import Any

import harness
import numpy as np
from publish_search import K
from tqdm import tqdm

WARMUP_S = 2.0


def load_from_process(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the client process against ``port`` and summarise what it measured."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=client_load, name="api-load",
                       args=(port, args.api_users, args.concurrency, args.duration,
                             args.seed, out))
    proc.start()
    try:
        wait = WARMUP_S + args.duration + 120  # spawn and imports included
        with tqdm(total=round(args.duration), unit="s", desc="api load") as bar:
            deadline = time.monotonic() + wait
            got: dict[str, Any] | None = None
            while got is None and time.monotonic() < deadline:
                try:
                    got = out.get(timeout=1.0)
                except queue.Empty:
                    if not proc.is_alive():
                        raise RuntimeError("the load process exited without a result") from None
                    bar.update(min(1, bar.total - bar.n))
            if got is None:
                raise RuntimeError(f"no result from the load process in {wait:.0f} s")
            bar.update(bar.total - bar.n)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
    ms = np.asarray(got["latencies"]) * 1e3
    return {"api_p50_ms": harness.percentile(ms, 50),
            "api_p99_ms": harness.percentile(ms, 99),
            "api_max_ms": round(float(ms.max()), 3),
            "api_qps": round(len(ms) / got["seconds"], 1), "api_requests": len(ms),
            "api_errors": got["errors"], "api_fallbacks": got["fallbacks"],
            "api_short_answers": got["short"]}


def client_load(port: int, users: int, concurrency: int, duration: float, seed: int,
                out: Any) -> None:
    """``concurrency`` keep-alive connections, one thread each, asking for random known
    users until the time is up; latency measured here, after a warm-up."""
    begin = time.perf_counter() + WARMUP_S
    end = begin + duration
    results: list[dict[str, Any]] = [{} for _ in range(concurrency)]

    def worker(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        lat: list[float] = []
        errors = fallbacks = short = 0
        while (t0 := time.perf_counter()) < end:
            try:
                conn.request("GET", f"/recall?user_id=u{rng.randrange(users)}&k={K}")
                resp = conn.getresponse()
                body, ok = resp.read(), resp.status == 200
            except (OSError, http.client.HTTPException):
                body, ok = b"", False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            elapsed = time.perf_counter() - t0
            if t0 < begin:
                continue
            lat.append(elapsed)
            errors += not ok
            fallbacks += ok and b'"fallback": null' not in body
            short += ok and body.count(b'"item_id"') < K
        conn.close()
        results[t] = {"lat": lat, "errors": errors, "fallbacks": fallbacks, "short": short}

    threads = [threading.Thread(target=worker, args=(t,), daemon=True)
               for t in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=duration + WARMUP_S + 60)
    seconds = max(time.perf_counter(), end) - begin
    out.put({"latencies": [x for r in results for x in r.get("lat", [])],
             "errors": sum(r.get("errors", 0) for r in results),
             "fallbacks": sum(r.get("fallbacks", 0) for r in results),
             "short": sum(r.get("short", 0) for r in results), "seconds": min(seconds, duration)})
