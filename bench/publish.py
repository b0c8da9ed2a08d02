"""Publisher and serving at scale: a full Redis publish of N users against a raw MSET of
the same bytes, the FAISS item index over N items (build, recall, query latency), and the
recall API's latency under concurrent load.

    python bench/publish.py --users 1000000 --items 1000000 \\
        --json bench/results/publish.json

Phase 1 (Redis): N users' float32 ID embeddings (``--dim`` wide, 256 bytes at 64) go
through ``UserStore.begin/write/complete`` in chunks of 100k users, as
``RedisFaissPublisher.publish_full`` writes them (feature width 0: the packed rows of an
empty feature table); ``redis_used_memory_bytes`` is read right after. The version is
then dropped and, once the server has freed it (``lazyfree_pending_objects`` 0), the
baseline writes the same bytes under N separate string keys (``{prefix}:raw:{i}``) with
plain MSETs of 10k keys, two per pipelined round trip (the user store's 20k fields per
flush). Both start from the same, otherwise empty, namespace on the same server.
Phase 2 (FAISS): N unit item vectors around 2048 random unit centres (cluster weights
log-normal, sigma 1) with isotropic Gaussian noise of norm 1.25 against the unit centre
(two items of a cluster have a cosine of about 0.4); queries are users mixing two or
three interests (the sum of their centres, normalised, with the same noise), so they sit
off the item manifold and their top 100 spans clusters and IVF lists; seeded. (At noise
0.75 with item-like queries, 16 of 4096 lists already found 0.99 of the exact top 100.)
``index_build_s`` is ``IndexStore.write_full`` (id hashing, the index, the nprobe
sweep on 200 queries of its own, files with checksums); ``build_index_s`` the FAISS build
alone. Recall@100 is against an exact ``IndexFlatIP`` over 200 other queries; latency is
one query of k=100 at a time on one FAISS thread, 1000 queries; a sweep over nprobe shows
the trade-off.
Phase 3 (API): a model bundle with ``--api-users`` users and the N items in its
vocabularies (untrained: vectors are random, latency is what matters) is registered,
published with ``publish_full`` and promoted; ``RecallService`` and ``serve_http`` run
in this process (one torch and one FAISS thread, as ``recstream serve``), while a second
process keeps ``--concurrency`` keep-alive connections busy with random known users
(k=100) for ``--duration`` seconds after a 2 s warm-up; latency is timed by the client.
Its random vectors have no structure for the build's nprobe sweep to find, so the API's
index searches as many lists as phase 2's sweep chose on the clustered vectors.

Settings are the defaults plus any ``RECSTREAM_*`` variables set, with the model's
embedding and output dims set to ``--dim`` and min_count 1; Redis is
``RECSTREAM_REDIS_URL`` (keys under a prefix of this run's own, removed after) or an
embedded valkey.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import faiss

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import numpy as np
import redis
import torch
from publish_load import WARMUP_S, load_from_process
from publish_redis import (
    MSET_KEYS,
    MSETS_PER_ROUND_TRIP,
    raw_mset,
    remove_prefix,
    used_memory,
    wait_freed,
)
from publish_search import (
    CLUSTER_SIGMA,
    CLUSTERS,
    SPREAD,
    ClusteredVectors,
    K,
    exact_top,
    nprobe_sweep,
    recall_at_k,
    single_query_ms,
)
from tqdm import tqdm

from common.data.tables import FeatureTable
from common.infra.redis_client import RedisClient, connect
from common.infra.settings import Settings, load_settings
from common.model.bundle import Features, ModelBundle
from common.model.features import FeatureEncoder
from common.model.registry import Registry
from publisher.base import Interactions
from publisher.control import ReleaseControl
from publisher.index_store import IndexStore
from publisher.item_index import build_index, faiss_ids
from publisher.redis_faiss import RedisFaissPublisher
from publisher.redis_users import UserStore
from serving.app import serve_http
from serving.recall import RecallService, wait_until_serving

USER_CHUNK = 100_000  # publish_full's chunk of users per UserStore.write
RECALL_QUERIES, LATENCY_QUERIES = 200, 1000
GOAL_PUBLISH_S, GOAL_BUILD_S, GOAL_RECALL, GOAL_P99_MS = 6.0, 15.0, 0.95, 10.0
GOAL_SIZE = 1_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--users", type=int, default=1_000_000, help="users of the Redis publish")
    p.add_argument("--items", type=int, default=1_000_000, help="items of the index and API")
    p.add_argument("--api-users", type=int, default=100_000, help="users of the API's model")
    p.add_argument("--dim", type=int, default=64, help="embedding and tower output width")
    p.add_argument("--concurrency", type=int, default=4, help="API client connections")
    p.add_argument("--duration", type=float, default=20.0, help="API load seconds")
    p.add_argument("--history-len", type=int, default=50,
                   help="positives per API user in the seen sets, which the user tower reads "
                   "(attention over item vectors from the index); 0: an ID-only model")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = harness.parse(p, argv)
    if args.quick:
        args.users, args.items, args.api_users, args.duration = 50_000, 120_000, 10_000, 3.0
    return args


# -- set-up -------------------------------------------------------------------------------


def make_settings(base: Settings, home: Path, url: str, prefix: str, dim: int,
                  history_len: int) -> Settings:
    return base.model_copy(update={"home": home}).with_overrides(
        model={"embedding_dim": dim, "output_dim": dim, "min_count": 1,
               "history_len": history_len, "history_input": "vectors",
               "history_pooling": "attention"},
        redis={"url": url, "prefix": prefix}, serving={"host": "127.0.0.1", "port": 0})


# -- phase 1: Redis -----------------------------------------------------------------------


def redis_phase(s: Settings, client: RedisClient, n: int, dim: int,
                rng: np.random.Generator) -> dict[str, Any]:
    """The user store's full publish of ``n`` users, then the raw MSET of the same bytes."""
    ids = [f"u{i}" for i in range(n)]
    vectors = (rng.standard_normal((n, dim), dtype=np.float32) * 0.05)
    no_features = FeatureEncoder.fit(FeatureTable.empty()).encode(FeatureTable.empty())
    store, version = UserStore(client, s.redis), "bench-full"
    before = used_memory(client)
    start = time.perf_counter()
    store.begin(version, n, dim, 0, 0)
    with tqdm(total=n, unit="user", unit_scale=True, desc="redis publish") as bar:
        for lo in range(0, n, USER_CHUNK):
            chunk = ids[lo:lo + USER_CHUNK]
            store.write(version, chunk, vectors[lo:lo + len(chunk)], no_features.packed(chunk))
            bar.update(len(chunk))
    store.complete(version)
    publish_s = time.perf_counter() - start
    after = used_memory(client)
    store.drop(version)
    wait_freed(client)
    raw = raw_mset(client, [f"{s.redis.prefix}:raw:{i}" for i in range(n)], vectors)
    remove_prefix(client, f"{s.redis.prefix}:raw")
    wait_freed(client)
    return {"redis_full_publish_s": round(publish_s, 2),
            "redis_keys_per_s": round(n / publish_s),
            "redis_used_memory_bytes": after, "redis_used_memory_before_bytes": before,
            "redis_bytes_per_user": round((after - before) / n, 1),
            **raw, "publish_to_raw": round(raw["redis_raw_mset_s"] / publish_s, 3),
            "redis_buckets": -(-n // s.redis.bucket_size)}


# -- phase 2: FAISS -----------------------------------------------------------------------


def index_phase(s: Settings, n: int, dim: int, rng: np.random.Generator) -> dict[str, Any]:
    """Build (with and without files), recall against exact search, query latency."""
    data = ClusteredVectors(dim, rng)
    names = [f"i{i}" for i in range(n)]
    vectors, queries = data.items(n), data.queries(max(RECALL_QUERIES, LATENCY_QUERIES))
    store = IndexStore(s.indexes_dir, s.index)
    timed: dict[str, float] = {}
    with tqdm(total=6, desc="index", bar_format="{desc}: {n}/{total} {postfix}") as bar:

        def step(name: str, fn: Any) -> Any:
            bar.set_postfix_str(name)
            start = time.perf_counter()
            value = fn()
            timed[name] = time.perf_counter() - start
            bar.update()
            return value

        # The build's nprobe sweep searches with queries of its own (the version's users),
        # not the ones recall and latency are measured with.
        tune = data.queries(s.index.tune_queries)
        item_index = step("write_full", lambda: store.write_full("bench", names, vectors, tune))
        ids = faiss_ids(names)
        step("build_index", lambda: build_index(vectors, ids, s.index))
        step("load", lambda: store.load("bench"))
        truth = step("exact", lambda: exact_top(vectors, ids, queries[:RECALL_QUERIES]))
        index = item_index.index
        recall = recall_at_k(index, queries[:RECALL_QUERIES], truth)
        raw_ms = step("latency", lambda: single_query_ms(index.search,
                                                         queries[:LATENCY_QUERIES]))
        # ItemIndex.search also maps the FAISS ids back to item names, as serving does.
        wrapped_ms = single_query_ms(item_index.search, queries[:LATENCY_QUERIES])
        sweep = step("nprobe sweep", lambda: nprobe_sweep(index, queries[:RECALL_QUERIES],
                                                          truth))
    ivf = isinstance(index, faiss.IndexIVF)
    return {"index_build_s": round(timed["write_full"], 2),
            "build_index_s": round(timed["build_index"], 2),
            "index_load_s": round(timed["load"], 2), "index_recall_at_100": round(recall, 4),
            "index_query_p50_ms": harness.percentile(raw_ms, 50),
            "index_query_p99_ms": harness.percentile(raw_ms, 99),
            "item_index_search_p50_ms": harness.percentile(wrapped_ms, 50),
            "item_index_search_p99_ms": harness.percentile(wrapped_ms, 99),
            "index_kind": "ivf" if ivf else "flat", "index_nlist": index.nlist if ivf else None,
            "index_nprobe": index.nprobe if ivf else None, "index_items": int(index.ntotal),
            "index_nprobe_sweep": sweep, "index_search": item_index.search_meta}


# -- phase 3: the recall API --------------------------------------------------------------


def api_bundle(s: Settings, n_users: int, items: list[str],
               rng: np.random.Generator) -> ModelBundle:
    """An untrained bundle knowing ``n_users`` users and every item; item counts Zipf-like,
    so the popular list has an order."""
    empty = FeatureTable.empty()
    bundle = ModelBundle.create(s.model, empty, empty, seed=int(rng.integers(1 << 31)))
    bundle.user_vocab.observe(f"u{i}" for i in range(n_users))
    bundle.item_vocab.observe(items)
    bundle.model.grow(len(bundle.user_vocab), len(bundle.item_vocab))
    counts = np.zeros(len(bundle.item_vocab))
    counts[1:] = np.floor(1e6 / np.arange(1, len(items) + 1))[rng.permutation(len(items))]
    bundle.item_counts = counts
    return bundle


def api_histories(n_users: int, items: list[str], n: int,
                  rng: np.random.Generator) -> Interactions | None:
    """``n`` distinct positives per user (the k-th Zipf-like within the k-th of ``n``
    blocks of the catalogue; times in the last hours of wall time: the recall API measures
    ages against its clock), written as the seen sets the tower reads."""
    if n == 0:
        return None
    block = len(items) // n
    picks = (rng.zipf(1.2, size=(n_users, n)) - 1) % block + np.arange(n) * block
    now = int(time.time() * 1000)
    ts = now - rng.integers(0, 6 * 3_600_000, size=n_users * n)
    return Interactions([f"u{i}" for i in range(n_users) for _ in range(n)],
                        [items[j] for j in picks.ravel().tolist()], ts.tolist())


def api_phase(s: Settings, client: RedisClient, args: argparse.Namespace,
              rng: np.random.Generator) -> dict[str, Any]:
    """Register, publish and promote a version, serve it, and load it from a second process."""
    items = [f"i{i}" for i in range(args.items)]
    start = time.perf_counter()
    bundle = api_bundle(s, args.api_users, items, rng)
    registry = Registry(s.models_dir)
    version = registry.register(bundle, kind="bench", cutoff_ms=0, parent=None, metrics={},
                                config_hash=s.model_hash())
    register_s = time.perf_counter() - start
    empty = FeatureTable.empty()
    publisher = RedisFaissPublisher(UserStore(client, s.redis),
                                    IndexStore(s.indexes_dir, s.index), s.redis.retention_versions)
    start = time.perf_counter()
    history = api_histories(args.api_users, items, args.history_len, rng)
    report = publisher.publish_full(version, bundle, Features.build(bundle, empty, empty),
                                    items, 0, history, progress=True)
    publish_s = time.perf_counter() - start
    meta = publisher.users.meta(version)
    if meta is None or meta.users != args.api_users:
        raise RuntimeError(f"version {version} holds {meta and meta.users} users in Redis, "
                           f"expected {args.api_users}")
    del bundle
    ReleaseControl.from_settings(s, publisher, registry).promote(version, force=True)
    # As ``recstream serve`` does: one thread per request, no OpenMP pools per request.
    torch.set_num_threads(s.serving.threads or 1)
    faiss.omp_set_num_threads(s.serving.threads or 1)
    service = RecallService(s.serving, publisher.users, publisher.indexes, registry)
    start = time.perf_counter()
    served = wait_until_serving(service, version, timeout_s=600)
    load_s = time.perf_counter() - start
    index = served.index.replicas[0].index
    ivf = isinstance(index, faiss.IndexIVF)
    with serve_http(service, "127.0.0.1", 0) as server:
        figures = load_from_process(server.server_address[1], args)
    latency = service.metrics.registry
    server_n = latency.get_sample_value("recstream_serving_request_seconds_count") or 0
    server_sum = latency.get_sample_value("recstream_serving_request_seconds_sum") or 0
    return {**figures, "api_version": version, "api_history_len": args.history_len,
            "api_bundle_register_s": round(register_s, 2),
            "api_publish_full_s": round(publish_s, 2),
            "api_publish_index_s": round(report.index_s, 2),
            "api_publish_redis_s": round(report.redis_s, 2),
            "api_load_version_s": round(load_s, 2),
            "api_index_kind": "ivf" if ivf else "flat",
            "api_index_nlist": index.nlist if ivf else None,
            "api_index_nprobe": index.nprobe if ivf else None,
            "api_server_mean_ms": round(1e3 * server_sum / max(server_n, 1), 3)}


# -- the run ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    base = load_settings()
    figures: dict[str, Any] = {"loadavg_start": harness.loadavg()}
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(args.seed)
    with harness.temp_home() as home, harness.servers(base, home, kafka=False) as found:
        s = make_settings(base, home, found.redis_url, prefix, args.dim, args.history_len)
        client = connect(s, found.redis_url)
        try:
            server = client.info("server")
            redis_name = (f"{found.redis} {server.get('server_name', 'redis')} "
                          f"{server.get('valkey_version') or server.get('redis_version')}")
            figures.update(redis_phase(s, client, args.users, args.dim, rng))
            figures.update(index_phase(s, args.items, args.dim, rng))
            shutil.rmtree(s.indexes_dir, ignore_errors=True)
            # The API's model is untrained: its random vectors have no lists for a sweep to
            # find, so it searches as many as the sweep chose on the trained-tower-like
            # vectors of the same size above (unless the environment sets nprobe).
            api_s = s if s.index.ivf_nprobe or figures["index_nprobe"] is None else \
                s.with_overrides(index={"ivf_nprobe": figures["index_nprobe"]})
            figures.update(api_phase(api_s, client, args, rng))
        finally:
            if base.redis.url:
                remove_prefix(client, prefix)
            client.close()
    result = report(args, s, figures, redis_name)
    harness.write_json(args.json, result)
    return result


def goals(args: argparse.Namespace, f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals, each with the figure measured and whether it holds."""
    publish_rate = GOAL_SIZE / GOAL_PUBLISH_S
    return {
        "redis_full_publish": {
            "goal": f"1M users in <= {GOAL_PUBLISH_S:g} s ({publish_rate:,.0f} users/s)",
            "measured": f"{args.users:,} users in {f['redis_full_publish_s']} s "
                        f"({f['redis_keys_per_s']:,} users/s)",
            "holds": f["redis_keys_per_s"] >= publish_rate,
            "at_goal_size": args.users >= GOAL_SIZE},
        "index_rebuild": {
            "goal": f"<= {GOAL_BUILD_S:g} s at 1M items with recall@100 >= {GOAL_RECALL}",
            "measured": f"{args.items:,} items in {f['index_build_s']} s, recall@100 "
                        f"{f['index_recall_at_100']}",
            "holds": f["index_build_s"] <= GOAL_BUILD_S
            and f["index_recall_at_100"] >= GOAL_RECALL,
            "at_goal_size": args.items >= GOAL_SIZE},
        "api_p99": {
            "goal": f"p99 <= {GOAL_P99_MS:g} ms at 1M items",
            "measured": f"p99 {f['api_p99_ms']} ms at {args.items:,} items, "
                        f"{args.concurrency} connections, {f['api_qps']} req/s",
            "holds": f["api_p99_ms"] <= GOAL_P99_MS and f["api_errors"] == 0,
            "at_goal_size": args.items >= GOAL_SIZE},
    }


def report(args: argparse.Namespace, s: Settings, f: dict[str, Any],
           redis_name: str) -> dict[str, object]:
    """Print the table and return the JSON document."""
    names = ("redis_full_publish_s", "redis_keys_per_s", "redis_raw_mset_s",
             "redis_raw_keys_per_s", "redis_used_memory_bytes", "index_build_s",
             "build_index_s", "index_recall_at_100", "index_query_p50_ms", "index_query_p99_ms",
             "index_kind", "index_nlist", "index_nprobe", "api_p50_ms", "api_p99_ms",
             "api_qps", "api_requests", "api_errors")
    result: dict[str, object] = {k: f[k] for k in names}
    result.update(users=args.users, items=args.items, api_users=args.api_users, dim=args.dim,
                  concurrency=args.concurrency, duration_s=args.duration,
                  raw_mset_note="same vectors' bytes under as many separate string keys, "
                  f"MSETs of {MSET_KEYS:,} keys, {MSETS_PER_ROUND_TRIP} per pipelined round "
                  "trip, after the publish's version was dropped and freed (same server, "
                  "same run)",
                  item_data=f"unit vectors from {CLUSTERS} Gaussian clusters (log-normal "
                  f"weights, sigma {CLUSTER_SIGMA}), noise norm {SPREAD} against unit "
                  "centres; queries mix 2-3 cluster centres with the same noise",
                  api_note="client-side latency from a second process over loopback, "
                  f"keep-alive, k={K}, random known users, after a {WARMUP_S:g} s warm-up; "
                  "the model is untrained and nobody has seen items")
    result["goals"] = goals(args, f)
    result["details"] = f
    result["config"] = {
        "seed": args.seed, "quick": args.quick, "bucket_size": s.redis.bucket_size,
        "pipeline_fields": s.redis.pipeline_fields, "exact_max_items": s.index.exact_max_items,
        "ivf_nlist_setting": s.index.ivf_nlist, "ivf_nprobe_setting": s.index.ivf_nprobe,
        "train_sample": s.index.train_sample, "faiss_threads_setting": s.index.threads,
        "serving_threads": s.serving.threads, "hidden_dims": list(s.model.hidden_dims),
        "embedding_dim": s.model.embedding_dim, "output_dim": s.model.output_dim,
        "redis": redis_name}
    result["machine"] = harness.machine(f["loadavg_start"], torch=torch.__version__,
                                faiss=faiss.__version__, redis_py=redis.__version__)
    result["date"] = harness.now()
    print_table(args, f, result["goals"], redis_name)  # type: ignore[arg-type]
    return result


def print_table(args: argparse.Namespace, f: dict[str, Any], goals: dict[str, dict[str, Any]],
                redis_name: str) -> None:
    print(f"publish/serving: {args.users:,} users, {args.items:,} items, dim {args.dim}, "
          f"{os.cpu_count()} cpus, redis: {redis_name}")
    mib = f["redis_used_memory_bytes"] / 2**20
    nlist = f" {f['index_nlist']}/{f['index_nprobe']}" if f["index_nlist"] else ""
    rows = [("redis full publish", f"{f['redis_full_publish_s']} s, "
             f"{f['redis_keys_per_s']:,} users/s, used_memory {mib:,.0f} MiB"),
            ("redis raw pipelined MSET", f"{f['redis_raw_mset_s']} s, "
             f"{f['redis_raw_keys_per_s']:,} keys/s"),
            (f"index write_full ({f['index_kind']}{nlist})", f"{f['index_build_s']} s "
             f"(build_index alone {f['build_index_s']} s, load {f['index_load_s']} s)"),
            ("index recall@100 vs exact (200 q)", f"{f['index_recall_at_100']}"),
            ("index query, 1 thread, k=100", f"p50 {f['index_query_p50_ms']} ms, "
             f"p99 {f['index_query_p99_ms']} ms (ItemIndex.search p50 "
             f"{f['item_index_search_p50_ms']} ms)")]
    rows += [(f"  nprobe {p['nprobe']}", f"recall@100 {p['recall_at_100']}, p50 "
              f"{p['p50_ms']} ms, p99 {p['p99_ms']} ms") for p in f["index_nprobe_sweep"]]
    rows.append((f"recall API, {args.concurrency} connections", f"p50 {f['api_p50_ms']} ms, "
                 f"p99 {f['api_p99_ms']} ms, {f['api_qps']} req/s, {f['api_requests']:,} "
                 f"requests, {f['api_errors']} errors, {f['api_fallbacks']} fallbacks "
                 f"(server mean {f['api_server_mean_ms']} ms)"))
    rows += [(f"goal {name}", f"{'holds' if g['holds'] else 'MISSED'}: {g['measured']} "
              f"(goal {g['goal']})") for name, g in goals.items()]
    harness.print_rows(rows, 36)


if __name__ == "__main__":
    main()
