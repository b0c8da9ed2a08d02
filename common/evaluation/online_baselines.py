"""Baselines that learn as events arrive, for the freshness curve: each one's state moves
with every window the replay hands it (``learn``), like the stream's.

- ``OnlinePopularity``: positives per item so far.
- ``DecayedPopularity``: positives per item weighted 0.5^(age / half-life); the
  half-life is tuned on days before the test window (``tune``), never on the test.
- ``HistoryKNN``: item-item cosine over co-occurrence (users who liked both), scoring
  the sum of similarities to each user's last ``n_recent`` positives; co-occurrences
  and histories are updated per event.

>>> train = Events.from_columns(event_id=list("abcd"), user_id=["u1", "u1", "u2", "u3"],
...                             item_id=["i1", "i2", "i1", "i3"], ts_ms=[1, 2, 3, 4])
>>> knn = HistoryKNN(train, np.array(["i1", "i2", "i3"]))
>>> knn.score(["u2"]).argmax(axis=1).tolist()  # u2 liked i1, which u1 liked with i2
[1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from common.data.events import DAY_MS, Events
from common.evaluation.baselines import catalog_columns, popularity_order, rank_scores


class OnlinePopularity:
    """Every user gets the count of positives per item seen so far."""

    def __init__(self, train: Events, catalog: np.ndarray, rating_threshold: float = 4.0
                 ) -> None:
        self.catalog = np.asarray(catalog, dtype=object)
        self.rating_threshold = rating_threshold
        self.counts = np.zeros(len(self.catalog))
        self.learn(train)

    def learn(self, events: Events) -> None:
        cols = _positive_cols(events, self.catalog, self.rating_threshold)[1]
        np.add.at(self.counts, cols, 1.0)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.tile(self.counts.astype(np.float32), (len(user_ids), 1))


class DecayedPopularity:
    """Positives per item, each weighted 0.5^(age / ``half_life_days``) at the latest event."""

    def __init__(self, train: Events, catalog: np.ndarray, rating_threshold: float = 4.0,
                 half_life_days: float = 7.0) -> None:
        if half_life_days <= 0:
            raise ValueError(f"half_life_days must be positive, got {half_life_days}")
        self.catalog = np.asarray(catalog, dtype=object)
        self.rating_threshold, self.half_life_days = rating_threshold, half_life_days
        self.counts = np.zeros(len(self.catalog))
        self.ref_ms: int | None = None
        self.learn(train)

    def learn(self, events: Events) -> None:
        pos, cols = _positive_cols(events, self.catalog, self.rating_threshold)
        if len(cols) == 0:
            return
        now = int(pos.ts_ms.max())
        if self.ref_ms is not None:
            # Counts are kept as of ref_ms; move them to now before adding (no overflow).
            self.counts *= self._decay(now - self.ref_ms)
        self.ref_ms = now
        np.add.at(self.counts, cols, self._decay(now - pos.ts_ms))

    def _decay(self, age_ms: np.ndarray | int) -> np.ndarray:
        return np.power(0.5, np.asarray(age_ms, dtype=np.float64) /
                        (self.half_life_days * DAY_MS))

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return np.tile(self.counts.astype(np.float32), (len(user_ids), 1))


class HistoryKNN:
    """Item-to-item over each user's latest positives, learning per event.

    The co-occurrence matrix is dense (catalogue x catalogue float32): fine for
    evaluation catalogues of a few thousand items, not for serving a million.
    """

    def __init__(self, train: Events, catalog: np.ndarray, rating_threshold: float = 4.0,
                 n_recent: int = 20) -> None:
        if n_recent < 1:
            raise ValueError(f"n_recent must be at least 1, got {n_recent}")
        self.catalog = np.asarray(catalog, dtype=object)
        self.rating_threshold, self.n_recent = rating_threshold, n_recent
        m = len(self.catalog)
        self.co = np.zeros((m, m), dtype=np.float32)
        self.liked: dict[str, list[int]] = {}  # each user's distinct positives, oldest first
        self._liked_sets: dict[str, set[int]] = {}
        self.learn(train)

    def learn(self, events: Events) -> None:
        """Add each positive to its user's history and to the co-occurrences."""
        pos, cols = _positive_cols(events, self.catalog, self.rating_threshold)
        for user, col in zip(pos.user_id, cols, strict=True):
            liked = self.liked.setdefault(str(user), [])
            have = self._liked_sets.setdefault(str(user), set())
            if col in have:
                continue
            have.add(int(col))
            if liked:
                self.co[col, liked] += 1.0
                self.co[liked, col] += 1.0
            self.co[col, col] += 1.0  # the diagonal holds each item's degree
            liked.append(int(col))

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """Summed cosine to the user's last ``n_recent`` positives, as rank scores with
        ties (and users without positives) in popularity order."""
        degree = np.diag(self.co).astype(np.float64)
        inv_norm = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1.0)), 0.0)
        sums = np.zeros((len(user_ids), len(self.catalog)))
        for b, user in enumerate(user_ids):
            recent = self.liked.get(str(user), [])[-self.n_recent:]
            if recent:
                sim = self.co[recent] * inv_norm[recent, None] * inv_norm[None, :]
                sim[np.arange(len(recent)), recent] = 0.0
                sums[b] = sim.sum(axis=0)
        return rank_scores(sums, popularity_order(degree))


def tune(make: Callable[[float], object], grid: Sequence[float],
         evaluate: Callable[[object], float]) -> tuple[float, dict[float, float]]:
    """The grid value whose model ``evaluate`` scores highest, and every value's score."""
    scores = {value: evaluate(make(value)) for value in grid}
    return max(scores, key=lambda v: (scores[v], -grid.index(v))), scores


def _positive_cols(events: Events, catalog: np.ndarray, rating_threshold: float
                   ) -> tuple[Events, np.ndarray]:
    """Time-sorted catalogued positives and their catalogue columns."""
    pos = events.sorted_by_time().positives(rating_threshold)
    cols = catalog_columns(pos.item_id, catalog)
    keep = np.flatnonzero(cols >= 0)
    return pos.take(keep), cols[keep]
