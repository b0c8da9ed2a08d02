"""Prequential (test-then-train) replay: score each chunk's positives, then learn it.

>>> from common.evaluation.baselines import PopularityScorer
>>> ev = Events.from_columns(event_id=list("abc"), user_id=["u1", "u2", "u3"],
...                          item_id=["i1", "i1", "i1"], ts_ms=[0, 1, 2])
>>> catalog = np.array(["i1", "i2"])
>>> class Pop(PopularityScorer):
...     def learn(self, events): self.__init__(events, catalog)
>>> res = prequential(Pop(ev.take(np.arange(0)), catalog), catalog, ev, k=1, chunk_events=1)
>>> res.hit.tolist()  # the first click has nothing learned yet; ties rank i1 first anyway
[True, True, True]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.data.events import DAY_MS, Events
from common.evaluation.baselines import catalog_columns
from common.evaluation.metrics import top_k
from common.evaluation.offline import checked_scores
from common.evaluation.protocol import OnlineScorer, Scorer


@dataclass(frozen=True)
class GroupStat:
    """Prequential hits for one group of scored events (a day or a user)."""

    key: int | str
    n_events: int
    hits: int

    @property
    def recall(self) -> float:
        return self.hits / self.n_events if self.n_events else float("nan")


@dataclass(frozen=True)
class PrequentialResult:
    """One row per scored positive event: who, what, when, and whether top-K held it."""

    k: int
    user_id: np.ndarray
    item_id: np.ndarray
    ts_ms: np.ndarray
    hit: np.ndarray
    n_skipped_seen: int = 0
    n_skipped_uncatalogued: int = 0
    rank: np.ndarray | None = None  # 0-based rank of the item in the top list, -1 if absent

    def ndcg(self, k: int) -> float:
        """Mean NDCG@k over scored positives (one relevant item each: 1/log2(rank + 2))."""
        if self.rank is None:
            raise ValueError("this result kept no ranks")
        if not len(self.rank):
            return float("nan")
        gain = np.where((self.rank >= 0) & (self.rank < k),
                        1.0 / np.log2(np.maximum(self.rank, 0) + 2.0), 0.0)
        return float(gain.mean())

    @property
    def recall(self) -> float:
        """Share of scored positives whose item was in the user's top-K (prequential recall@K)."""
        return float(self.hit.mean()) if len(self.hit) else float("nan")

    def per_day(self) -> list[GroupStat]:
        """Hits per UTC day (days since the epoch), in day order."""
        return _grouped(self.ts_ms // DAY_MS, self.hit, int)

    def per_user(self, users: Iterable[str] | None = None) -> list[GroupStat]:
        """Hits per user, optionally only for the given users, in user-id order."""
        res = self if users is None else self.restrict(users)
        return _grouped(res.user_id.astype(str), res.hit, str)

    def restrict(self, users: Iterable[str]) -> PrequentialResult:
        """The same result keeping only the given users' events (e.g. drifted users)."""
        keep = np.isin(self.user_id.astype(str), np.asarray(list(users), dtype=str))
        return PrequentialResult(self.k, self.user_id[keep], self.item_id[keep],
                                 self.ts_ms[keep], self.hit[keep], self.n_skipped_seen,
                                 self.n_skipped_uncatalogued,
                                 None if self.rank is None else self.rank[keep])


def _grouped(keys: np.ndarray, hit: np.ndarray, cast: type) -> list[GroupStat]:
    uniq, inverse = np.unique(keys, return_inverse=True)
    n = np.bincount(inverse, minlength=len(uniq))
    hits = np.bincount(inverse, weights=hit, minlength=len(uniq))
    return [GroupStat(cast(u), int(c), int(h)) for u, c, h in zip(uniq, n, hits, strict=True)]


def prequential(model: OnlineScorer, catalog: np.ndarray, events: Events, k: int = 50,
                chunk_events: int | None = 1000, chunk_ms: int | None = None,
                rating_threshold: float = 4.0, exclude_seen: bool = True,
                seen: Events | None = None, batch_users: int = 256) -> PrequentialResult:
    """Replay events in time order: score each chunk's positives, THEN learn the chunk.

    A chunk closes after ``chunk_events`` events or at the end of a ``chunk_ms`` window
    (windows aligned to multiples of ``chunk_ms``, like a timer firing every interval),
    whichever comes first. With ``exclude_seen`` the items a user interacted with before
    an event (in ``seen`` or earlier in the replay) are removed from that event's top-K,
    and positives on such items are skipped (``n_skipped_seen``): they cannot be hits.
    """
    return prequential_arms({"model": model}, model.learn, catalog, events, (k,),
                            chunk_events, chunk_ms, rating_threshold, exclude_seen, seen,
                            batch_users)["model"][k]


def prequential_arms(arms: Mapping[str, Scorer], learn: Callable[[Events], None],
                     catalog: np.ndarray, events: Events, ks: Sequence[int] = (50,),
                     chunk_events: int | None = 1000, chunk_ms: int | None = None,
                     rating_threshold: float = 4.0, exclude_seen: bool = True,
                     seen: Events | None = None, batch_users: int = 256,
                     before_chunk: Callable[[int], None] | None = None
                     ) -> dict[str, dict[int, PrequentialResult]]:
    """``prequential`` for several models on the same queries: each chunk is scored by
    every arm, then ``learn(chunk)`` runs once (e.g. one system advancing, compared
    with and without its stream). ``before_chunk(ts_ms)`` runs before a chunk is scored,
    with the chunk's first event time (a clock for models that act at set times, such
    as a nightly at the day boundary). Returns a result per arm and per k in ``ks``."""
    if chunk_events is None and chunk_ms is None:
        raise ValueError("set chunk_events, chunk_ms or both")
    catalog = np.asarray(catalog, dtype=object)
    events = events.sorted_by_time()
    cols = catalog_columns(events.item_id, catalog)
    positive = events.positive_mask(rating_threshold)
    tracker = _SeenTracker()
    if seen is not None:
        for user, col in zip(seen.user_id, catalog_columns(seen.item_id, catalog), strict=True):
            tracker.add(str(user), int(col))
    scored: list[np.ndarray] = []
    ranks: dict[str, list[np.ndarray]] = {a: [] for a in arms}
    skipped = {"seen": 0, "uncatalogued": 0}
    bounds = _chunk_bounds(events.ts_ms, chunk_events, chunk_ms)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        queries = _queries(events, cols, positive, lo, hi, tracker, exclude_seen, skipped)
        if before_chunk is not None and queries:
            before_chunk(int(events.ts_ms[lo]))
        for start in range(0, len(queries), batch_users):
            batch = queries[start: start + batch_users]
            scored.append(np.array([q[0] for q in batch], dtype=np.int64))
            targets = np.array([q[2] for q in batch], dtype=np.int64)
            for arm, model in arms.items():
                match = _top(model, catalog, batch, tracker, max(ks), exclude_seen) \
                    == targets[:, None]
                ranks[arm].append(np.where(match.any(axis=1), match.argmax(axis=1), -1))
        # Test-then-train: the model learns the chunk only after every query above.
        learn(events.take(np.arange(lo, hi)))
    idx = np.concatenate(scored) if scored else np.zeros(0, np.int64)
    out: dict[str, dict[int, PrequentialResult]] = {}
    for arm, parts in ranks.items():
        rank = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        out[arm] = {k: PrequentialResult(
            k, events.user_id[idx], events.item_id[idx], events.ts_ms[idx],
            (rank >= 0) & (rank < k), skipped["seen"], skipped["uncatalogued"], rank)
            for k in ks}
    return out


class _SeenTracker:
    """Catalogue columns each user has interacted with, in first-seen order."""

    def __init__(self) -> None:
        self.order: dict[str, list[int]] = {}
        self.sets: dict[str, set[int]] = {}

    def add(self, user: str, col: int) -> None:
        if col < 0:
            return
        have = self.sets.setdefault(user, set())
        if col not in have:
            have.add(col)
            self.order.setdefault(user, []).append(col)

    def prefix(self, user: str, n: int) -> list[int]:
        return self.order.get(user, [])[:n]


def _queries(events: Events, cols: np.ndarray, positive: np.ndarray, lo: int, hi: int,
             tracker: _SeenTracker, exclude_seen: bool, skipped: dict[str, int]
             ) -> list[tuple[int, str, int, int]]:
    """(event index, user, item column, seen-prefix length) for each positive to score.

    The prefix length pins down what the user had seen just before the event, since
    the tracker only ever appends.
    """
    out = []
    for i in range(lo, hi):
        user, col = str(events.user_id[i]), int(cols[i])
        if positive[i]:
            if col < 0:
                skipped["uncatalogued"] += 1
            elif exclude_seen and col in tracker.sets.get(user, ()):
                skipped["seen"] += 1
            else:
                out.append((i, user, col, len(tracker.order.get(user, ()))))
        tracker.add(user, col)
    return out


def _top(model: Scorer, catalog: np.ndarray, batch: list[tuple[int, str, int, int]],
         tracker: _SeenTracker, k: int, exclude_seen: bool) -> np.ndarray:
    """Each query's top-K catalogue columns under the model's current state, best first."""
    uniq, inverse = np.unique(np.asarray([q[1] for q in batch], dtype=str), return_inverse=True)
    scores = checked_scores(model.score(uniq.tolist()), len(uniq), len(catalog))[inverse]
    exclude = None
    if exclude_seen:
        exclude = np.zeros(scores.shape, dtype=bool)
        for r, (_, user, _, n_seen) in enumerate(batch):
            exclude[r, tracker.prefix(user, n_seen)] = True
    return top_k(scores, k, exclude)


def _chunk_bounds(ts_ms: np.ndarray, chunk_events: int | None,
                  chunk_ms: int | None) -> np.ndarray:
    """Start positions of every chunk of time-sorted events, plus the end position."""
    n = len(ts_ms)
    if chunk_events is not None and chunk_events < 1:
        raise ValueError(f"chunk_events must be at least 1, got {chunk_events}")
    if chunk_ms is not None and chunk_ms < 1:
        raise ValueError(f"chunk_ms must be at least 1, got {chunk_ms}")
    window = ts_ms // chunk_ms if chunk_ms is not None else np.zeros(n, dtype=np.int64)
    new_window = np.r_[True, window[1:] != window[:-1]] if n else np.zeros(0, bool)
    pos = np.arange(n)
    window_start = np.maximum.accumulate(np.where(new_window, pos, 0)) if n else pos
    starts = new_window.copy()
    if chunk_events is not None:
        starts |= (pos - window_start) % chunk_events == 0
    return np.r_[np.flatnonzero(starts), n].astype(np.int64)
