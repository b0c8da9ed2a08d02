"""Training jobs as the CLI runs them: pick the data, train, register the version."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from batch.trainer import bootstrap, nightly
from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events, format_day
from common.infra.settings import Settings
from common.model.registry import Registry

log = logging.getLogger(__name__)

HISTORY_CONTEXT_DAYS = 90


@dataclass(frozen=True)
class JobResult:
    """A registered version and how it was made."""

    version: str
    promoted: bool
    cutoff_day: str
    examples: int
    examples_per_s: float
    final_loss: float


def bootstrap_job(settings: Settings, dataset: Dataset, start_ms: int | None,
                  end_ms: int | None, epochs: int | None = None,
                  promote: bool | None = None) -> JobResult:
    """Train the first model on ``[start_ms, end_ms)`` and register it.

    The version becomes champion when there is none yet (or when ``promote`` says so).
    """
    history = dataset.events.between(start_ms, end_ms)
    if len(history) == 0:
        raise ValueError("no events in the requested range; check --from/--to")
    cutoff = int(history.ts_ms.max()) + 1 if end_ms is None else end_ms
    bundle, stats = bootstrap(settings.model, settings.train, dataset, history, epochs)
    registry = Registry(settings.models_dir)
    version = registry.register(
        bundle, kind="bootstrap", cutoff_ms=cutoff, parent=None, metrics={},
        config_hash=settings.model_hash(),
        extra={"dataset": dataset.name, "train": asdict(stats)})
    do_promote = registry.aliases()["champion"] is None if promote is None else promote
    if do_promote:
        registry.promote(version)
    log.info("bootstrap registered", extra={"version": version, "promoted": do_promote})
    return JobResult(version, do_promote, format_day(cutoff - 1), stats.examples,
                     stats.examples_per_s, stats.final_loss)


def nightly_job(settings: Settings, dataset: Dataset, day_ms: int, promote: bool = False,
                day_events: Events | None = None) -> JobResult:
    """Warm-start from the champion, one epoch over the day, register (promote on request).

    The day's events are the landed partition's when given (``day_events``), else the
    data set's; side features always come from the data set.
    """
    registry = Registry(settings.models_dir)
    bundle, meta = registry.load("champion")
    source = "dataset" if day_events is None else "landed"
    if day_events is None:
        day_events = dataset.events.between(day_ms, day_ms + DAY_MS)
    # Earlier positives give a history-reading model each example's history from before
    # the day (a model without a history field ignores them).
    context = dataset.events.between(day_ms - HISTORY_CONTEXT_DAYS * DAY_MS, day_ms)
    stats = nightly(settings.train, bundle, dataset, day_events,
                    context=context.positives(settings.train.rating_threshold))
    version = registry.register(
        bundle, kind="nightly", cutoff_ms=day_ms + DAY_MS, parent=meta["version"], metrics={},
        config_hash=settings.model_hash(),
        extra={"dataset": dataset.name, "day": format_day(day_ms), "source": source,
               "train": asdict(stats)})
    if promote:
        registry.promote(version)
    log.info("nightly registered", extra={"version": version, "parent": meta["version"]})
    return JobResult(version, promote, format_day(day_ms), stats.examples,
                     stats.examples_per_s, stats.final_loss)
