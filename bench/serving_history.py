"""What the history-aware user tower costs the recall API: ``RecallService.recall`` for one
warm user on a model without history, and on history models (``--history-len`` last
positives, ``ids`` and ``vectors`` input, attention pooling) with that many positives in
the user's seen set, on a small synthetic catalogue; an embedded Redis on loopback.

    python bench/serving_history.py --calls 2000

Each model is bootstrapped for one epoch (quality does not matter here), fully published
and released under its own prefix; the user's seen set is topped up to ``--seen``
positives. One torch thread, one FAISS thread, k=50, one call at a time after 100 warm-up
calls; the figures are per call, median and 99th percentile, and the same for the parts
(the Redis read, ``ServedVersion.queries``, the FAISS search).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from batch.jobs import bootstrap_job
from common.data.synthetic import SyntheticConfig, generate
from common.infra.redis_server import EmbeddedRedis
from common.infra.settings import load_settings
from common.model.registry import Registry
from publisher.control import ReleaseControl
from publisher.redis_faiss import RedisFaissPublisher
from serving.recall import RecallService, wait_until_serving

SMALL = {"RECSTREAM_MODEL_EMBEDDING_DIM": "32", "RECSTREAM_MODEL_FEATURE_DIM": "16",
         "RECSTREAM_MODEL_HIDDEN_DIMS": "64", "RECSTREAM_MODEL_OUTPUT_DIM": "32",
         "RECSTREAM_MODEL_MIN_COUNT": "1", "RECSTREAM_TRAIN_THREADS": "1"}


def _quantiles(samples: list[float]) -> dict[str, float]:
    us = np.asarray(samples) * 1e6
    return {"p50_us": round(float(np.percentile(us, 50)), 1),
            "p99_us": round(float(np.percentile(us, 99)), 1)}


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    world = generate(SyntheticConfig(n_users=args.users, n_items=args.items, n_days=4,
                                     events_per_day=args.events_per_day, seed=1)).dataset
    end = int(world.events.ts_ms.max()) + 1
    models = {"no-history": {"RECSTREAM_MODEL_HISTORY_LEN": "0"}}
    for kind in ("ids", "vectors"):
        models[f"{kind}-attention-{args.history_len}"] = {
            "RECSTREAM_MODEL_HISTORY_LEN": str(args.history_len),
            "RECSTREAM_MODEL_HISTORY_INPUT": kind,
            "RECSTREAM_MODEL_HISTORY_POOLING": "attention"}
    out: dict[str, object] = {"items": len(world.catalog()), "history_len": args.history_len,
                              "seen": args.seen, "calls": args.calls, "k": args.k}
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis.start(Path(tmp) / "redis")
        try:
            cases = {name: _serve(Path(tmp) / name, redis.url, world, end, env, args)
                     for name, env in models.items()}
            for case in cases.values():
                for _ in range(100):
                    case.step()
            # Round robin, so the shared machine's load falls on every model alike.
            for _ in range(args.calls):
                for case in cases.values():
                    case.step()
            for name, case in cases.items():
                out[name] = {"seen_items": case.seen, **{
                    part: _quantiles(t) for part, t in case.times.items()}}
                print(name, json.dumps(out[name]), flush=True)
        finally:
            redis.stop()
    return out


class _Case:
    """One released model and its warm user; ``step`` times one recall and its parts."""

    def __init__(self, service: RecallService, user: str, now: int, k: int) -> None:
        self.service, self.user, self.now, self.k = service, user, now, k
        self.served = service.current
        assert self.served is not None
        self.history = self.served.history_len > 0
        self.times: dict[str, list[float]] = {
            "recall": [], "redis_read": [], "queries": [], "faiss_search": []}
        self.seen = len(service.users.seen(user))

    def step(self) -> None:
        served, users = self.served, self.service.users
        t0 = time.perf_counter()
        answer = self.service.recall(self.user, self.k)
        t1 = time.perf_counter()
        rows, recent = users.read_with_seen(served.redis_meta, self.user, self.history)
        t2 = time.perf_counter()
        _, query = served.queries(rows, [recent] if self.history else None, self.now)
        t3 = time.perf_counter()
        served.index.search(query, self.k + len(recent[0]))
        t4 = time.perf_counter()
        assert answer.fallback is None
        for part, t in zip(self.times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            self.times[part].append(t)


def _serve(home: Path, redis_url: str, world, end: int, env: dict[str, str],
           args: argparse.Namespace) -> _Case:
    s = load_settings({"RECSTREAM_HOME": str(home), "RECSTREAM_REDIS_URL": redis_url,
                       "RECSTREAM_REDIS_PREFIX": home.name.replace("-", ""), **SMALL, **env})
    version = bootstrap_job(s, world, None, end, epochs=1, promote=True).version
    control = ReleaseControl.from_settings(s)
    control.publish(version, world)
    control.promote(version)
    pub = RedisFaissPublisher.from_settings(s)
    now = end + 3_600_000
    service = RecallService(s.serving, pub.users, pub.indexes, Registry(s.models_dir),
                            clock=lambda: now)
    wait_until_serving(service, version)
    bundle = Registry(s.models_dir).load(version)[0]
    user = bundle.user_vocab.ids[0]
    seen = set(pub.users.seen(user))
    extra = [i for i in bundle.item_vocab.ids if i not in seen][:max(0, args.seen - len(seen))]
    pub.users.add_seen([user] * len(extra), extra,
                       [end - 60_000 * (len(extra) - j) for j in range(len(extra))])
    return _Case(service, user, now, args.k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--events-per-day", type=int, default=3000)
    p.add_argument("--history-len", type=int, default=50)
    p.add_argument("--seen", type=int, default=60)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out = run(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
