"""The nightly's quality gate: hold out the day's latest events, score the candidate and
the champion on them, and refuse a candidate that is broken or worse.

The held-out slice is the newest ``fraction`` of the day by event time. The candidate
trains on the rest and its cutoff is the slice's start, so the stream's rebase replays
the slice onto it: nothing is lost by holding it out.

>>> import numpy as np
>>> from common.data.events import Events
>>> ev = Events.from_columns(event_id=list("abcd"), user_id=list("uuvv"),
...                          item_id=list("ijij"), ts_ms=[0, 1, 2, 3])
>>> train, held_out, cutoff = split_holdout(ev, 0.25)
>>> len(train), len(held_out), cutoff
(3, 1, 3)
>>> decide({"recall@50": 0.30}, {"recall@50": 0.31}, "recall@50", 0.02, loss=1.2).passed
True
>>> decide({"recall@50": 0.1, "n_users": 9}, {"recall@50": 0.3}, "recall@50", 0.02, 1.2,
...        min_users=50).reason
'9 held-out users (fewer than 50): figures not compared'
>>> print(decide({"recall@50": 0.20}, {"recall@50": 0.31}, "recall@50", 0.02, loss=1.2).reason)
recall@50=0.2000 is worse than the champion's 0.3100 on the same held-out events (tolerance 0.02)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.data.dataset import Dataset
from common.data.events import Events
from common.evaluation.offline import evaluate_scorer
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.settings_groups import EvalSettings, NightlySettings, TrainSettings
from common.model.bundle import Features, ModelBundle


class HoldoutError(ValueError):
    """The day has too few events to hold some out and still train on the rest."""


@dataclass(frozen=True)
class GateDecision:
    """Whether the candidate may be registered, and why not."""

    passed: bool
    reason: str
    metric: str
    candidate: float
    champion: float | None


def split_holdout(day: Events, fraction: float) -> tuple[Events, Events, int]:
    """``(train, held_out, cutoff_ms)``: held out are the events at or after the cutoff,
    the time of the first of the newest ``fraction`` of the day's events."""
    day = day.sorted_by_time()
    n_out = math.ceil(len(day) * fraction)
    if len(day) < 4 or n_out == 0 or n_out >= len(day):
        raise HoldoutError(f"{len(day)} events are too few to hold {fraction:.0%} out")
    cutoff = int(day.ts_ms[len(day) - n_out])
    train = day.between(None, cutoff)
    held_out = day.between(cutoff, None)
    if len(train) == 0:
        raise HoldoutError("every event of the day has the same time; nothing to train on")
    return train, held_out, cutoff


def evaluate_on_holdout(ns: NightlySettings, es: EvalSettings, ts: TrainSettings,
                        dataset: Dataset, bundle: ModelBundle, train: Events,
                        held_out: Events) -> dict[str, float]:
    """Recall/NDCG/hit rate at ``es.ks`` on the held-out events of at most
    ``ns.eval_max_users`` users (the day's earlier events are excluded from each user's
    ranking)."""
    held_out = _sample_users(held_out, ns.eval_max_users, ts.seed)
    catalog = dataset.catalog()
    # Histories as of the held-out events, for a model that reads them: the data set's
    # events before the day's, then the day's own (landed) ones.
    before = dataset.events.between(None, int(train.ts_ms.min())) if len(train) else train
    scorer = TwoTowerScorer(bundle, Features.build(bundle, dataset.users, dataset.items),
                            catalog, rating_threshold=ts.rating_threshold,
                            seen=Events.concat([before, train]))
    return evaluate_scorer(scorer, catalog, train, held_out, ks=es.ks,
                           rating_threshold=ts.rating_threshold)


def decide(candidate: dict[str, float], champion: dict[str, float] | None, metric: str,
           tolerance: float, loss: float, min_users: int = 0) -> GateDecision:
    """Refuse a NaN/inf loss or metric, or a metric below the champion's minus
    ``tolerance`` on the same events (no champion figures: only the first two checks).

    With fewer than ``min_users`` held-out users the figures are noise: only the loss
    is checked, and the decision says so."""
    value = float(candidate.get(metric, float("nan")))
    best = None if champion is None else float(champion.get(metric, float("nan")))
    if not math.isfinite(loss):
        return GateDecision(False, f"training loss is {loss}", metric, value, best)
    users = int(candidate.get("n_users", min_users))
    if users < min_users:
        return GateDecision(True, f"{users} held-out users (fewer than {min_users}): "
                            "figures not compared", metric, value, best)
    if not math.isfinite(value):
        return GateDecision(False, f"{metric} is {value} (no held-out user had a positive?)",
                            metric, value, best)
    if best is not None and math.isfinite(best) and value < best - tolerance:
        return GateDecision(False, f"{metric}={value:.4f} is worse than the champion's "
                            f"{best:.4f} on the same held-out events (tolerance {tolerance})",
                            metric, value, best)
    return GateDecision(True, "", metric, value, best)


def _sample_users(events: Events, max_users: int, seed: int) -> Events:
    users = np.unique(events.user_id.astype(str))
    if len(users) <= max_users:
        return events
    keep = np.random.default_rng(seed).choice(users, max_users, replace=False)
    return events.take(np.flatnonzero(np.isin(events.user_id.astype(str), keep)))
