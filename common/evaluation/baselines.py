"""Non-learned scorers to measure the two-tower against: popularity, recent popularity, item-kNN.

Each is fitted on training events and scores a fixed catalogue. Events on items
outside the catalogue are ignored. Where a score leaves items tied, the more
popular item (positives in training) ranks higher, so results are deterministic;
scorers that need that tie-break return rank scores (``n_catalog - 1`` for the
best item, 0 for the worst) instead of raw counts or similarities.

>>> train = Events.from_columns(event_id=["a", "b", "c"], user_id=["u1", "u2", "u2"],
...                             item_id=["i1", "i1", "i2"], ts_ms=[1, 2, 3])
>>> PopularityScorer(train, np.array(["i1", "i2", "i3"])).score(["anyone"]).tolist()
[[2.0, 1.0, 0.0]]
>>> ItemKNNScorer(train, np.array(["i1", "i2", "i3"])).score(["u1"]).tolist()
[[1.0, 2.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.data.events import DAY_MS, Events
from common.evaluation.metrics import top_k

# Rows of the dense item block built per similarity step are capped so that the
# block (n_users x block) stays around 64 MiB of float32.
_BLOCK_CELLS = 1 << 24


class PopularityScorer:
    """Every user gets the same scores: positive events per item in training."""

    def __init__(self, train: Events, catalog: np.ndarray, rating_threshold: float = 4.0) -> None:
        self.catalog = np.asarray(catalog, dtype=object)
        self.counts = positive_counts(train, self.catalog, rating_threshold)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """The count of each catalogue item, repeated for every user."""
        return np.tile(self.counts.astype(np.float32), (len(user_ids), 1))


class RecentPopularityScorer:
    """Positives per item in the last ``window_days`` before the training cutoff."""

    def __init__(self, train: Events, catalog: np.ndarray, rating_threshold: float = 4.0,
                 window_days: float = 30, cutoff_ms: int | None = None) -> None:
        if window_days <= 0:
            raise ValueError(f"window_days must be positive, got {window_days}")
        self.catalog = np.asarray(catalog, dtype=object)
        if cutoff_ms is None:
            # Training is everything before the cutoff, so the last event ends it.
            cutoff_ms = int(train.ts_ms.max()) + 1 if len(train) else 0
        self.cutoff_ms = cutoff_ms
        recent = train.between(cutoff_ms - int(window_days * DAY_MS), cutoff_ms)
        self.counts = positive_counts(recent, self.catalog, rating_threshold)
        popularity = positive_counts(train, self.catalog, rating_threshold)
        self._scores = rank_scores(self.counts[None, :].astype(np.float64),
                                   popularity_order(popularity))[0]

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """Rank of each item by recent count, ties broken by all-time popularity."""
        return np.tile(self._scores, (len(user_ids), 1))


class ItemKNNScorer:
    """Item-item cosine on the binary user x item positive matrix, top neighbours per item.

    A user's score for an item is the sum of its similarities to the user's training
    positives; users without training positives get the popularity order.
    """

    def __init__(self, train: Events, catalog: np.ndarray, rating_threshold: float = 4.0,
                 neighbours: int = 100) -> None:
        if neighbours < 1:
            raise ValueError(f"neighbours must be at least 1, got {neighbours}")
        self.catalog = np.asarray(catalog, dtype=object)
        self.neighbours = neighbours
        self.counts = positive_counts(train, self.catalog, rating_threshold)
        self._order = popularity_order(self.counts)
        names, u, cols = _positive_pairs(train, self.catalog, rating_threshold)
        self._history = _group_by_user(names, u, cols)
        self._sim_t = self._fit(u, cols, len(names))

    def _fit(self, u: np.ndarray, cols: np.ndarray, n_users: int) -> torch.Tensor:
        """Sparse ``S^T`` (neighbour x source item) of the pruned similarity matrix."""
        m = len(self.catalog)
        degree = np.bincount(cols, minlength=m).astype(np.float64)
        x_t = _sparse(cols, u, (m, n_users))
        block = max(1, _BLOCK_CELLS // max(n_users, m, 1))
        rows, nbrs, vals = [], [], []
        for lo in range(0, m, block):
            hi = min(lo + block, m)
            sel = (cols >= lo) & (cols < hi)
            dense = torch.zeros(n_users, hi - lo)
            dense[torch.from_numpy(u[sel]), torch.from_numpy(cols[sel] - lo)] = 1.0
            co = torch.sparse.mm(x_t, dense).T.numpy().astype(np.float64)  # [block, m]
            with np.errstate(invalid="ignore", divide="ignore"):
                sim = co / np.sqrt(degree[lo:hi, None] * degree[None, :])
            sim[~np.isfinite(sim)] = 0.0
            sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
            # Columns in popularity order so that top_k's lower-index tie rule
            # prefers the more popular neighbour.
            best = self._order[top_k(sim[:, self._order], self.neighbours)]
            best_sim = np.take_along_axis(sim, best, axis=1)
            keep = best_sim > 0
            rows.append(np.broadcast_to(np.arange(lo, hi)[:, None], best.shape)[keep])
            nbrs.append(best[keep])
            vals.append(best_sim[keep])
        src = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        dst = np.concatenate(nbrs) if nbrs else np.zeros(0, np.int64)
        val = np.concatenate(vals) if vals else np.zeros(0)
        return _sparse(dst, src, (m, m), val)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """Rank of each item by summed similarity, ties (and cold users) by popularity."""
        m = len(self.catalog)
        hist = torch.zeros(m, len(user_ids))
        for b, user in enumerate(user_ids):
            cols = self._history.get(user)
            if cols is not None:
                hist[torch.from_numpy(cols), b] = 1.0
        sums = torch.sparse.mm(self._sim_t, hist).T.numpy().astype(np.float64)
        return rank_scores(sums, self._order)


def positive_counts(events: Events, catalog: np.ndarray, rating_threshold: float) -> np.ndarray:
    """Positive events per catalogue item (int64, catalogue order)."""
    cols = catalog_columns(events.positives(rating_threshold).item_id, catalog)
    return np.bincount(cols[cols >= 0], minlength=len(catalog)).astype(np.int64)


def catalog_columns(item_ids: np.ndarray, catalog: np.ndarray) -> np.ndarray:
    """Catalogue column of each item id, -1 for ids outside the catalogue."""
    col_of = {str(item): j for j, item in enumerate(catalog)}
    return np.fromiter((col_of.get(i, -1) for i in item_ids), dtype=np.int64,
                       count=len(item_ids))


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """Catalogue columns from most to least popular, ties by catalogue position."""
    return np.lexsort((np.arange(len(counts)), -counts))


def rank_scores(primary: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per-row rank scores by ``primary``, ties resolved by position in ``order`` (earlier wins).

    >>> rank_scores(np.array([[0.0, 1.0, 0.0]]), np.array([2, 0, 1])).tolist()
    [[0.0, 2.0, 1.0]]
    """
    n, m = primary.shape
    ranked = np.argsort(-primary[:, order], axis=1, kind="stable")
    out = np.empty((n, m), dtype=np.float32)
    # float32 holds every integer rank exactly up to 2**24 items.
    ranks = np.broadcast_to(np.arange(m - 1, -1, -1, dtype=np.float32), (n, m))
    np.put_along_axis(out, order[ranked], ranks, axis=1)
    return out


def _positive_pairs(train: Events, catalog: np.ndarray,
                    rating_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """User names, and distinct (user code, catalogue column) pairs with a training positive."""
    pos = train.positives(rating_threshold)
    cols = catalog_columns(pos.item_id, catalog)
    names, u = np.unique(pos.user_id[cols >= 0].astype(str), return_inverse=True)
    m = max(len(catalog), 1)
    pairs = np.unique(u.astype(np.int64) * m + cols[cols >= 0])
    return names, pairs // m, pairs % m


def _group_by_user(names: np.ndarray, u: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
    """Each user's positive columns; ``u`` is sorted because the pairs came from np.unique."""
    starts = np.searchsorted(u, np.arange(len(names)), side="left")
    ends = np.searchsorted(u, np.arange(len(names)), side="right")
    return {str(name): cols[s:e] for name, s, e in zip(names, starts, ends, strict=True)}


def _sparse(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
            values: np.ndarray | None = None) -> torch.Tensor:
    vals = torch.ones(len(rows)) if values is None else torch.from_numpy(values.astype(np.float32))
    idx = torch.from_numpy(np.stack([rows, cols]).astype(np.int64))
    return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True).coalesce()
