"""``recstream schedule``: the daemon that runs the nightly from a cron trigger.

APScheduler fires the job (``NIGHTLY_CRON``, default 02:00 in ``NIGHTLY_TIMEZONE``) with
``max_instances=1``, ``coalesce=True`` and a misfire grace time, so a scheduler that was
down runs a missed night once on its return. Across processes a Redis lock keeps two
schedulers from running the job at once; the holder renews it while the job runs and
checks it before every step that writes. Each run trains the days after the champion's
data up to yesterday (UTC), oldest first, and stops at the first day that fails.
``recstream schedule --run-now`` runs the job once now, under the same lock, and exits.

>>> t = cron_trigger("0 2 * * 1-5", "UTC")  # crontab weekdays: 1-5 = Monday to Friday
>>> str(t.fields[4]), str(t.fields[5]), str(t.fields[6])  # weekday, hour, minute
('mon-fri', '2', '0')
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from redis.exceptions import LockError, RedisError

from batch.metrics import NightlyMetrics
from batch.nightly import NightlyJob, NightlyReport, guard_release, pending_days
from common.data.dataset import Dataset
from common.infra.settings import Settings
from common.infra.shutdown import StopFlag
from common.infra.telemetry import serve_metrics
from publisher.base import PublishError
from publisher.control import ReleaseControl
from publisher.redis_users import COMPLETE

log = logging.getLogger(__name__)

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class ScheduleError(ValueError):
    """The cron expression or time zone in the settings is not usable."""


def cron_trigger(expr: str, timezone: str) -> CronTrigger:
    """A trigger from crontab fields (minute hour day month weekday, optionally seconds
    first); weekday numbers mean what crontab means (0 and 7 are Sunday)."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ScheduleError(f"RECSTREAM_NIGHTLY_CRON={expr!r}: expected 5 crontab fields "
                            "(minute hour day month weekday) or 6 with seconds first")
    if len(fields) == 5:
        fields = ["0", *fields]
    # APScheduler 3 counts weekdays from Monday = 0; crontab from Sunday = 0: use names.
    fields[5] = re.sub(r"(?<![/\d])\d+", lambda m: _WEEKDAYS[int(m[0]) % 7]
                       if int(m[0]) <= 7 else m[0], fields[5])
    zone = _zone(timezone)
    try:
        return CronTrigger(second=fields[0], minute=fields[1], hour=fields[2], day=fields[3],
                           month=fields[4], day_of_week=fields[5], timezone=zone)
    except ValueError as exc:
        raise ScheduleError(f"RECSTREAM_NIGHTLY_CRON={expr!r}: {exc}") from None


def _zone(name: str) -> Any:
    if not name:
        return None  # APScheduler's default: the machine's local zone
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"RECSTREAM_NIGHTLY_TIMEZONE={name!r}: unknown time zone") from None


class LockHeldError(RuntimeError):
    """Another scheduler is running the nightly; this run was skipped."""


class RunLock:
    """The Redis lock around one run, renewed every third of its TTL while held."""

    def __init__(self, client: Any, key: str, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._lock = client.lock(key, timeout=ttl_s, blocking=False, thread_local=False)
        self._done = threading.Event()
        self._lost = False
        self._renewer: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self._lock.acquire(blocking=False):
            return False
        self._renewer = threading.Thread(target=self._renew, name="lock-renewer", daemon=True)
        self._renewer.start()
        return True

    def held(self) -> bool:
        return self._renewer is not None and not self._lost

    def _renew(self) -> None:
        while not self._done.wait(self.ttl_s / 3):
            try:
                self._lock.reacquire()
            except (LockError, RedisError) as exc:
                self._lost = True
                log.error("nightly lock lost", extra={"error": str(exc)})
                return

    def release(self) -> None:
        self._done.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self._lock.release()
        except (LockError, RedisError) as exc:
            log.warning("nightly lock could not be released (it expires by itself)",
                        extra={"error": str(exc)})


class NightlyScheduler:
    """Runs the nightly for the pending days, one process at a time."""

    def __init__(self, settings: Settings, dataset: Dataset, control: ReleaseControl,
                 metrics: NightlyMetrics | None = None, stop: StopFlag | None = None,
                 progress: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.s, self.dataset, self.control = settings, dataset, control
        self.metrics = metrics or NightlyMetrics()
        self.stop = stop or StopFlag()
        self.progress = progress or (lambda line: None)
        self.clock = clock
        self.lock_key = f"{settings.redis.prefix}:lock:nightly"
        self.running = threading.Lock()  # one run per process (the Redis lock: per fleet)
        self._guard_lock = threading.Lock()
        self._guard_generation = 0
        self.guard_thread: threading.Thread | None = None

    def run_once(self) -> list[NightlyReport]:
        """One run under the lock: every pending day until one fails (none pending: an
        empty list). Raises ``LockHeldError`` when another scheduler holds the lock."""
        lock = RunLock(self.control.pub.users.r, self.lock_key, self.s.nightly.lock_ttl_s)
        with self.running:
            if not lock.acquire():
                self.metrics.lock_skips.inc()
                raise LockHeldError(f"another scheduler holds the lock {self.lock_key}: "
                                    "this run was skipped")
            try:
                return self._run_days(lock)
            finally:
                lock.release()

    def _run_days(self, lock: RunLock) -> list[NightlyReport]:
        days = pending_days(self.control.registry, int(self.clock() * 1000),
                            self.s.nightly.catchup_days)
        if not days:
            self.progress("[nightly] nothing to train: the champion covers yesterday")
        reports = []
        for day in days:
            job = NightlyJob(self.s, self.dataset, self.control, self.metrics,
                             progress=self.progress,
                             still_owner=lambda: lock.held() and not self.stop.is_set())
            reports.append(job.run(day))
            if not reports[-1].ok or self.stop.is_set():
                break
        watched = [r for r in reports if r.guard_start is not None]
        if watched:  # the last release, even when a later day failed
            self._start_guard(watched[-1])
        return reports

    def _start_guard(self, report: NightlyReport) -> None:
        """Watch the last release in the background; a newer release ends the old watch."""
        with self._guard_lock:
            self._guard_generation += 1
            generation = self._guard_generation

        def keep_waiting() -> bool:
            return not self.stop.is_set() and generation == self._guard_generation

        def watch() -> None:
            try:
                guard_release(self.s, self.dataset, self.control, self.metrics, report,
                              keep_waiting)
            except Exception:  # noqa: BLE001 - a broken check must not take the daemon down
                log.exception("promotion guard failed", extra={"version": report.version})

        self.guard_thread = threading.Thread(target=watch, name="promotion-guard", daemon=True)
        self.guard_thread.start()

    def _fire(self) -> None:
        try:
            self.run_once()
        except LockHeldError as exc:
            log.warning("nightly skipped", extra={"reason": str(exc)})
        except Exception:  # noqa: BLE001 - the daemon outlives a broken run
            self.metrics.finished("failed", 0.0)
            log.exception("nightly run failed")

    def serve(self) -> None:
        """Fire on the cron trigger until the stop flag is set; wait for a running job."""
        trigger = cron_trigger(self.s.nightly.cron, self.s.nightly.timezone)
        scheduler = BackgroundScheduler(timezone=trigger.timezone)
        job = scheduler.add_job(self._fire, trigger, id="nightly", max_instances=1,
                                coalesce=True,
                                misfire_grace_time=self.s.nightly.misfire_grace_s)
        scheduler.start()
        log.info("scheduler started", extra={"cron": self.s.nightly.cron,
                                             "next_run": str(job.next_run_time)})
        try:
            ticks = 0
            self._next_run_gauge(scheduler)  # from the start, not after the first tick
            while not self.stop.wait(1.0):
                self._next_run_gauge(scheduler)
                if ticks % 15 == 0:
                    self._publishing_gauges()
                ticks += 1
        finally:
            # A running job sees the stop flag at its next step and gives up cleanly.
            scheduler.shutdown(wait=True)
        log.info("scheduler stopped", extra={"reason": self.stop.reason})

    def _next_run_gauge(self, scheduler: BackgroundScheduler) -> None:
        job = scheduler.get_job("nightly")
        if job is not None and job.next_run_time is not None:
            self.metrics.next_run.set(job.next_run_time.timestamp())

    def _publishing_gauges(self) -> None:
        """Redis memory and published versions, for the publishing dashboard."""
        users = self.control.pub.users
        try:
            self.metrics.redis_memory.set(int(users.r.info("memory").get("used_memory", 0)))
            self.metrics.published.set(sum(m.state == COMPLETE
                                           for m in users.versions().values()))
        except (RedisError, PublishError) as exc:
            log.warning("cannot read Redis for the publishing gauges", extra={"error": str(exc)})


def run_scheduler_daemon(settings: Settings, dataset: Dataset, control: ReleaseControl,
                         stop: StopFlag | None = None) -> None:
    """``recstream schedule``: serve /metrics and fire the nightly until SIGTERM/SIGINT."""
    stop = StopFlag.for_daemon(stop)
    metrics = NightlyMetrics()
    scheduler = NightlyScheduler(settings, dataset, control, metrics, stop,
                                 progress=lambda line: log.warning(line))
    with serve_metrics(metrics.registry, settings.nightly.metrics_host,
                       settings.nightly.metrics_port):
        scheduler.serve()
