"""Ranking metrics over a dense score matrix ``[n_users, n_items]``, one value per user.

``relevant`` and ``exclude`` are boolean matrices of the same shape. Excluded items
(already seen) score -inf and can never be retrieved, so a relevant item that is
also excluded counts as neither relevant nor a candidate. A user with no relevant
item left gets NaN, so averages can skip them. NaN scores rank last.

>>> scores = np.array([[0.9, 0.8, 0.1, 0.5, 0.3]], dtype=np.float32)
>>> relevant = np.array([[False, False, True, True, False]])
>>> exclude = np.array([[True, False, False, False, False]])
>>> top_k(scores, 2, exclude).tolist()
[[1, 3]]
>>> {name: v.round(3).tolist() for name, v in ranking_metrics(scores, relevant, (2,),
...                                                             exclude).items()}
{'recall@2': [0.5], 'ndcg@2': [0.387], 'hitrate@2': [1.0], 'auc': [0.25]}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Column indices of each row's ``k`` best items, best first; ties go to the lower index.

    Returns ``min(k, n_items)`` columns; excluded items come last when ``k`` exceeds
    what is left.

    >>> top_k(np.array([[1.0, 3.0, 3.0, 2.0]]), 2).tolist()
    [[1, 2]]
    >>> top_k(np.array([[1.0, 3.0]]), 5, exclude=np.array([[False, True]])).tolist()
    [[0, 1]]
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    s = _clean(scores, exclude)
    n, m = s.shape
    k = min(k, m)
    if n == 0 or m == 0:
        return np.zeros((n, k), dtype=np.int64)
    # Partition finds each row's k-th best value; argpartition alone would pick an
    # arbitrary subset of items tied at that value, so fill the last places explicitly
    # from the lowest-indexed tied items: the same input always gives the same list.
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1: k]
    better = s > kth
    tied = s == kth
    room = k - better.sum(axis=1, keepdims=True)
    chosen = better | (tied & (np.cumsum(tied, axis=1) <= room))
    cols = np.nonzero(chosen)[1].reshape(n, k)
    order = np.argsort(-np.take_along_axis(s, cols, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1)


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int,
                exclude: np.ndarray | None = None) -> np.ndarray:
    """Share of each user's relevant items found in the top ``k``.

    >>> recall_at_k(np.array([[3.0, 2.0, 1.0]]), np.array([[False, True, True]]), 2).tolist()
    [0.5]
    """
    return ranking_metrics(scores, relevant, (k,), exclude, with_auc=False)[f"recall@{k}"]


def ndcg_at_k(scores: np.ndarray, relevant: np.ndarray, k: int,
              exclude: np.ndarray | None = None) -> np.ndarray:
    """Binary-relevance NDCG, the ideal DCG taken over ``min(k, |relevant|)`` places.

    >>> ndcg_at_k(np.array([[3.0, 2.0, 1.0]]), np.array([[False, True, False]]), 2).round(4)
    array([0.6309])
    """
    return ranking_metrics(scores, relevant, (k,), exclude, with_auc=False)[f"ndcg@{k}"]


def hit_rate_at_k(scores: np.ndarray, relevant: np.ndarray, k: int,
                  exclude: np.ndarray | None = None) -> np.ndarray:
    """1.0 where at least one relevant item is in the top ``k``, else 0.0.

    >>> hit_rate_at_k(np.array([[3.0, 2.0, 1.0]]), np.array([[False, False, True]]), 2).tolist()
    [0.0]
    """
    return ranking_metrics(scores, relevant, (k,), exclude, with_auc=False)[f"hitrate@{k}"]


def auc(scores: np.ndarray, relevant: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Probability that a relevant item outranks a non-excluded irrelevant one (ties 0.5).

    >>> auc(np.array([[0.2, 0.5, 0.5, 0.1]]), np.array([[False, True, False, False]])).tolist()
    [0.8333333333333334]
    """
    s = _clean(scores, exclude)
    rel, cand = _relevance(relevant, exclude, s.shape)
    n, m = s.shape
    neg = cand & ~rel
    n_pos = rel.sum(axis=1)
    n_neg = neg.sum(axis=1)
    if m == 0:
        return np.full(n, np.nan)
    order = np.argsort(s, axis=1, kind="stable")
    sv = np.take_along_axis(s, order, axis=1)
    neg_sorted = np.take_along_axis(neg, order, axis=1)
    pos_sorted = np.take_along_axis(rel, order, axis=1)
    # Mann-Whitney with ties: for every position find its run of equal scores, then
    # count negatives strictly below the run and inside it from cumulative sums.
    pos_idx = np.broadcast_to(np.arange(m), (n, m))
    starts = np.ones((n, m), dtype=bool)
    starts[:, 1:] = sv[:, 1:] != sv[:, :-1]
    ends = np.ones((n, m), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    run_start = np.maximum.accumulate(np.where(starts, pos_idx, 0), axis=1)
    run_end = np.minimum.accumulate(np.where(ends, pos_idx, m - 1)[:, ::-1], axis=1)[:, ::-1]
    neg_upto = np.cumsum(neg_sorted, axis=1)
    below = np.take_along_axis(neg_upto - neg_sorted, run_start, axis=1)
    tied = np.take_along_axis(neg_upto, run_end, axis=1) - below
    wins = np.where(pos_sorted, below + 0.5 * tied, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = wins / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), out, np.nan)


def ranking_metrics(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int],
                    exclude: np.ndarray | None = None, with_auc: bool = True
                    ) -> dict[str, np.ndarray]:
    """Recall, NDCG and hit rate at every ``k`` (one top-K pass) and AUC, per user."""
    if not ks:
        raise ValueError("ks must name at least one cut-off")
    s = _clean(scores, exclude)
    rel, _ = _relevance(relevant, exclude, s.shape)
    n_rel = rel.sum(axis=1)
    best = top_k(s, max(ks))
    hits = np.take_along_axis(rel, best, axis=1)
    discount = 1.0 / np.log2(np.arange(best.shape[1]) + 2.0)
    has_rel = n_rel > 0
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k in ks:
            h = hits[:, :k]
            found = h.sum(axis=1)
            ideal = np.cumsum(np.ones(k) / np.log2(np.arange(k) + 2.0))
            idcg = ideal[np.clip(np.minimum(n_rel, k) - 1, 0, None)]
            out[f"recall@{k}"] = np.where(has_rel, found / n_rel, np.nan)
            out[f"ndcg@{k}"] = np.where(has_rel, (h * discount[: h.shape[1]]).sum(axis=1) / idcg,
                                        np.nan)
            out[f"hitrate@{k}"] = np.where(has_rel, (found > 0).astype(np.float64), np.nan)
    if with_auc:
        out["auc"] = auc(s, rel, exclude)
    return out


def _clean(scores: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_users, n_items], got shape {s.shape}")
    s = np.where(np.isnan(s), -np.inf, s)
    if exclude is not None:
        if exclude.shape != s.shape:
            raise ValueError(f"exclude has shape {exclude.shape}, scores {s.shape}")
        s[exclude] = -np.inf
    return s


def _relevance(relevant: np.ndarray, exclude: np.ndarray | None,
               shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Relevant items that can still be retrieved, and the candidate mask."""
    rel = np.asarray(relevant, dtype=bool)
    if rel.shape != shape:
        raise ValueError(f"relevant has shape {rel.shape}, scores {shape}")
    cand = np.ones(shape, dtype=bool) if exclude is None else ~exclude
    return rel & cand, cand
