"""What the benchmarks share: their common flags, strict JSON results, the machine they ran
on, timing and per-process CPU and memory readings, and the servers they run against
(the configured broker and Redis, else embedded ones).

Every bench script imports this module before the project's own: it puts the repository
root on ``sys.path``, so ``python bench/x.py`` runs from a checkout without an install.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.infra.atomic import write_text_atomic  # noqa: E402
from common.infra.broker import EmbeddedBroker, tansu_binary  # noqa: E402
from common.infra.redis_server import EmbeddedRedis, redis_binary  # noqa: E402
from common.infra.settings import Settings  # noqa: E402

# -- command line and results -------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first paragraph of its module docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def parse(p: argparse.ArgumentParser, argv: list[str] | None,
          seed: bool = True) -> argparse.Namespace:
    """``argv`` parsed after adding the flags every benchmark has: ``--seed`` (unless
    ``seed`` is False) and ``--json PATH``."""
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every figure and the config here")
    return p.parse_args(argv)


def strict(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None: JSON has neither, and a
    reader's parser may refuse Python's ``NaN``.

    >>> strict({"p50": float("nan"), "runs": [1.5, float("inf")], "n": 3})
    {'p50': None, 'runs': [1.5, None], 'n': 3}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    """The result as strict JSON (NaN: null), written atomically; nothing without a path."""
    if path is not None:
        write_text_atomic(path, json.dumps(strict(result), indent=2, allow_nan=False) + "\n")


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as JSON values (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def loadavg() -> float:
    """The 1-minute load average: how busy the machine was beside the benchmark."""
    return round(os.getloadavg()[0], 2)


def processor() -> str:
    return platform.processor() or platform.machine()


def machine(load_start: float | None = None, **versions: str) -> dict[str, Any]:
    """The machine a result was measured on; with ``load_start``, the load average then
    and now; ``versions`` of the libraries that matter to the figures."""
    load = {} if load_start is None else {"loadavg_1m_start": load_start,
                                          "loadavg_1m_end": loadavg()}
    return {"cpu_count": os.cpu_count(), **load, "processor": processor(),
            "platform": platform.platform(), "python": platform.python_version(), **versions}


def print_rows(rows: list[tuple[str, str]], width: int) -> None:
    """A report's table: each figure's name padded to ``width``, then its value."""
    for name, value in rows:
        print(f"  {name:<{width}}{value}")


def now() -> str:
    """The result's date: UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# -- timing -------------------------------------------------------------------------------


class Timer:
    """Wall-clock seconds (``perf_counter``): ``elapsed`` since it was made or entered, and
    ``s``, the whole ``with`` block's, after it."""

    def __init__(self) -> None:
        self.s, self._start = 0.0, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = self.elapsed


def percentile(values: Any, q: float, digits: int = 3) -> float:
    """The ``q``-th percentile of ``values``, rounded for a report."""
    return round(float(np.percentile(values, q)), digits)


# -- processes: CPU and memory (Linux /proc; empty elsewhere) ------------------------------


def processes() -> dict[int, tuple[str, int, float]]:
    """Every process's command, parent pid and CPU seconds so far (user + system)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[int, tuple[str, int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        # The command sits in parentheses and may hold spaces or ")": split at the last.
        fields = text[text.rindex(")") + 2:].split()
        out[int(stat.parent.name)] = (text[text.index("(") + 1:text.rindex(")")],
                                      int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_under(root: int, name_of: Callable[[int, str], str]) -> dict[str, float]:
    """CPU seconds of ``root`` and of each process under it, summed by
    ``name_of(pid, command)``: where a machine's time goes, process by process."""
    procs = processes()
    out: dict[str, float] = {}
    for pid, (comm, _, cpu) in procs.items():
        ancestor, depth = pid, 0
        while ancestor in procs and ancestor != root and depth < 16:
            ancestor, depth = procs[ancestor][1], depth + 1
        if ancestor == root:
            name = name_of(pid, comm)
            out[name] = out.get(name, 0.0) + cpu
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (a daemon may work in child processes of its own)."""
    children: dict[int, list[int]] = {}
    for pid, (_, parent, _) in processes().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Every ``every_s``: the seconds since start and the RSS in MiB of each process with
    its descendants (summed; how many processes is kept too)."""

    def __init__(self, pids: dict[str, int], every_s: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.every_s = pids, every_s
        self.samples: dict[str, list[tuple[float, float]]] = {n: [] for n in pids}
        self.processes: dict[str, int] = {n: 0 for n in pids}
        self.stop_flag = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while True:
            t = round(time.monotonic() - self.t0, 2)
            for name, pid in self.pids.items():
                sizes = [m for p in process_tree(pid) if (m := rss_mib(p)) is not None]
                if sizes:
                    self.samples[name].append((t, round(sum(sizes), 1)))
                    self.processes[name] = max(self.processes[name], len(sizes))
            if self.stop_flag.wait(self.every_s):
                return


# -- the servers: configured, else embedded --------------------------------------------------


@contextmanager
def temp_home(prefix: str = "recstream-bench-") -> Iterator[Path]:
    """A fresh RECSTREAM_HOME for one run, removed after it."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Servers:
    """The broker and Redis a benchmark runs against, described for its report (no
    credentials); ``pids`` of the embedded ones it started, by name."""

    bootstrap: str = ""
    redis_url: str = ""
    broker: str = "none"
    redis: str = "none"
    pids: dict[str, int] = field(default_factory=dict)


@contextmanager
def servers(base: Settings, home: Path, kafka: bool = True,
            redis: bool = True) -> Iterator[Servers]:
    """``RECSTREAM_KAFKA_BOOTSTRAP`` and ``RECSTREAM_REDIS_URL`` where set, else an
    embedded broker and Redis (memory only, logs in ``home/logs``) started here and
    stopped, by pid, when the block ends. ``kafka``/``redis`` False: not wanted."""
    found = Servers()
    with contextlib.ExitStack() as stack:
        if kafka:
            found.bootstrap, found.broker = _server(
                stack, found.pids, "broker", base.kafka.bootstrap, "RECSTREAM_KAFKA_BOOTSTRAP",
                lambda: EmbeddedBroker.start(log_path=_log(home, "broker")),
                lambda: f"embedded {Path(tansu_binary()).name}, memory storage")
        if redis:
            found.redis_url, found.redis = _server(
                stack, found.pids, "redis", base.redis.url, "RECSTREAM_REDIS_URL",
                lambda: EmbeddedRedis.start(log_path=_log(home, "redis")),
                lambda: f"embedded {Path(redis_binary()).name}, no persistence")
        yield found


def _server(stack: contextlib.ExitStack, pids: dict[str, int], name: str, configured: str,
            setting: str, start: Callable[[], EmbeddedBroker | EmbeddedRedis],
            embedded: Callable[[], str]) -> tuple[str, str]:
    """The configured address (described by its setting), else an embedded server's,
    started and stopped with ``stack``; with a description for the report."""
    if configured:
        return configured, f"{setting}={_without_credentials(configured)}"
    server = stack.enter_context(start())
    pids[name] = server.pid
    address = server.bootstrap if isinstance(server, EmbeddedBroker) else server.url
    return address, embedded()


def _log(home: Path, name: str) -> Path:
    (home / "logs").mkdir(parents=True, exist_ok=True)
    return home / "logs" / f"{name}.log"


def _without_credentials(url: str) -> str:
    """``url`` without a user or password (a report is shared; a secret is not).

    >>> _without_credentials("redis://bench:s3cret@cache:6379/0")
    'redis://cache:6379/0'
    """
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()
