"""The ``recstream`` command: one entry point, a subcommand per job. This module holds the
argument parser and ``main``; what each subcommand does is in ``recstream.commands``.

Bad arguments get a one-line message and exit status 2; a job that fails for a
reason the operator can act on (missing data, corrupt version, bad setting)
gets a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from common.infra.settings import SettingsError, load_settings
from recstream.commands import COMMANDS, UsageError

EXIT_FAILED = 1
EXIT_USAGE = 2


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


DATASET_NAMES = ("ml-100k", "ml-1m", "synthetic")


def _dataset_ref(text: str, names: Sequence[str] = DATASET_NAMES) -> str:
    """A shortcut name, or a data set directory (one holding ``dataset.toml``)."""
    if text in names or (Path(text) / "dataset.toml").is_file():
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(names)}, or a data set directory "
        f"holding dataset.toml; `recstream data import` makes one)")


def _positive_rule(text: str) -> str:
    from common.data.contract import ContractError, PositiveRule

    try:
        PositiveRule.parse(text)
    except ContractError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _field_list(text: str) -> str:
    from common.data.contract import ContractError
    from common.data.importer import parse_fields

    try:
        parse_fields(text, "fields")
    except (ContractError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", type=_dataset_ref, metavar="NAME|DIR",
                   help="a data set directory (see `recstream data import`) or one of "
                   "ml-100k, ml-1m, synthetic: shortcuts to a directory in the data cache "
                   "(default: ml-100k, fetched into the cache)")
    p.add_argument("--path", type=Path, default=None,
                   help="directory with GroupLens' own files (u.data… or ratings.dat…)")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = _Parser(prog="recstream", description="Streaming online learning for two-tower "
                     "retrieval: batch training, evaluation and the model registry.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # In --help's order: data and training, the nightly, the loop's parts, releases.
    _add_training(sub)
    _add_nightly(sub)
    _add_loop(sub)
    _add_releases(sub)
    return parser


def _add_training(sub: argparse._SubParsersAction) -> None:
    """``data fetch|import|describe`` and ``train`` (bootstrap or one nightly update)."""
    data = sub.add_parser("data", help="fetch, import and describe data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = data_sub.add_parser("fetch", help="download a data set into RECSTREAM_DATA_CACHE")
    fetch.add_argument("name", choices=["ml-100k"])
    _add_import(data_sub)
    ds = data_sub.add_parser("describe", help="events, users, items, days, positives, "
                             "popularity concentration and activity per day (JSON)")
    ds.add_argument("dataset", type=_dataset_ref, metavar="NAME|DIR")
    ds.add_argument("--json", type=Path, default=None, help="also write the figures here")

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


def _add_import(data_sub: argparse._SubParsersAction) -> None:
    im = data_sub.add_parser("import", help="an event log (CSV, Parquet, JSON lines; a file "
                             "or a directory of them) into a new data set directory")
    im.add_argument("source", type=Path, help="the event file, or a directory of them")
    im.add_argument("--to", dest="target", type=Path, required=True,
                    help="the data set directory to create (must not exist, or be empty)")
    im.add_argument("--name", default=None, help="the data set's name (default: --to's)")
    im.add_argument("--user-col", default="user_id", help="default: user_id")
    im.add_argument("--item-col", default="item_id", help="default: item_id")
    im.add_argument("--ts-col", default="ts", help="default: ts; ISO-8601, epoch seconds or "
                    "milliseconds are recognised")
    im.add_argument("--value-col", default=None, help="default: value, if there is one")
    im.add_argument("--type-col", default=None, help="default: event_type, if there is one")
    im.add_argument("--ts-format", default=None,
                    help="strptime format for timestamps of any other shape, e.g. "
                    "'%%d/%%m/%%Y %%H:%%M'")
    im.add_argument("--delimiter", default=",", help="CSV field separator (default: ,)")
    im.add_argument("--positive", type=_positive_rule, default="",
                    help="'value >= 4' or 'event_type in [click, like]' (default: every "
                    "event is a positive)")
    im.add_argument("--users", type=Path, default=None, help="user features (CSV/Parquet)")
    im.add_argument("--items", type=Path, default=None, help="item features (CSV/Parquet)")
    im.add_argument("--user-fields", type=_field_list, default=None,
                    help="e.g. 'age:numeric:6,gender,tags:multi,bio:text' (default: every "
                    "column, kind inferred)")
    im.add_argument("--item-fields", type=_field_list, default=None, help="as --user-fields")


def _add_nightly(sub: argparse._SubParsersAction) -> None:
    """``nightly`` (the whole job for one day), ``schedule`` (its daemon) and ``eval``."""
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


def _add_loop(sub: argparse._SubParsersAction) -> None:
    """``demo``, and the loop's parts one at a time: ``replay``, ``stream``, ``land``,
    ``broker``."""
    dm = sub.add_parser("demo", help="the whole loop on embedded servers: bootstrap, then "
                        "the test window's first days through Kafka in lockstep one-minute "
                        "windows, the stream and the nightly, scored from the served state; "
                        "report in RECSTREAM_HOME/report")
    dm.add_argument("--dataset", default="ml-100k", metavar="NAME|DIR",
                    type=lambda text: _dataset_ref(text, ("ml-100k", "synthetic")),
                    help="ml-100k, synthetic or a data set directory (default: ml-100k, "
                    "fetched into the cache)")
    dm.add_argument("--days", type=_positive_int, default=None,
                    help="replay this many of the test window's first days (default: as "
                    "many as fit about 5 minutes of replay, at least 3)")

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


def _add_releases(sub: argparse._SubParsersAction) -> None:
    """``publisher`` (status, versions, publish, promote, rollback), ``serve``, ``redis``."""
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
        COMMANDS[args.command](settings, args)
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
