"""The freshness curve (``recstream eval --prequential``): prequential recall of each system
against how often it takes in new events, on the last ``test_days`` days in event time.

Every arm is replayed test-then-train in windows of ``delay`` seconds of event time:
the window's positives are scored from the arm's state, then the arm takes the window
in. Two-tower arms start from one bootstrap on everything before the test window:

- ``frozen``: the bootstrap as it is, histories as of the bootstrap; nothing moves.
- ``nightly``: a one-epoch nightly at each day boundary on that day's events; the
  served histories are those as of the last nightly, nothing in between.
- ``nightly+history``: the nightly, and the users' histories written every window
  (what the stream writes before any learning), no learning in between.
- ``nightly+stream``: the nightly, histories every window, and embedding-only stream
  steps on each window's positives (the stream daemon's learning).

Baselines take in every window too: ``popularity``, ``recent_popularity`` (half-life
tuned on the days just before the test window) and ``history_knn`` (its history
length tuned alike). Items a user already interacted with are excluded.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from batch.trainer import EmptyTrainingDataError, bootstrap, nightly
from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events
from common.evaluation.online_baselines import DecayedPopularity, HistoryKNN, OnlinePopularity, tune
from common.evaluation.prequential import PrequentialResult, prequential_arms
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.settings import Settings
from common.model.bundle import Features, ModelBundle
from common.model.replay import ReplayBuffer
from common.model.training import Trainer, stream_step_settings

log = logging.getLogger(__name__)

DEFAULT_DELAYS_S = (60, 600, 3600, 86400)
# (nightly, histories every window, stream learning every window)
SCHEDULES: dict[str, tuple[bool, bool, bool]] = {
    "frozen": (False, False, False),
    "nightly": (True, False, False),
    "nightly+history": (True, True, False),
    "nightly+stream": (True, True, True),
}
BASELINE_NAMES = ("popularity", "recent_popularity", "history_knn")
CURVE_MODELS = (*BASELINE_NAMES, *SCHEDULES)
HALF_LIVES_DAYS = (0.25, 1.0, 3.0, 7.0, 14.0, 30.0)
KNN_RECENT = (3, 5, 10, 20, 50)
# Not above 0.5: a grid to 1.5 picked 1.0 at 1 d on the validation days, and on the 30
# days before the test window that lost 0.003-0.004 recall@50 against 0.3 (sweep log).
PRIOR_BETAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
VALIDATION_DAYS = 14
KS = (10, 50)


class TwoTowerArm:
    """A two-tower system in the replay: its bundle, served histories and schedule."""

    def __init__(self, settings: Settings, dataset: Dataset, bundle: ModelBundle,
                 catalog: np.ndarray, seen: Events, schedule: tuple[bool, bool, bool],
                 prior: tuple[float, float] | None = None) -> None:
        """``prior``: (half-life in days, beta) of a decayed-popularity prior added to the
        cosine, ``beta * log(1 + decayed count)``; its counts move when histories do."""
        self.settings, self.dataset = settings, dataset
        self.prior = None if prior is None else DecayedPopularity(
            seen, catalog, settings.train.rating_threshold, prior[0])
        self.beta = 0.0 if prior is None else prior[1]
        self.nightly, self.fresh_history, self.stream = schedule
        features = Features.build(bundle, dataset.users, dataset.items)
        trainer = Trainer(bundle, features, stream_step_settings(settings.train, settings.stream),
                          mode="embedding") \
            if self.stream else None
        replay = ReplayBuffer(settings.stream.replay_size, settings.train.seed) \
            if self.stream and settings.stream.replay_size else None
        self.scorer = TwoTowerScorer(bundle, features, catalog, trainer,
                                     settings.train.rating_threshold, seen=seen,
                                     replay=replay, min_batch=settings.stream.min_batch)
        self.past = [seen.positives(settings.train.rating_threshold)]  # nightly context
        self.pending: list[Events] = []  # events since the last nightly
        self.day: int | None = None
        # The last cosines scored, kept until the state moves: tuning scores one batch
        # with every prior weight in a row.
        self._cached: tuple[tuple[str, ...], np.ndarray] | None = None

    def score(self, user_ids: Sequence[str], beta: float | None = None) -> np.ndarray:
        users = tuple(str(u) for u in user_ids)
        if self._cached is None or self._cached[0] != users:
            self._cached = (users, self.scorer.score(users))
        scores = self._cached[1].copy()
        beta = self.beta if beta is None else beta
        if self.prior is not None and beta:
            scores += np.float32(beta) * np.log1p(self.prior.counts).astype(np.float32)
        return scores

    def before(self, ts_ms: int) -> None:
        """Set the clock; at a day boundary run the nightly for each finished day."""
        self._cached = None
        self.scorer.now_ms = ts_ms
        day = ts_ms // DAY_MS
        if not self.nightly or self.day == day:
            return
        if self.day is not None and self.pending:
            self._nightlies(day * DAY_MS)
        self.day = day

    def learn(self, chunk: Events) -> None:
        self._cached = None
        if self.nightly:
            self.pending.append(chunk)
        if self.stream:
            self.scorer.learn(chunk)
        if self.fresh_history:
            self.scorer.observe(chunk)
            if self.prior is not None:
                self.prior.learn(chunk)

    def _nightlies(self, until_ms: int) -> None:
        done = Events.concat(self.pending)
        self.pending = []
        bundle = self.scorer.bundle
        for d in np.unique(done.ts_ms // DAY_MS):
            day_events = done.between(int(d) * DAY_MS, min(int(d + 1) * DAY_MS, until_ms))
            # A day without positives leaves the nightly nothing to do.
            with contextlib.suppress(EmptyTrainingDataError):
                nightly(self.settings.train, bundle, self.dataset, day_events,
                        context=Events.concat(self.past))
            self.past.append(day_events.positives(self.settings.train.rating_threshold))
            if not self.fresh_history:
                self.scorer.observe(day_events)
                if self.prior is not None:
                    self.prior.learn(day_events)
        for p in bundle.model.parameters():
            p.requires_grad_(False)  # the stream's steps leave dense layers alone
        self.scorer.refresh_items()


def tuned_baselines(settings: Settings, history: Events, catalog: np.ndarray,
                    delay_s: int) -> tuple[dict[str, Callable[[Events], Any]], dict[str, Any]]:
    """Baseline factories (fitted on events) with their knob tuned by a prequential replay
    of the ``VALIDATION_DAYS`` days before the test window, at the same delay."""
    rt = settings.train.rating_threshold
    split = (int(history.ts_ms.max()) // DAY_MS + 1 - VALIDATION_DAYS) * DAY_MS
    fit, val = history.between(None, split), history.between(split)

    def recall(model: Any) -> float:
        res = prequential_arms({"m": model}, model.learn, catalog, val, (50,),
                               chunk_events=None, chunk_ms=delay_s * 1000,
                               rating_threshold=rt, seen=fit)
        return res["m"][50].recall

    half_life, hl_scores = tune(lambda h: DecayedPopularity(fit, catalog, rt, h),
                                list(HALF_LIVES_DAYS), recall)
    n_recent, knn_scores = tune(lambda n: HistoryKNN(fit, catalog, rt, int(n)),
                                list(KNN_RECENT), recall)
    factories = {
        "popularity": lambda ev: OnlinePopularity(ev, catalog, rt),
        "recent_popularity": lambda ev: DecayedPopularity(ev, catalog, rt, half_life),
        "history_knn": lambda ev: HistoryKNN(ev, catalog, rt, int(n_recent)),
    }
    tuning = {"validation_days": VALIDATION_DAYS,
              "recent_popularity": {"half_life_days": half_life, "recall@50": hl_scores},
              "history_knn": {"n_recent": n_recent, "recall@50": knn_scores}}
    return factories, tuning


class _BetaView:
    """One arm scored with another prior weight (tuning shares one replay)."""

    def __init__(self, arm: TwoTowerArm, beta: float) -> None:
        self.arm, self.beta = arm, beta

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        return self.arm.score(user_ids, self.beta)


def tune_prior_beta(settings: Settings, dataset: Dataset, tuning_base: ModelBundle,
                    history: Events, delay_s: int, half_life_days: float,
                    arms: Sequence[str] = ("nightly+history",)
                    ) -> dict[str, tuple[float, dict[float, float]]]:
    """Each two-tower arm's own prior weight: the best recall@50 on the ``VALIDATION_DAYS``
    days before the test window, replayed at ``delay_s`` by that arm from a bootstrap
    (``tuning_base``) that ends where those days begin. Per arm, because the weight that
    helps a model without fresh state (nightly) hurts one whose stream already knows
    the user's last minute."""
    split = (int(history.ts_ms.max()) // DAY_MS + 1 - VALIDATION_DAYS) * DAY_MS
    fit, val = history.between(None, split), history.between(split)
    catalog = dataset.catalog()
    replayed = {m: TwoTowerArm(settings, dataset, copy.deepcopy(tuning_base), catalog, fit,
                               SCHEDULES[m], (half_life_days, 0.0)) for m in arms}
    views = {f"{m}|{b}": _BetaView(arm, b) for m, arm in replayed.items() for b in PRIOR_BETAS}

    def before(ts_ms: int) -> None:
        for arm in replayed.values():
            arm.before(ts_ms)

    def learn(chunk: Events) -> None:
        for arm in replayed.values():
            arm.learn(chunk)

    res = prequential_arms(views, learn, catalog, val, (50,), chunk_events=None,
                           chunk_ms=delay_s * 1000,
                           rating_threshold=settings.train.rating_threshold, seen=fit,
                           before_chunk=before)
    out: dict[str, tuple[float, dict[float, float]]] = {}
    for m in arms:
        scores = {b: round(res[f"{m}|{b}"][50].recall, 4) for b in PRIOR_BETAS}
        out[m] = (max(scores, key=lambda b: (scores[b], -b)), scores)
    return out


def replay_delay(settings: Settings, dataset: Dataset, base: ModelBundle | None,
                 history: Events, test: Events, delay_s: int, models: Sequence[str],
                 tuning_base: ModelBundle | None = None
                 ) -> tuple[dict[str, dict[int, PrequentialResult]], dict[str, Any]]:
    """One prequential replay of the test window at one delay, every model on the same
    queries; returns the results and the tuning. With ``tuning_base`` (a bootstrap ending
    where the validation days begin) the two-tower arms get the popularity prior, its
    half-life that of recent_popularity and each arm's weight tuned on the validation days
    by that arm."""
    catalog = dataset.catalog()
    arms: dict[str, Any] = {}
    tuning: dict[str, Any] = {}
    if tuning_base is not None or any(m in BASELINE_NAMES for m in models):
        factories, tuning = tuned_baselines(settings, history, catalog, delay_s)
        arms |= {m: factories[m](history) for m in models if m in BASELINE_NAMES}
    tower_names = [m for m in models if m in SCHEDULES]
    priors: dict[str, tuple[float, float] | None] = dict.fromkeys(tower_names)
    if tuning_base is not None and tower_names:
        half_life = tuning["recent_popularity"]["half_life_days"]
        tuned = tune_prior_beta(settings, dataset, tuning_base, history, delay_s, half_life,
                                tower_names)
        tuning["prior"] = {"half_life_days": half_life,
                           "beta": {m: beta for m, (beta, _) in tuned.items()},
                           "recall@50": {m: scores for m, (_, scores) in tuned.items()}}
        priors = {m: (half_life, beta) for m, (beta, _) in tuned.items()}
    towers = {m: TwoTowerArm(settings, dataset, copy.deepcopy(base), catalog, history,
                             SCHEDULES[m], priors[m]) for m in tower_names}
    arms |= towers

    def before(ts_ms: int) -> None:
        for arm in towers.values():
            arm.before(ts_ms)

    def learn(chunk: Events) -> None:
        for arm in arms.values():
            arm.learn(chunk)

    results = prequential_arms(arms, learn, catalog, test, KS, chunk_events=None,
                               chunk_ms=delay_s * 1000,
                               rating_threshold=settings.train.rating_threshold,
                               seen=history, before_chunk=before)
    return {m: results[m] for m in models}, tuning


def check_curve_models(models: Sequence[str]) -> None:
    for name in models:
        if name not in CURVE_MODELS:
            raise ValueError(f"unknown model {name!r} for --prequential; known: "
                             f"{', '.join(CURVE_MODELS)}")


def freshness_curve(settings: Settings, dataset: Dataset, test_days: int,
                    delays_s: Sequence[int] = DEFAULT_DELAYS_S,
                    models: Sequence[str] = CURVE_MODELS, users: str = "all",
                    base: ModelBundle | None = None, prior: bool = False) -> dict[str, Any]:
    """Every model's prequential recall@10/50 and NDCG@10 at every delay (the report).

    ``prior``: add the decayed-popularity prior to the two-tower arms (tuned per delay
    on the days before the test window, from a second bootstrap that ends before them).
    """
    check_curve_models(models)
    if users not in ("all", "warm"):
        raise ValueError(f"users must be 'all' or 'warm', got {users!r}")
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    split = (int(dataset.events.ts_ms.max()) // DAY_MS + 1 - test_days) * DAY_MS
    history, test = dataset.events.between(None, split), dataset.events.between(split)
    started = time.perf_counter()
    towers = any(m in SCHEDULES for m in models)
    if base is None and towers:
        base, _ = bootstrap(settings.model, settings.train, dataset, history)
    tuning_base = None
    if prior and towers:
        val_start = (int(history.ts_ms.max()) // DAY_MS + 1 - VALIDATION_DAYS) * DAY_MS
        tuning_base, _ = bootstrap(settings.model, settings.train, dataset,
                                   history.between(None, val_start))
    report: dict[str, Any] = {"mode": "prequential", "dataset": dataset.name,
                              "test_days": test_days, "users": users,
                              "delays_s": list(delays_s), "popularity_prior": prior,
                              "models": {m: {} for m in models},
                              "tuning": {}}
    warm = set(history.user_id.astype(str).tolist())
    for delay in delays_s:
        results, tuning = replay_delay(settings, dataset, base, history, test, delay, models,
                                       tuning_base)
        report["tuning"][str(delay)] = tuning
        for m, res in results.items():
            report["models"][m][str(delay)] = _figures(res, warm if users == "warm" else None)
        log.info("delay replayed", extra={"delay_s": delay})
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _figures(res: dict[int, PrequentialResult], warm: set[str] | None) -> dict[str, Any]:
    if warm is not None:
        res = {k: r.restrict(warm) for k, r in res.items()}
    return {"recall@10": round(res[10].recall, 4), "recall@50": round(res[50].recall, 4),
            "ndcg@10": round(res[10].ndcg(10), 4), "n_scored": len(res[50].hit)}


def format_curve(report: dict[str, Any]) -> str:
    """A table: one row per model, recall@50 at each delay."""
    delays = [str(d) for d in report["delays_s"]]
    width = max(18, *(len(m) + 2 for m in report["models"]))
    lines = [f"{report['dataset']}: prequential recall@50, last {report['test_days']} days, "
             f"users={report['users']}",
             f"{'model':<{width}}" + "".join(f"{_delay_label(int(d)):>10}" for d in delays)]
    for m, per in report["models"].items():
        lines.append(f"{m:<{width}}" + "".join(f"{per[d]['recall@50']:>10.4f}"
                                                for d in delays))
    return "\n".join(lines)


def _delay_label(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def plot_curve(report: dict[str, Any], path: Any) -> None:
    """recall@50 against the update delay (log axis), one line per model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delays = report["delays_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, per in report["models"].items():
        ax.plot(delays, [per[str(d)]["recall@50"] for d in delays], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xticks(delays, [_delay_label(d) for d in delays])
    ax.set_xlabel("update delay (event time between state updates)")
    ax.set_ylabel("prequential recall@50")
    ax.set_title(f"{report['dataset']}: freshness curve, last {report['test_days']} days")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
