"""The item index's data and its measurements in the publish benchmark: unit item vectors
in Gaussian clusters with queries between them, the exact top ``K`` by brute force,
recall against it, and one query's latency on one FAISS thread."""

from __future__ import annotations

import time
from typing import Any

import faiss
import harness
import numpy as np

CLUSTERS, CLUSTER_SIGMA, SPREAD = 2048, 1.0, 1.25
K = 100  # every search's and every recall request's k


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class ClusteredVectors:
    """Unit item vectors around random unit centres with log-normal cluster weights, and
    queries mixing two or three of those interests."""

    def __init__(self, dim: int, rng: np.random.Generator) -> None:
        self.rng, self.dim = rng, dim
        self.centres = unit(rng.standard_normal((CLUSTERS, dim), dtype=np.float32))
        weights = rng.lognormal(0.0, CLUSTER_SIGMA, CLUSTERS)
        self.p = weights / weights.sum()

    def _noisy(self, x: np.ndarray) -> np.ndarray:
        noise = self.rng.standard_normal(x.shape, dtype=np.float32)
        return unit(x + noise * np.float32(SPREAD / np.sqrt(self.dim)))

    def items(self, n: int) -> np.ndarray:
        return self._noisy(self.centres[self.rng.choice(CLUSTERS, n, p=self.p)])

    def queries(self, n: int) -> np.ndarray:
        """Users sit between the clusters they like, off the item manifold."""
        x = np.zeros((n, self.dim), np.float32)
        for i, interests in enumerate(self.rng.integers(2, 4, n).tolist()):
            x[i] = self.centres[self.rng.choice(CLUSTERS, interests, p=self.p)].sum(axis=0)
        return self._noisy(unit(x))


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The FAISS ids of each query's exact top ``K`` by inner product (brute force)."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, rows = exact.search(queries, K)
    return ids[rows]


def recall_at_k(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of the exact top ``K`` that ``index`` returns."""
    _, found = index.search(queries, K)
    return float(np.mean([len(set(t.tolist()) & set(f.tolist())) / K
                          for t, f in zip(truth, found, strict=True)]))


def single_query_ms(search: Any, queries: np.ndarray) -> np.ndarray:
    """Milliseconds of each query of k=``K`` searched on its own, on one FAISS thread."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    out = np.empty(len(queries))
    try:
        for i in range(len(queries)):
            t0 = time.perf_counter()
            search(queries[i:i + 1], K)
            out[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(threads)
    return out * 1e3


def nprobe_sweep(index: faiss.Index, queries: np.ndarray,
                 truth: np.ndarray) -> list[dict[str, float]]:
    """Recall@100 and one-thread latency at a few nprobe values (the configured one too)."""
    if not isinstance(index, faiss.IndexIVF):
        return []
    configured = index.nprobe
    out = []
    try:
        for nprobe in sorted({p for p in (16, 64, 256, 1024) if p <= index.nlist}
                             | {configured}):
            index.nprobe = nprobe
            ms = single_query_ms(index.search, queries)
            out.append({"nprobe": nprobe, "recall_at_100": round(recall_at_k(index, queries,
                                                                             truth), 4),
                        "p50_ms": harness.percentile(ms, 50), "p99_ms": harness.percentile(ms, 99)})
    finally:
        index.nprobe = configured
    return out
