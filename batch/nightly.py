"""``recstream nightly --day D``: the full retrain of one day, from landing to release.

Steps: landed (the day's partition is complete: the lander's watermark passed the next
midnight) → train (one shuffled epoch warm-started from the champion, the day's newest
events held out) → evaluate (candidate and champion on the held-out events) → gate →
register → publish (Redis + FAISS, not yet served) → promote (after the stream reports
its rebase onto the new version, or the publisher's rebase timeout).

The champion changes only in the last step, so a run that fails anywhere leaves it
serving; the report says which step failed and why. A run is safe to repeat: a day
the champion already covers is reported ``up_to_date``, and a version registered for
the day but not yet released is published and promoted instead of trained again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from kafka.errors import KafkaError

from batch.gate import GateDecision, decide, evaluate_on_holdout, split_holdout
from batch.guard import GuardError, GuardResult, PromotionGuard, stream_end_offsets
from batch.metrics import NightlyMetrics
from batch.trainer import nightly
from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events, format_day, parse_day
from common.data.landed import landed_through, read_landed_day
from common.infra.kafka_clients import bootstrap_servers
from common.infra.settings import Settings
from common.model.registry import Registry
from publisher.control import ReleaseControl

log = logging.getLogger(__name__)


class NightlyError(RuntimeError):
    """A step of the nightly failed; the champion was left as it was."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason


@dataclass
class NightlyReport:
    """What a nightly run did: ``result`` is released, up_to_date, refused or failed."""

    day: str
    result: str = "failed"
    reason: str = ""
    version: str | None = None
    parent: str | None = None
    champion: str | None = None  # when the run ended
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step
    metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    examples_per_s: float = 0.0
    loss: float = float("nan")
    previous: str | None = None  # the champion the release replaced
    # Where the stream stood at the flip: the guard scores the events after it.
    guard_start: dict[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.result in ("released", "up_to_date")


def trained_through(meta: dict[str, Any]) -> str:
    """The last day a version's training data covers (a nightly's day, else its cutoff's)."""
    return meta.get("day") or format_day(int(meta["cutoff_ms"]) - 1)


class NightlyJob:
    """Runs the steps for one day; ``still_owner`` is asked before anything is written
    (the scheduler's lock), ``progress`` gets one line per step."""

    def __init__(self, settings: Settings, dataset: Dataset, control: ReleaseControl,
                 metrics: NightlyMetrics | None = None, source: str = "landed",
                 progress: Callable[[str], None] | None = None,
                 still_owner: Callable[[], bool] = lambda: True) -> None:
        self.s, self.dataset, self.control, self.source = settings, dataset, control, source
        self.metrics = metrics or NightlyMetrics()
        self.registry: Registry = control.registry
        self.progress = progress or (lambda line: None)
        self.still_owner = still_owner

    def run(self, day: str) -> NightlyReport:
        """All steps for ``day``; never raises for a failed step (see the report)."""
        parse_day(day)
        report = NightlyReport(day)
        start = time.perf_counter()
        try:
            self._run(day, report)
        except NightlyError as exc:
            report.result = "refused" if exc.step == "gate" else "failed"
            report.reason = str(exc)
            log.error("nightly did not release", extra={"day": day, "step": exc.step,
                                                        "reason": exc.reason})
        report.champion = self.registry.aliases()["champion"]
        self.metrics.finished(report.result, time.perf_counter() - start)
        self.progress(f"[nightly {day}] {report.result}"
                      + (f": {report.reason}" if report.reason else "")
                      + f" (champion {report.champion})")
        return report

    def _run(self, day: str, report: NightlyReport) -> None:
        with self._step("landed", report):
            champion = self.registry.aliases()["champion"]
            if champion is None:
                raise NightlyError("landed", "no champion yet: run train --bootstrap first")
            covered = trained_through(self.registry.meta(champion))
            if covered >= day:
                report.result, report.reason = "up_to_date", \
                    f"champion {champion} already covers {covered}"
                return
            version = self._registered_for(day, champion)
            events = None if version else self._day_events(day)
        if version is None:
            assert events is not None
            version = self._train_and_register(day, champion, events, report)
        else:
            self.progress(f"[nightly {day}] {version} was registered by an earlier run: "
                          "publishing it")
        report.version, report.parent = version, champion
        self._release(version, report)

    def _train_and_register(self, day: str, champion: str, events: Events,
                            report: NightlyReport) -> str:
        with self._step("train", report):
            bundle, meta = self.registry.load(champion)
            train, held_out, cutoff = split_holdout(events, self.s.nightly.holdout_fraction)
            stats = nightly(self.s.train, bundle, self.dataset, train)
            report.examples, report.examples_per_s, report.loss = \
                stats.examples, stats.examples_per_s, stats.final_loss
            self.metrics.examples_per_s.set(stats.examples_per_s)
            self.metrics.loss.set(stats.final_loss)
        with self._step("evaluate", report):
            groups = self.s.nightly, self.s.eval, self.s.train
            report.metrics = evaluate_on_holdout(*groups, self.dataset, bundle, train, held_out)
            old, _ = self.registry.load(champion)
            report.champion_metrics = evaluate_on_holdout(*groups, self.dataset, old, train,
                                                          held_out)
            for name in _figures(report.metrics):
                self.metrics.eval.labels(name, "candidate").set(report.metrics[name])
                self.metrics.eval.labels(name, "champion").set(report.champion_metrics[name])
        with self._step("gate", report):
            decision = decide(report.metrics, report.champion_metrics, self.s.eval.gate_metric,
                              self.s.eval.gate_tolerance, stats.final_loss,
                              self.s.nightly.gate_min_users)
            self.metrics.gate.labels("pass" if decision.passed else "refuse").inc()
            if not decision.passed:
                raise NightlyError("gate", decision.reason)
        with self._step("register", report):
            self._require_owner("register")
            version = self.registry.register(
                bundle, kind="nightly", cutoff_ms=cutoff, parent=meta["version"],
                metrics=report.metrics, config_hash=self.s.model_hash(),
                extra={"dataset": self.dataset.name, "day": day, "source": self.source,
                       "train": asdict(stats),
                       "eval": _eval_record(champion, report, decision, len(held_out))})
            self.metrics.version.set(int(version.lstrip("v") or 0))
        return version

    def _release(self, version: str, report: NightlyReport) -> None:
        with self._step("publish", report):
            self._require_owner("publish")
            self.control.publish(version, self.dataset)
        with self._step("promote", report):
            self._require_owner("promote")
            release = self.control.promote_when_rebased(version, keep_waiting=self.still_owner)
        report.result, report.previous = "released", release.previous
        if self.s.nightly.guard_events and release.previous is not None:
            try:
                report.guard_start = stream_end_offsets(self.s.kafka,
                                                        bootstrap_servers(self.s))
            except (GuardError, KafkaError) as exc:
                log.error("released, but the guard cannot start: the broker did not answer",
                          extra={"version": version, "error": str(exc)})
        log.info("nightly released", extra={"version": version, "champion": release.champion})

    def _day_events(self, day: str) -> Events:
        if self.source == "dataset":
            return self.dataset.events.between(parse_day(day), parse_day(day) + DAY_MS)
        complete, watermark = landed_through(self.s.events_dir, day,
                                             int(self.s.nightly.lateness_s * 1000))
        if not complete:
            seen = "nothing landed yet" if watermark is None else \
                f"watermark {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(watermark / 1000))}"
            raise NightlyError("landed", f"{day} is not completely landed ({seen} UTC; the "
                               f"next midnight + {self.s.nightly.lateness_s:g} s is needed)")
        return read_landed_day(self.s.events_dir, day)

    def _registered_for(self, day: str, champion: str) -> str | None:
        """A version an earlier run registered for ``day`` on this champion, not withdrawn."""
        withdrawn = self.control.pub.withdrawn()
        for version in reversed(self.registry.versions()):
            meta = self.registry.meta(version)
            if (meta.get("kind") == "nightly" and meta.get("day") == day
                    and meta.get("parent") == champion and version not in withdrawn):
                return version
        return None

    def _require_owner(self, step: str) -> None:
        if not self.still_owner():
            raise NightlyError(step, "the scheduler lost its lock; another scheduler may be "
                               "running the nightly")

    @contextmanager
    def _step(self, name: str, report: NightlyReport) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except NightlyError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the step's reason
            raise NightlyError(name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            seconds = time.perf_counter() - start
            report.steps[name] = round(seconds, 3)
            self.metrics.step(name, seconds)
            log.info("nightly step", extra={"day": report.day, "step": name,
                                            "seconds": round(seconds, 3)})
            self.progress(f"[nightly {report.day}] {name} {seconds:.1f} s")


def guard_release(settings: Settings, dataset: Dataset, control: ReleaseControl,
                  metrics: NightlyMetrics, report: NightlyReport,
                  keep_waiting: Callable[[], bool] = lambda: True) -> GuardResult | None:
    """Watch the release a nightly made (see ``batch.guard``); None when there is none."""
    if report.result != "released" or report.guard_start is None or report.version is None \
            or report.previous is None:
        return None
    guard = PromotionGuard(settings.nightly, settings.eval, settings.train, settings.kafka,
                           bootstrap_servers(settings), dataset, control, metrics.guard)
    return guard.check(report.version, report.previous, report.guard_start, keep_waiting)


def pending_days(registry: Registry, today_ms: int, limit: int) -> list[str]:
    """Days after the champion's training data up to yesterday, oldest first, at most
    ``limit`` of them (a scheduler that was down catches up a few days a night)."""
    champion = registry.aliases()["champion"]
    if champion is None:
        return []
    start = parse_day(trained_through(registry.meta(champion))) + DAY_MS
    yesterday = (today_ms // DAY_MS - 1) * DAY_MS
    return [format_day(d) for d in range(start, yesterday + 1, DAY_MS)][:limit]


def _figures(metrics: dict[str, float]) -> list[str]:
    return [k for k in metrics if "@" in k or k == "auc"]


def _eval_record(champion: str, report: NightlyReport, decision: GateDecision,
                 held_out_events: int) -> dict[str, Any]:
    return {"against": champion, "champion_metrics": report.champion_metrics,
            "held_out_events": held_out_events, "gate": asdict(decision)}
