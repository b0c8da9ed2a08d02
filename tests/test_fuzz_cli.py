"""Fuzzing the command line: any argument list either parses, prints help (status 0)
or is refused with one line on stderr (status 2), and ``main`` turns what fails before
any work starts into status 1 or 2 with one line, never a traceback.

Only the parser and commands that fail before starting a server or training are run.
Case counts come from the Hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from recstream.cli import EXIT_FAILED, EXIT_USAGE, build_parser, main

PARSER = build_parser()
# main() builds its parser on every call: a quarter of the profile's cases.
FEWER = settings(max_examples=max(settings.default.max_examples // 4, 25))
COMMANDS = ["data", "fetch", "train", "nightly", "schedule", "eval", "demo", "replay",
            "stream", "land", "broker", "publisher", "status", "versions", "publish",
            "promote", "rollback", "serve", "redis", "start", "stop"]
OPTIONS = ["--bootstrap", "--nightly", "--dataset", "--path", "--from", "--to", "--day",
           "--epochs", "--promote", "--publish", "--force", "--source", "--no-guard",
           "--run-now", "--train-before", "--test-days", "--users", "--models", "--json",
           "--days", "--speed", "--topic", "--max-steps", "--help", "-h", "--", "-", "--d",
           "--pub", "--to=", "--day=2024-01-01"]
VALUES = ["ml-100k", "synthetic", "ml-1m", "landed", "dataset", "all", "warm", "max",
          "2024-01-01", "2024-13-01", "0001-01-01", "9999-12-31", "0", "1", "-1", "1e999",
          "nan", "inf", "v000001", "v1", "champion", "previous", "", " "]
tokens = st.sampled_from(COMMANDS) | st.sampled_from(OPTIONS) | st.sampled_from(VALUES) \
    | st.text(max_size=12)
# Real argv entries cannot hold NUL bytes (execve ends a string there).
argv_lists = st.lists(tokens.filter(lambda t: "\x00" not in t), max_size=8)


def _captured(run: object) -> tuple[int, str, str]:
    """Run ``run()`` with stdout and stderr captured; its exit status and both streams.
    The root logger is put back as it was (``main`` points it at the captured stderr)."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = run()  # type: ignore[operator]
        except SystemExit as exc:
            code = exc.code
        finally:
            root.handlers[:], root.level = handlers, level
    return code if isinstance(code, int) else 0, out.getvalue(), err.getvalue()


def _one_error_line(err: str) -> None:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("recstream") and "error" in lines[0], err


def _parse(argv: list[str]) -> tuple[argparse.Namespace | None, int, str, str]:
    parsed: list[argparse.Namespace] = []
    code, out, err = _captured(lambda: parsed.append(PARSER.parse_args(argv)))
    if parsed:
        assert code == 0 and not err
        return parsed[0], code, out, err
    assert code in (0, EXIT_USAGE), code
    if code == 0:
        assert "usage: recstream" in out and not err
    else:
        _one_error_line(err)
    return None, code, out, err


@given(argv_lists)
def test_any_arguments_parse_print_help_or_fail_with_one_line(argv: list[str]) -> None:
    _parse(argv)


@given(st.sampled_from(COMMANDS[:12] + ["publisher status", "publisher promote",
                                        "publisher rollback", "data fetch"]), argv_lists)
def test_arguments_after_a_command_parse_or_fail_with_one_line(command: str,
                                                              argv: list[str]) -> None:
    _parse(command.split() + argv)


@given(st.sampled_from(["--day", "--from", "--to", "--train-before"]), st.text(max_size=20))
def test_a_day_is_yyyy_mm_dd_or_a_usage_error(option: str, day: str) -> None:
    assume("\x00" not in day and not day.startswith("-"))
    command = ["nightly"] if option == "--day" else ["eval"] if option == "--train-before" \
        else ["replay"]
    args, code, _, err = _parse([*command, option, day])
    assert args is not None or ("invalid day" in err and code == EXIT_USAGE)


@given(st.sampled_from([("eval", "--test-days"), ("demo", "--days"), ("stream", "--max-steps"),
                        ("train", "--epochs")]), st.integers(-10**6, 10**6).map(str)
       | st.text(max_size=10))
def test_counts_are_positive_integers_or_a_usage_error(where: tuple[str, str],
                                                       text: str) -> None:
    assume("\x00" not in text and not text.startswith("-") or text.lstrip("-").isdigit())
    command, option = where
    extra = ["--bootstrap"] if command == "train" else []
    args, code, _, err = _parse([command, *extra, f"{option}={text}"])
    if args is not None:
        assert getattr(args, option.lstrip("-").replace("-", "_")) >= 1
    else:
        assert code == EXIT_USAGE and "expected a positive integer" in err


# -- main: what fails before any work starts ------------------------------------------


@contextmanager
def _environment(**variables: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in variables.items():
            mp.setenv(name, value)
        yield


@FEWER
@given(argv_lists)
def test_main_exits_0_1_or_2_with_one_line_and_no_traceback(argv: list[str]) -> None:
    # An invalid setting: every command that parses stops at start-up with status 1.
    with _environment(RECSTREAM_LOG_LEVEL="LOUD"):
        code, out, err = _captured(lambda: main(argv))
    assert code in (0, EXIT_FAILED, EXIT_USAGE)
    if code == 0:
        assert "usage: recstream" in out
    else:
        _one_error_line(err)
    if code == EXIT_FAILED:
        assert "RECSTREAM_LOG_LEVEL='LOUD'" in err


# Broker and Redis configured (never contacted): the embedded launchers' commands refuse.
SERVERS = {"RECSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9", "RECSTREAM_REDIS_URL":
           "redis://127.0.0.1:9/0"}


@pytest.mark.parametrize("command", ["broker", "redis"])
@pytest.mark.parametrize("action", ["start", "stop", "status"])
def test_embedded_server_commands_with_configured_servers_are_usage_errors(
        command: str, action: str) -> None:
    with _environment(**SERVERS):
        code, _, err = _captured(lambda: main([command, action]))
    assert code == EXIT_USAGE and "is set: the embedded" in err
    _one_error_line(err)


@FEWER
@given(st.dates(), st.integers(0, 10_000))
def test_replay_to_before_from_is_a_usage_error(start: dt.date, back_days: int) -> None:
    end = start - dt.timedelta(days=min(back_days, (start - dt.date.min).days))
    with _environment(**SERVERS):
        code, _, err = _captured(lambda: main(["replay", "--from", str(start),
                                               "--to", str(end)]))
    assert code == EXIT_USAGE and "--to must be after --from" in err
    _one_error_line(err)


def test_an_argument_with_a_line_break_is_refused_in_one_line() -> None:
    code, _, err = _captured(lambda: PARSER.parse_args(["nightly", "x\ny"]))
    assert code == EXIT_USAGE
    _one_error_line(err)
