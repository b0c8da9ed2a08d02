"""Batch training: the bootstrap (several epochs over history) and the nightly update
(warm-started from the champion, exactly one epoch over one day, every parameter).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events
from common.infra.settings_groups import ModelSettings, TrainSettings
from common.model.bundle import Examples, Features, ModelBundle, encode_examples
from common.model.training import Trainer

log = logging.getLogger(__name__)


class EmptyTrainingDataError(ValueError):
    """There are no positive events to learn from in the requested range."""


@dataclass(frozen=True)
class TrainStats:
    """Figures a training run reports (and the registry records)."""

    examples: int
    epochs: int
    seconds: float
    examples_per_s: float
    final_loss: float


def hot_item_keep_mask(item_rows: np.ndarray, threshold: float,
                       rng: np.random.Generator) -> np.ndarray:
    """word2vec-style down-sampling of very frequent positives (threshold 0 keeps all)."""
    if threshold <= 0 or len(item_rows) == 0:
        return np.ones(len(item_rows), dtype=bool)
    counts = np.bincount(item_rows)
    freq = counts[item_rows] / len(item_rows)
    keep_p = np.minimum(1.0, np.sqrt(threshold / freq) + threshold / freq)
    return rng.random(len(item_rows)) < keep_p


def recency_keep_prob(ts_ms: np.ndarray, half_life_days: float) -> np.ndarray:
    """Time-decayed sampling: an example ``a`` days older than the newest is kept with
    probability 0.5^(a / half_life), so the model tracks recent tastes (0 keeps all)."""
    if half_life_days <= 0 or len(ts_ms) == 0:
        return np.ones(len(ts_ms))
    age_days = (ts_ms.max() - ts_ms) / DAY_MS
    return np.power(0.5, age_days / half_life_days)


def recency_passes(ts_ms: np.ndarray, half_life_days: float, epochs: int) -> int:
    """Passes that train on as many examples as ``epochs`` full epochs would, when
    recency sampling keeps only a share of the examples in each pass (each pass draws
    afresh, so old examples still turn up now and then).

    >>> recency_passes(np.array([0, 20 * DAY_MS]), half_life_days=20, epochs=3)  # share 0.75
    4
    """
    if len(ts_ms) == 0:
        return epochs
    share = float(recency_keep_prob(ts_ms, half_life_days).mean())
    return max(epochs, round(epochs / share))


def run_epochs(trainer: Trainer, examples: Examples, epochs: int, ts: TrainSettings,
               desc: str) -> TrainStats:
    """Shuffled mini-batch epochs with a progress bar; returns throughput and loss."""
    rng = np.random.default_rng(ts.seed)
    start, seen, losses = time.perf_counter(), 0, []
    recency = recency_keep_prob(examples.ts_ms, ts.recency_half_life_days)
    for epoch in range(epochs):
        keep = hot_item_keep_mask(examples.item_rows, ts.hot_item_threshold, rng)
        if ts.recency_half_life_days > 0:
            keep &= rng.random(len(recency)) < recency
        order = rng.permutation(np.flatnonzero(keep))
        batches = range(0, len(order), ts.batch_size)
        for lo in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch",
                       disable=None, leave=False):
            idx = order[lo: lo + ts.batch_size]
            if len(idx) < 2:  # a softmax over one candidate teaches nothing
                continue
            losses.append(trainer.step(examples.take(idx)).loss)
            seen += len(idx)
        log.info("epoch done", extra={"desc": desc, "epoch": epoch + 1,
                                      "loss": float(np.mean(losses[-50:] or [np.nan]))})
    seconds = time.perf_counter() - start
    return TrainStats(seen, epochs, seconds, seen / max(seconds, 1e-9),
                      float(np.mean(losses[-20:])) if losses else float("nan"))


def bootstrap(ms: ModelSettings, ts: TrainSettings, dataset: Dataset, history: Events,
              epochs: int | None = None) -> tuple[ModelBundle, TrainStats]:
    """First model from a range of history (several epochs, everything trained)."""
    positives = history.positives(ts.rating_threshold)
    if len(positives) < 2:
        raise EmptyTrainingDataError(
            f"bootstrap needs positive events, got {len(positives)} in {len(history)} events")
    bundle = ModelBundle.create(ms, dataset.users, dataset.items, seed=ts.seed)
    bundle.observe(positives)
    features = Features.build(bundle, dataset.users, dataset.items)
    trainer = Trainer(bundle, features, ts, mode="full")
    passes = recency_passes(positives.ts_ms, ts.recency_half_life_days,
                            epochs or ts.bootstrap_epochs)
    stats = run_epochs(trainer, encode_examples(bundle, features, positives), passes, ts,
                       "bootstrap")
    return bundle, stats


def nightly(ts: TrainSettings, bundle: ModelBundle, dataset: Dataset,
            day_events: Events, context: Events | None = None) -> TrainStats:
    """One shuffled epoch over a day's events, every parameter updated, in place.

    ``context``: positives before the day, from which a model with a history field takes
    each example's earlier history (without it, histories start at the day's start).
    """
    positives = day_events.positives(ts.rating_threshold)
    if len(positives) < 2:
        raise EmptyTrainingDataError(
            f"the day has {len(day_events)} events and {len(positives)} positives; "
            "nothing to train on (is the partition landed?)")
    bundle.observe(positives)
    features = Features.build(bundle, dataset.users, dataset.items)
    nightly_ts = ts.model_copy(update={"lr_dense": ts.nightly_lr_dense})
    trainer = Trainer(bundle, features, nightly_ts, mode="full")
    examples = encode_examples(bundle, features, positives, context=context)
    return run_epochs(trainer, examples, 1, nightly_ts, "nightly")
