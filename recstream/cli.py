"""The ``recstream`` command: one entry point, a subcommand per job.

Bad arguments get a one-line message and exit status 2; a job that fails for a
reason the operator can act on (missing data, corrupt version, bad setting)
gets a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from common.infra.settings import Settings, SettingsError, load_settings

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line argument is invalid (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: operators grep logs for this (an argument
        # holding a line break is quoted with the break escaped).
        one_line = message.replace("\r", "\\r").replace("\n", "\\n")
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line} (see --help)\n")


def _day(text: str) -> str:
    from common.data.events import parse_day

    try:
        parse_day(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "ml-1m", "synthetic"],
                   help="data set to read (default: ml-100k, fetched into the cache)")
    p.add_argument("--path", type=Path, default=None,
                   help="directory with GroupLens' own files (u.data… or ratings.dat…)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = _Parser(prog="recstream", description="Streaming online learning for two-tower "
                     "retrieval: batch training, evaluation and the model registry.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="fetch data sets into the cache")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = data_sub.add_parser("fetch", help="download a data set into RECSTREAM_DATA_CACHE")
    fetch.add_argument("name", choices=["ml-100k"])

    train = sub.add_parser("train", help="bootstrap a model or run one nightly update")
    mode = train.add_mutually_exclusive_group(required=True)
    mode.add_argument("--bootstrap", action="store_true",
                      help="first model from a range of history (several epochs)")
    mode.add_argument("--nightly", action="store_true",
                      help="one epoch over --day, warm-started from the champion")
    _add_dataset_args(train)
    train.add_argument("--from", dest="start", type=_day, help="bootstrap: first day (incl.)")
    train.add_argument("--to", dest="end", type=_day, help="bootstrap: last day (excl.)")
    train.add_argument("--day", type=_day, help="nightly: the day to train on (YYYY-MM-DD)")
    train.add_argument("--epochs", type=_positive_int, help="bootstrap epochs (default: "
                       "RECSTREAM_TRAIN_BOOTSTRAP_EPOCHS)")
    train.add_argument("--promote", action="store_true",
                       help="make the new version champion (with --publish: released to "
                       "serving; a nightly after the stream's rebase or the timeout)")
    train.add_argument("--publish", action="store_true",
                       help="publish the new version to Redis and the FAISS index")
    train.add_argument("--force", action="store_true",
                       help="with --publish --promote: skip the metrics gate")
    train.add_argument("--source", choices=["dataset", "landed"], default="dataset",
                       help="nightly: the day's events from the data set or from the "
                       "lander's partitions under RECSTREAM_HOME/events (default: dataset)")

    ng = sub.add_parser("nightly", help="the nightly job for one day: landed check, train, "
                        "evaluate against the champion, gate, register, publish, promote "
                        "after the stream's rebase")
    _add_dataset_args(ng)
    ng.add_argument("--day", type=_day, default=None,
                    help="the UTC day to train on (default: yesterday)")
    ng.add_argument("--source", choices=["landed", "dataset"], default="landed",
                    help="the day's events from the lander's partitions (default; the day "
                    "must be completely landed) or from the data set")
    ng.add_argument("--no-guard", action="store_true",
                    help="exit after the release instead of watching it (the guard rolls "
                    "back a champion that does worse than the one it replaced)")

    sc = sub.add_parser("schedule", help="the scheduler daemon: the nightly at "
                        "RECSTREAM_NIGHTLY_CRON (default 02:00), /metrics on :9412")
    _add_dataset_args(sc)
    sc.add_argument("--run-now", action="store_true",
                    help="run the nightly for the pending days once, now, and exit")

    ev = sub.add_parser("eval", help="offline evaluation of the two-tower against baselines")
    _add_dataset_args(ev)
    ev.add_argument("--train-before", type=_day,
                    help="train on events before this day (default: the last --test-days)")
    ev.add_argument("--test-days", type=_positive_int, default=30)
    ev.add_argument("--users", choices=["all", "warm"], default="all",
                    help="evaluate every user with a test positive, or only warm ones")
    ev.add_argument("--models", default=None,
                    help="comma-separated model names (default: the README table's)")
    ev.add_argument("--json", type=Path, default=None, help="write every figure here")
    ev.add_argument("--prequential", action="store_true", help="the freshness curve: "
                    "test-then-train over the last --test-days at each --update-every")
    ev.add_argument("--update-every", default="60,600,3600,86400",
                    help="comma-separated update delays in seconds (with --prequential)")
    ev.add_argument("--prior", action="store_true",
                    help="add the decayed-popularity prior to the two-tower arms")

    dm = sub.add_parser("demo", help="the whole loop on embedded servers: bootstrap, then "
                        "the last days through Kafka, the stream and the nightly; report in "
                        "RECSTREAM_HOME/report")
    dm.add_argument("--dataset", default="ml-100k", choices=["ml-100k", "synthetic"],
                    help="data set (default: ml-100k, fetched into the cache)")
    dm.add_argument("--days", type=_positive_int, default=30,
                    help="simulated days at the end of the data (default: 30)")

    rp = sub.add_parser("replay", help="produce a data set's events into the topic in time "
                        "order")
    _add_dataset_args(rp)
    rp.add_argument("--from", dest="start", type=_day, help="first day (incl.)")
    rp.add_argument("--to", dest="end", type=_day, help="last day (excl.)")
    rp.add_argument("--speed", type=_speed, default=0.0,
                    help="X times real time; 0 or 'max' = as fast as possible (default)")
    rp.add_argument("--topic", default=None, help="default: RECSTREAM_KAFKA_TOPIC")

    st = sub.add_parser("stream", help="the trainer consumer: embedding-only updates from "
                        "the topic, published as deltas")
    _add_dataset_args(st)
    st.add_argument("--max-steps", type=_positive_int, default=None,
                    help="stop after this many steps (default: run until SIGTERM/SIGINT)")

    sub.add_parser("land", help="the lander: archive events to daily Parquet partitions")

    br = sub.add_parser("broker", help="the embedded broker of this RECSTREAM_HOME")
    br.add_argument("action", choices=["start", "stop", "status"])

    pb = sub.add_parser("publisher", help="published versions: status, publish, promote, "
                        "rollback")
    pb_sub = pb.add_subparsers(dest="publisher_command", required=True, parser_class=_Parser)
    pb_sub.add_parser("status", help="champion, previous, versions, Redis memory (JSON)")
    pb_sub.add_parser("versions", help="one line per registered version")
    pp = pb_sub.add_parser("publish", help="publish a registered version fully (no flip)")
    pp.add_argument("version", type=_version_ref)
    _add_dataset_args(pp)
    pm = pb_sub.add_parser("promote", help="make a published version the champion")
    pm.add_argument("version", type=_version_ref)
    pm.add_argument("--force", action="store_true", help="skip the metrics gate")
    pr = pb_sub.add_parser("rollback", help="serve the previous version (or --to V) again")
    pr.add_argument("--to", type=_version_ref, default=None)

    sub.add_parser("serve", help="the recall API: GET /recall?user_id=&k=, /healthz, /metrics")

    rd = sub.add_parser("redis", help="the embedded Redis of this RECSTREAM_HOME")
    rd.add_argument("action", choices=["start", "stop", "status"])
    return parser


def _version_ref(text: str) -> str:
    import re

    if text in ("champion", "previous") or re.fullmatch(r"v\d{6}", text):
        return text
    raise argparse.ArgumentTypeError(f"expected a version like v000003 (or champion, "
                                     f"previous), got {text!r}")


def _speed(text: str) -> float:
    if text == "max":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'max', got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a speed >= 0, got {text}")
    return value


def _dataset(settings: Settings, args: argparse.Namespace) -> Any:
    from common.data.movielens import load_dataset

    return load_dataset(args.dataset, settings.data_cache, path=args.path)


def _cmd_data(settings: Settings, args: argparse.Namespace) -> None:
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

    return ReleaseControl(settings, RedisFaissPublisher.from_settings(settings))


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


_COMMANDS = {"data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval, "demo": _cmd_demo,
             "replay": _cmd_replay, "stream": _cmd_stream, "land": _cmd_land,
             "broker": _cmd_broker, "redis": _cmd_redis, "publisher": _cmd_publisher,
             "serve": _cmd_serve, "nightly": _cmd_nightly, "schedule": _cmd_schedule}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        from common.infra.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        if settings.train.threads:
            import torch

            torch.set_num_threads(settings.train.threads)
        _COMMANDS[args.command](settings, args)
    except UsageError as exc:
        print(f"recstream: error: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except (SettingsError, ValueError, RuntimeError, OSError) as exc:
        print(f"recstream {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("recstream: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
