"""A decayed-popularity prior folded into the served vectors, so that FAISS's inner
product includes it: the item side gets one more dimension, ``log(1 + c)`` with ``c``
the item's positives decayed to the publishing time (half-life ``h``), and the user
side a constant ``beta`` there. Score = cosine + beta * log(1 + c).

The counts live in the bundle as ``log2 sum_j 2^(t_j / h)`` per item row: adding an
event is one ``logaddexp2``, no read of the time the count was last decayed, and the
decayed count at ``now`` is ``2^(pop - now / h)``. Saved with every version and
checkpoint, so the stream continues the nightly's counts and a replay repeats them.

>>> pop = empty_popularity(3)
>>> observe_popularity(pop, np.array([1, 1, 2]), np.array([0, 0, 86_400_000]), 1.0)
>>> popularity_prior(pop, 86_400_000, 1.0).round(4).tolist()  # 2 clicks a day ago, 1 now
[0.0, 0.6931, 0.6931]
"""

from __future__ import annotations

import numpy as np

DAY_MS = 86_400_000


def empty_popularity(rows: int) -> np.ndarray:
    """No positive yet for any row (``log2`` of a zero count)."""
    return np.full(rows, -np.inf)


def observe_popularity(pop: np.ndarray, rows: np.ndarray, ts_ms: np.ndarray,
                       half_life_days: float) -> None:
    """Add one positive per (row, time), in place."""
    np.logaddexp2.at(pop, np.asarray(rows, dtype=np.int64),
                     np.asarray(ts_ms, dtype=np.float64) / (half_life_days * DAY_MS))


def popularity_prior(pop: np.ndarray, now_ms: int, half_life_days: float) -> np.ndarray:
    """``log(1 + decayed count at now_ms)`` of each row."""
    return np.log1p(np.exp2(pop - now_ms / (half_life_days * DAY_MS)))


def item_popularity(state: dict[str, np.ndarray]) -> np.ndarray:
    """The counts saved beside ``item_counts`` (a version or checkpoint from before the
    prior existed has none: every row starts at zero)."""
    if "item_pop" in state:
        return np.asarray(state["item_pop"], dtype=np.float64).copy()
    return empty_popularity(len(state["item_counts"]))
