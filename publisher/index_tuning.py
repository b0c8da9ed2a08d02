"""How many IVF lists a version's queries must search, measured when its index is built.

Two-tower user vectors sit off the item manifold, so their top-100 spreads over many IVF
lists, and how many depends on the model and the catalogue, not on the index alone: a
fixed share of the lists is either slow (a quarter of 2,564 lists at 1M items found 0.985
of the exact top-100 in 4 ms a query) or misses. So the build searches a sample of the
version's own served queries exactly, then tries increasing ``nprobe`` until the IVF
index finds ``target_recall`` of the exact top-100, and keeps the first that does. The
choice, its measured recall and the ladder tried go into the index's meta.json (and
``recstream publisher status``).

>>> ladder(64)
[8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from common.model.bundle import Features, ModelBundle
from common.model.history import UserHistories
from common.model.vectors import served_queries, user_histories, user_vectors

K = 100  # the recall@K the sweep targets: the recall API's usual candidate count


def ladder(nlist: int) -> list[int]:
    """nprobe values to try, up to nlist: steps of about a quarter of a power of two
    (search time grows with nprobe; on 1M items 256 lists found 0.940, 384 found 0.965,
    so a coarser ladder would pay 20 % more time than the target needs)."""
    out = {nlist}
    p = 8
    while p < nlist:
        out |= {p, p * 5 // 4, p * 3 // 2, p * 7 // 4}
        p *= 2
    return sorted(v for v in out if v <= nlist)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row of ``truth`` (ids) that the same row of ``found`` holds."""
    k = truth.shape[1]
    return float(np.mean([len(set(t.tolist()) & set(f.tolist())) / k
                          for t, f in zip(truth, found, strict=True)]))


def tune_nprobe(index: faiss.IndexIVF, vectors: np.ndarray, ids: np.ndarray,
                queries: np.ndarray, target: float) -> dict[str, Any]:
    """Set ``index.nprobe`` to the smallest ladder value whose recall@K against exact
    search of ``vectors`` (labelled ``ids``, as in ``index``) reaches ``target`` on
    ``queries``; all lists if none does. Returns what was measured."""
    k = min(K, len(ids))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, rows = exact.search(queries, k)
    truth = ids[rows]
    tried: list[dict[str, float]] = []
    for nprobe in ladder(index.nlist):
        index.nprobe = nprobe
        _, found = index.search(queries, k)
        recall = recall_at(found, truth)
        tried.append({"nprobe": nprobe, f"recall_at_{k}": round(recall, 4)})
        if recall >= target:
            break
    return {"nprobe": int(index.nprobe), "nprobe_from": "sweep", "target_recall": target,
            f"recall_at_{k}": tried[-1][f"recall_at_{k}"], "queries": len(queries),
            "tried": tried}


def query_sample(bundle: ModelBundle, features: Features, n: int, now_ms: int,
                 history: tuple[Sequence[str], Sequence[str], Sequence[int]] | None = None
                 ) -> np.ndarray | None:
    """Served queries of up to ``n`` of the version's users (a seeded sample of those with
    a row), embedded as the recall API embeds them: with their positives of ``history``
    (user, item, time) before ``now_ms`` on a model that reads histories."""
    users = bundle.user_vocab.ids
    if n <= 0 or not users:
        return None
    pick = np.sort(np.random.default_rng(0).choice(len(users), min(n, len(users)), False))
    sample = [users[i] for i in pick.tolist()]
    batch = None
    if bundle.model.cfg.history_len and history is not None:
        chosen = set(sample)
        own = sorted((t, u, i) for u, i, t in zip(*history, strict=True)
                     if u in chosen and t < now_ms)
        running = UserHistories(bundle.model.cfg.history_len)
        running.append([u for _, u, _ in own], [i for _, _, i in own], [t for t, _, _ in own])
        batch = user_histories(bundle, running, sample, now_ms)
    vecs = user_vectors(bundle, features, sample, batch).numpy()
    return served_queries(bundle.model.cfg, vecs)
