"""The demo's nightly-only arm: the champion as trained, with its users' histories as of
its nightly, nothing after (`ChampionScorer`), and the lockstep replay's day plan."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from streaming import SMALL_MODEL

from batch.trainer import bootstrap
from common.data.dataset import Dataset
from common.data.events import DAY_MS, format_day
from common.data.synthetic import SyntheticConfig, generate
from common.evaluation.two_tower import ChampionScorer
from common.infra.settings import load_settings
from common.model.registry import Registry
from recstream.demo import NIGHTLY_COST_S, WINDOW_COST_S, WINDOW_MS, plan_days


def _champion(tmp_path: Path) -> tuple[Registry, Dataset, int]:
    """A history-reading model trained on days 0-2, registered as the nightly of day 2
    (cutoff inside the day, as a nightly's held-out tail leaves it); day 3's start."""
    settings = load_settings({"RECSTREAM_HOME": str(tmp_path), **SMALL_MODEL,
                              "RECSTREAM_MODEL_HISTORY_LEN": "10",
                              "RECSTREAM_TRAIN_BOOTSTRAP_EPOCHS": "1",
                              "RECSTREAM_TRAIN_THREADS": "1"})
    dataset = generate(SyntheticConfig(n_users=200, n_items=150, n_days=5,
                                       events_per_day=1500)).dataset
    start = int(dataset.events.ts_ms.min()) // DAY_MS * DAY_MS
    day3 = start + 3 * DAY_MS
    bundle, _ = bootstrap(settings.model, settings.train, dataset,
                          dataset.events.between(None, day3 - 6 * 3_600_000))
    registry = Registry(settings.models_dir)
    version = registry.register(bundle, kind="nightly", cutoff_ms=day3 - 6 * 3_600_000,
                                parent=None, metrics={}, config_hash="test",
                                extra={"day": format_day(day3 - DAY_MS)})
    registry.promote(version)
    return registry, dataset, day3


def _scores(registry: Registry, dataset: Dataset, users: list[str], now_ms: int) -> np.ndarray:
    scorer = ChampionScorer(registry, dataset, dataset.catalog())
    scorer.now_ms = now_ms
    return scorer.score(users)


def test_nightly_only_histories_end_with_the_nightlys_day(tmp_path: Path) -> None:
    registry, dataset, day3 = _champion(tmp_path)
    events = dataset.events
    after = events.between(day3)
    users = sorted(set(after.user_id.astype(str)) & set(events.between(
        day3 - 6 * 3_600_000, day3).user_id.astype(str)))[:20]
    assert len(users) >= 5
    now = day3 + 12 * 3_600_000
    full = _scores(registry, dataset, users, now)
    # Everything after the nightly's day is invisible to the arm ...
    no_later = dataclasses.replace(dataset, events=events.between(None, day3))
    assert np.array_equal(full, _scores(registry, no_later, users, now))
    # ... while the day's tail after the model's cutoff (its held-out part) is in the
    # histories: dropping it changes these users' vectors.
    no_tail = dataclasses.replace(dataset, events=events.between(None, day3 - 6 * 3_600_000))
    assert not np.allclose(full, _scores(registry, no_tail, users, now))


def test_the_replay_plan_fits_the_budget_and_keeps_three_days() -> None:
    events = generate(SyntheticConfig(n_days=7, events_per_day=1000)).dataset.events
    day = events.ts_ms // DAY_MS
    cost = [len(np.unique(events.ts_ms[day == d] // WINDOW_MS)) * WINDOW_COST_S
            + NIGHTLY_COST_S for d in np.unique(day)]
    assert plan_days(events, budget_s=0.0) == 3  # the floor, however small the budget
    assert plan_days(events, budget_s=1e9) == 7  # all of them when everything fits
    assert plan_days(events, budget_s=sum(cost[:5])) == 5
    assert plan_days(events, budget_s=sum(cost[:5]) - 0.01) == 4
