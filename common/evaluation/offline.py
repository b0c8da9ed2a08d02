"""Offline evaluation on a temporal split (prequential replay: ``common.evaluation.prequential``).

>>> from common.evaluation.baselines import PopularityScorer
>>> ev = Events.from_columns(event_id=list("abcd"), user_id=["u1", "u2", "u1", "u2"],
...                          item_id=["i1", "i1", "i2", "i2"], ts_ms=[0, 1, DAY_MS, DAY_MS])
>>> train, test = temporal_split(ev, DAY_MS, test_days=1)
>>> catalog = np.array(["i1", "i2", "i3"])
>>> m = evaluate_scorer(PopularityScorer(train, catalog), catalog, train, test, ks=(1,))
>>> m["recall@1"], m["n_users"]
(1.0, 2)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from common.data.events import DAY_MS, Events
from common.evaluation.baselines import catalog_columns
from common.evaluation.metrics import ranking_metrics
from common.evaluation.protocol import Scorer


def temporal_split(events: Events, train_before_ms: int, test_days: float) -> tuple[Events, Events]:
    """Train: events before the cutoff; test: events in ``[cutoff, cutoff + test_days)``."""
    if test_days <= 0:
        raise ValueError(f"test_days must be positive, got {test_days}")
    end = train_before_ms + int(test_days * DAY_MS)
    return events.between(None, train_before_ms), events.between(train_before_ms, end)


def evaluate_scorer(scorer: Scorer, catalog: np.ndarray, train: Events, test: Events,
                    ks: Sequence[int] = (10, 50), rating_threshold: float = 4.0,
                    users: Literal["all", "warm"] = "all", batch_users: int = 256
                    ) -> dict[str, float]:
    """Recall, NDCG and hit rate at each k, and AUC, averaged over users with test positives.

    A user's training interactions (every event, not only positives) are excluded
    from the ranking. Relevant items outside the catalogue (``n_relevant_dropped``)
    or already seen in training (``n_relevant_seen``) are not counted, and users left
    with no relevant item are not evaluated.
    """
    if users not in ("all", "warm"):
        raise ValueError(f"users must be 'all' or 'warm', got {users!r}")
    catalog = np.asarray(catalog, dtype=object)
    m = max(len(catalog), 1)
    pos = test.positives(rating_threshold)
    pos_users = pos.user_id.astype(str)
    cols = catalog_columns(pos.item_id, catalog)
    dropped = len(set(zip(pos_users[cols < 0], pos.item_id[cols < 0], strict=True)))
    names = np.unique(pos_users[cols >= 0])
    if users == "warm":
        names = names[np.isin(names, train.user_id.astype(str))]
    rel_keys = _pair_keys(names, pos_users, cols, m)
    seen_keys = _pair_keys(names, train.user_id.astype(str),
                           catalog_columns(train.item_id, catalog), m)
    fresh = rel_keys[~np.isin(rel_keys, seen_keys)]
    kept = np.unique(fresh // m)
    # Renumber the users that still have something to find, keeping keys sorted by row.
    fresh = np.searchsorted(kept, fresh // m) * m + fresh % m
    seen_keys = seen_keys[np.isin(seen_keys // m, kept)]
    seen_keys = np.searchsorted(kept, seen_keys // m) * m + seen_keys % m
    names = names[kept]
    per_user: list[dict[str, np.ndarray]] = []
    for lo in range(0, len(names), batch_users):
        hi = min(lo + batch_users, len(names))
        scores = checked_scores(scorer.score(names[lo:hi].tolist()), hi - lo, len(catalog))
        relevant = _mask(fresh, lo, hi, m, len(catalog))
        exclude = _mask(seen_keys, lo, hi, m, len(catalog))
        per_user.append(ranking_metrics(scores, relevant, tuple(ks), exclude))
    out: dict[str, float] = {}
    for name in ("recall", "ndcg", "hitrate"):
        for k in ks:
            out[f"{name}@{k}"] = _mean(per_user, f"{name}@{k}")
    out["auc"] = _mean(per_user, "auc")
    out["n_users"] = len(names)
    out["n_relevant_dropped"] = dropped
    out["n_relevant_seen"] = len(rel_keys) - len(fresh)
    return out


def _pair_keys(names: np.ndarray, users: np.ndarray, cols: np.ndarray, m: int) -> np.ndarray:
    """Sorted distinct ``row * m + col`` keys of the pairs whose user is in (sorted) ``names``."""
    rows = np.searchsorted(names, users)
    found = rows < len(names)
    found[found] = names[rows[found]] == users[found]
    ok = found & (cols >= 0)
    return np.unique(rows[ok].astype(np.int64) * m + cols[ok])


def _mask(keys: np.ndarray, lo: int, hi: int, m: int, n_items: int) -> np.ndarray:
    part = keys[np.searchsorted(keys, lo * m): np.searchsorted(keys, hi * m)]
    mask = np.zeros((hi - lo, n_items), dtype=bool)
    mask[part // m - lo, part % m] = True
    return mask


def checked_scores(scores: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    """A scorer's output as an array, refused unless shaped ``[n_users, n_items]``."""
    scores = np.asarray(scores)
    if scores.shape != (n_users, n_items):
        raise ValueError(f"scorer returned shape {scores.shape}, expected {(n_users, n_items)} "
                         "(users x catalogue items)")
    return scores


def _mean(parts: list[dict[str, np.ndarray]], key: str) -> float:
    values = np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")
