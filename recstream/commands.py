"""What each ``recstream`` subcommand does, given the settings and its parsed arguments
(``recstream.cli`` parses them and maps failures to exit statuses).

Heavy modules (torch, the broker's client, serving) are imported inside each command, so
``recstream --help`` and a bad argument answer at once. A command raises ``UsageError``
for arguments that parse but do not fit together (exit status 2); any other failure it
lets through for ``main`` to report in one line (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from common.infra.settings import Settings


class UsageError(Exception):
    """A command-line argument is invalid (exit status 2)."""


def _dataset(settings: Settings, args: argparse.Namespace) -> Any:
    from common.data.datasets import load_dataset

    return load_dataset(args.dataset, settings.data_cache, path=args.path,
                        rating_threshold=settings.train.rating_threshold)


def _cmd_data(settings: Settings, args: argparse.Namespace) -> None:
    if args.data_command == "import":
        from common.data.importer import ImportOptions, import_events

        opts = ImportOptions(
            user_col=args.user_col, item_col=args.item_col, ts_col=args.ts_col,
            value_col=args.value_col, type_col=args.type_col, ts_format=args.ts_format,
            positive=args.positive, name=args.name, delimiter=args.delimiter,
            users=args.users, items=args.items, user_fields=args.user_fields,
            item_fields=args.item_fields)
        report = import_events(args.source, args.target, opts)
        for line in report.bad.details():
            print(f"bad rows: {line}", file=sys.stderr)
        print(report.line())
    elif args.data_command == "describe":
        from common.data.describe import describe
        from common.infra.atomic import write_text_atomic

        args.path = None
        figures = describe(_dataset(settings, args), settings.train.rating_threshold)
        text = json.dumps(figures, indent=2)
        if args.json is not None:
            write_text_atomic(args.json, text + "\n")
        print(text)
    else:
        from common.data.movielens import fetch_ml100k

        print(fetch_ml100k(settings.data_cache))


def _cmd_train(settings: Settings, args: argparse.Namespace) -> None:
    from batch.jobs import bootstrap_job, nightly_job
    from common.data.events import parse_day

    dataset = _dataset(settings, args)
    if args.bootstrap:
        if args.day:
            raise UsageError("--day applies to --nightly; use --from/--to with --bootstrap")
        start = parse_day(args.start) if args.start else None
        end = parse_day(args.end) if args.end else None
        result = bootstrap_job(settings, dataset, start, end, args.epochs,
                               promote=True if args.promote else None)
    else:
        if not args.day:
            raise UsageError("--nightly needs --day YYYY-MM-DD")
        day_events = None
        if args.source == "landed":
            from common.data.landed import read_landed_day

            day_events = read_landed_day(settings.events_dir, args.day)
        result = nightly_job(settings, dataset, parse_day(args.day),
                             promote=args.promote and not args.publish, day_events=day_events)
    print(json.dumps(asdict(result), indent=2))
    if args.publish:
        _publish_trained(settings, dataset, result.version, args)


def _publish_trained(settings: Settings, dataset: Any, version: str,
                     args: argparse.Namespace) -> None:
    control = _release_control(settings)
    control.publish(version, dataset, progress=True)
    released = control.pub.users.release().champion
    if args.nightly and args.promote:
        release = control.promote_when_rebased(version, force=args.force)
    elif args.promote or released is None:
        release = control.promote(version, force=args.force)
    else:
        print(f"published {version}; serving stays on {released}")
        return
    print(f"released {release.champion} (previous {release.previous})")


def _cmd_nightly(settings: Settings, args: argparse.Namespace) -> None:
    from batch.metrics import NightlyMetrics
    from batch.nightly import NightlyJob, guard_release
    from common.data.events import DAY_MS, format_day

    day = args.day or format_day((int(time.time() * 1000) // DAY_MS - 1) * DAY_MS)
    metrics = NightlyMetrics()
    job = NightlyJob(settings, _dataset(settings, args), _release_control(settings), metrics,
                     source=args.source, progress=_stderr_line)
    report = job.run(day)
    print(json.dumps(asdict(report), indent=2), flush=True)
    if report.guard_start is not None and not args.no_guard:
        _stderr_line(f"[guard] watching {report.version} against {report.previous} on the "
                     f"next {settings.nightly.guard_events} streamed positives (at most "
                     f"{settings.nightly.guard_timeout_s:g} s; --no-guard skips this)")
        guard = guard_release(settings, job.dataset, job.control, metrics, report)
        if guard is not None:
            _stderr_line(f"[guard] {guard.decision}: {guard.reason}")
            if guard.decision == "rollback":
                report.reason = f"the guard rolled {report.version} back: {guard.reason}"
                report.result = "rolled_back"
    # For node_exporter's textfile collector: the scheduler serves these on /metrics.
    metrics.write_textfile(settings.home / "metrics" / "nightly.prom")
    if report.result not in ("released", "up_to_date"):
        raise RuntimeError(report.reason)


def _cmd_schedule(settings: Settings, args: argparse.Namespace) -> None:
    from batch.scheduler import NightlyScheduler, cron_trigger, run_scheduler_daemon

    cron_trigger(settings.nightly.cron, settings.nightly.timezone)  # fail before anything
    dataset, control = _dataset(settings, args), _release_control(settings)
    if not args.run_now:
        run_scheduler_daemon(settings, dataset, control)
        return
    reports = NightlyScheduler(settings, dataset, control, progress=_stderr_line).run_once()
    print(json.dumps([asdict(r) for r in reports], indent=2))
    failed = [r for r in reports if not r.ok]
    if failed:
        raise RuntimeError(failed[0].reason)


def _release_control(settings: Settings) -> Any:
    from publisher.control import ReleaseControl
    from publisher.redis_faiss import RedisFaissPublisher

    return ReleaseControl.from_settings(settings, RedisFaissPublisher.from_settings(settings))


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_eval(settings: Settings, args: argparse.Namespace) -> None:
    from batch.evaluation import DEFAULT_MODELS, format_table, run_offline_eval

    if args.prequential:
        from batch.evaluation import run_prequential_eval

        run_prequential_eval(settings, _dataset(settings, args), args.test_days,
                             args.update_every, args.users,
                             args.models.split(",") if args.models else None, args.json,
                             args.prior)
        return
    models = args.models.split(",") if args.models else list(DEFAULT_MODELS)
    report = run_offline_eval(settings, _dataset(settings, args), args.train_before,
                              args.test_days, args.users, models)
    print(format_table(report))
    if args.json:
        from common.infra.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(report, indent=2))
        print(f"wrote {args.json}")


def _cmd_demo(settings: Settings, args: argparse.Namespace) -> None:
    from recstream.demo import run_demo

    run_demo(settings, args.dataset, args.days)


def _cmd_replay(settings: Settings, args: argparse.Namespace) -> None:
    from common.data.events import parse_day
    from stream.replayer import replay

    start = parse_day(args.start) if args.start else None
    end = parse_day(args.end) if args.end else None
    if start is not None and end is not None and end <= start:
        raise UsageError("--to must be after --from")
    stats = replay(settings, _dataset(settings, args), start, end, args.speed, args.topic)
    print(json.dumps(asdict(stats), indent=2))


def _cmd_stream(settings: Settings, args: argparse.Namespace) -> None:
    from stream.daemon import run_trainer_daemon

    run_trainer_daemon(settings, _dataset(settings, args), max_steps=args.max_steps)


def _cmd_land(settings: Settings, args: argparse.Namespace) -> None:
    from stream.lander import run_lander_daemon

    run_lander_daemon(settings)


def _cmd_broker(settings: Settings, args: argparse.Namespace) -> None:
    from common.infra.broker import home_broker

    if settings.kafka.bootstrap:
        raise UsageError("RECSTREAM_KAFKA_BOOTSTRAP is set: the embedded broker is not used")
    server = home_broker(settings.run_dir)
    _server_action(args.action, server, lambda b: b.bootstrap)


def _cmd_publisher(settings: Settings, args: argparse.Namespace) -> None:
    control = _release_control(settings)
    command = args.publisher_command
    if command == "status":
        print(json.dumps(control.status(), indent=2))
    elif command == "versions":
        print(f"{'version':9} {'role':9} {'kind':9} {'cutoff':10} {'published':9} "
              f"{'users':>8} {'rebased':7} metrics")
        for v in control.versions():
            metrics = " ".join(f"{k}={x:.4f}" for k, x in sorted(v.metrics.items()))
            print(f"{v.version:9} {v.role or '-':9} {v.kind:9} {_date(v.cutoff_ms):10} "
                  f"{v.published if v.index or v.published == 'no' else 'no index':9} "
                  f"{v.users:>8} {'yes' if v.rebased else 'no':7} {metrics or '-'}")
    elif command == "publish":
        report = control.publish(args.version, _dataset(settings, args), progress=True)
        print(json.dumps(asdict(report), indent=2))
    else:
        release = (control.promote(args.version, force=args.force) if command == "promote"
                   else control.rollback(args.to))
        print(f"champion={release.champion} previous={release.previous} seq={release.seq}")


def _date(ms: int) -> str:
    from common.data.events import format_day

    return format_day(ms - 1) if ms else "-"


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from serving.app import run_serving

    run_serving(settings)


def _cmd_redis(settings: Settings, args: argparse.Namespace) -> None:
    from common.infra.redis_server import home_redis

    if settings.redis.url:
        raise UsageError("RECSTREAM_REDIS_URL is set: the embedded Redis is not used")
    _server_action(args.action, home_redis(settings.run_dir), lambda r: r.url)


def _server_action(action: str, server: Any, address: Any) -> None:
    if action == "start":
        print(address(server.ensure()))
    elif action == "stop":
        print("stopped" if server.stop() else "not running")
    else:
        found = server.answering()
        print(f"running pid={found.pid} address={address(found)}" if found else "not running")


# The subcommand (``build_parser``'s ``command``) -> what runs it.
COMMANDS = {"data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo,
            "replay": _cmd_replay, "stream": _cmd_stream, "land": _cmd_land,
            "broker": _cmd_broker, "redis": _cmd_redis, "publisher": _cmd_publisher,
            "serve": _cmd_serve, "nightly": _cmd_nightly, "schedule": _cmd_schedule}
