"""The Redis side of the publish benchmark: the baseline (the same bytes under as many
plain string keys, by pipelined MSETs), the server's memory, its background frees, and
removing a run's keys from a shared server."""

from __future__ import annotations

import time
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import numpy as np
from tqdm import tqdm

from common.infra.redis_client import RedisClient

MSET_KEYS = 10_000
MSETS_PER_ROUND_TRIP = 2


def used_memory(client: RedisClient) -> int:
    return int(client.info("memory")["used_memory"])


def wait_freed(client: RedisClient, timeout_s: float = 120.0) -> None:
    """Wait until the server's background frees (UNLINK) are done."""
    deadline = time.monotonic() + timeout_s
    while int(client.info("memory").get("lazyfree_pending_objects", 0)) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis still freeing memory after {timeout_s:.0f} s")
        time.sleep(0.05)


def remove_prefix(client: RedisClient, prefix: str) -> None:
    """Unlink every key of this run (a shared Redis keeps nothing of it)."""
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def raw_mset(client: RedisClient, keys: list[str], vectors: np.ndarray) -> dict[str, Any]:
    """Plain pipelined MSETs of ``vectors``' rows under ``keys``; time and memory."""
    before = used_memory(client)
    width = vectors.shape[1] * vectors.itemsize
    step = MSET_KEYS * MSETS_PER_ROUND_TRIP
    with harness.Timer() as timer, \
            tqdm(total=len(keys), unit="key", unit_scale=True, desc="raw mset") as bar:
        for lo in range(0, len(keys), step):
            blob = vectors[lo:lo + step].tobytes()
            with client.pipeline(transaction=False) as p:
                for sub in range(lo, min(lo + step, len(keys)), MSET_KEYS):
                    flat: list[Any] = []
                    for j in range(sub, min(sub + MSET_KEYS, len(keys))):
                        off = (j - lo) * width
                        flat += (keys[j], blob[off:off + width])
                    p.execute_command("MSET", *flat)
                p.execute()
            bar.update(min(step, len(keys) - lo))
    return {"redis_raw_mset_s": round(timer.s, 2),
            "redis_raw_keys_per_s": round(len(keys) / timer.s),
            "redis_raw_used_memory_bytes": used_memory(client) - before}
