"""Offline evaluation (``recstream eval``): the two-tower variants against baselines on one
temporal split, every figure in one JSON-able report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from batch.trainer import bootstrap
from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events, format_day, parse_day
from common.evaluation.baselines import ItemKNNScorer, PopularityScorer, RecentPopularityScorer
from common.evaluation.offline import evaluate_scorer, temporal_split
from common.evaluation.protocol import Scorer
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.atomic import write_text_atomic
from common.infra.settings import Settings
from common.model.bundle import Features

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("popularity", "recent_popularity", "item_knn", "dssm_pointwise", "two_tower",
                  "two_tower_senet")
# Settings overrides per trained model name; the README table is made from these. The
# ablations each undo or add one thing on top of the defaults; ``two_tower_v0`` is the
# first configuration (batch 1024, 8 plain epochs, logQ 1).
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "dssm_pointwise": {"train": {"loss": "pointwise"}},
    "two_tower": {},
    "two_tower_senet": {"model": {"senet": True}},
    "two_tower_no_logq": {"train": {"logq_strength": 0.0}},
    "two_tower_logq1": {"train": {"logq_strength": 1.0}},
    "two_tower_no_recency": {"train": {"recency_half_life_days": 0.0}},
    "two_tower_batch1024": {"train": {"batch_size": 1024}},
    "two_tower_random_negatives": {"train": {"random_negatives": 128}},
    "two_tower_hot_downsampling": {"train": {"hot_item_threshold": 1e-3}},
    "two_tower_v0": {"train": {"batch_size": 1024, "bootstrap_epochs": 8, "logq_strength": 1.0,
                               "recency_half_life_days": 0.0}},
}
BASELINES: dict[str, Callable[[Events, np.ndarray, Settings], Scorer]] = {
    "popularity": lambda tr, cat, s: PopularityScorer(tr, cat, s.train.rating_threshold),
    "recent_popularity": lambda tr, cat, s: RecentPopularityScorer(
        tr, cat, s.train.rating_threshold, window_days=30),
    "item_knn": lambda tr, cat, s: ItemKNNScorer(tr, cat, s.train.rating_threshold),
}


def default_train_before(events: Events, test_days: int) -> str:
    """The day that leaves exactly the last ``test_days`` days of the data for testing."""
    last_day_start = (int(events.ts_ms.max()) // DAY_MS) * DAY_MS
    return format_day(last_day_start - (test_days - 1) * DAY_MS)


def check_model_names(models: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the first model that is neither a baseline nor a variant."""
    for name in models:
        if name not in BASELINES and name not in VARIANTS:
            raise ValueError(f"unknown model {name!r}; known: "
                             f"{', '.join([*BASELINES, *VARIANTS])}")


def build_scorer(name: str, settings: Settings, dataset: Dataset, train: Events,
                 catalog: np.ndarray) -> Scorer:
    """A fitted scorer for a model name (baselines fit instantly, variants train)."""
    check_model_names([name])
    if name in BASELINES:
        return BASELINES[name](train, catalog, settings)
    variant = settings.with_overrides(**VARIANTS[name])
    bundle, _ = bootstrap(variant.model, variant.train, dataset, train)
    features = Features.build(bundle, dataset.users, dataset.items)
    # Histories as of the cutoff, for a model that reads them.
    return TwoTowerScorer(bundle, features, catalog, rating_threshold=
                          variant.train.rating_threshold, seen=train)


def run_offline_eval(settings: Settings, dataset: Dataset, train_before: str | None,
                     test_days: int, users: str, models: Sequence[str]) -> dict[str, Any]:
    """Train/fit every model on the split and evaluate it; returns the report."""
    check_model_names(models)
    train_before = train_before or default_train_before(dataset.events, test_days)
    train, test = temporal_split(dataset.events, parse_day(train_before), test_days)
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"split at {train_before} leaves {len(train)} training and "
                         f"{len(test)} test events; pick another --train-before")
    catalog = dataset.catalog()
    report: dict[str, Any] = {
        "dataset": dataset.name, "train_before": train_before, "test_days": test_days,
        "users": users, "train_events": len(train), "test_events": len(test),
        "catalog_items": len(catalog), "models": {},
    }
    for name in models:
        start = time.perf_counter()
        scorer = build_scorer(name, settings, dataset, train, catalog)
        metrics = evaluate_scorer(scorer, catalog, train, test, ks=settings.eval.ks,
                                  rating_threshold=settings.train.rating_threshold, users=users)
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        report["models"][name] = metrics
        log.info("model evaluated", extra={"model": name, **metrics})
    return report


def format_table(report: dict[str, Any]) -> str:
    """A fixed-width table of the headline metrics, one row per model."""
    cols = ["recall@10", "recall@50", "ndcg@10", "hitrate@50", "auc"]
    width = max([22, *(len(name) + 2 for name in report["models"])])
    lines = [f"{report['dataset']}: train before {report['train_before']}, test "
             f"{report['test_days']} days, users={report['users']}",
             f"{'model':<{width}}" + "".join(f"{c:>11}" for c in cols)]
    for name, m in report["models"].items():
        lines.append(f"{name:<{width}}"
                     + "".join(f"{m.get(c, float('nan')):>11.4f}" for c in cols))
    return "\n".join(lines)


def run_prequential_eval(settings: Settings, dataset: Dataset, test_days: int,
                         update_every: str, users: str, models: Sequence[str] | None,
                         json_path: Path | None, prior: bool = False) -> dict[str, Any]:
    """``recstream eval --prequential``: the freshness curve, printed as a table, written
    as JSON (``json_path``) and drawn as ``recall_vs_delay.png`` beside it (or here)."""
    from batch.freshness import CURVE_MODELS, format_curve, freshness_curve, plot_curve

    delays = [int(d) for d in update_every.split(",") if d.strip()]
    if not delays or min(delays) < 1:
        raise ValueError(f"--update-every wants positive seconds, got {update_every!r}")
    report = freshness_curve(settings, dataset, test_days, delays,
                             list(models or CURVE_MODELS), users, prior=prior)
    print(format_curve(report))
    plot = (json_path.parent if json_path else Path(".")) / "recall_vs_delay.png"
    plot_curve(report, plot)
    print(f"drew {plot}")
    if json_path:
        write_text_atomic(json_path, json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    return report
