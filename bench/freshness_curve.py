"""Freshness-curve sweep on MovieLens-100K: one configuration per run, appended to a log.

    python bench/freshness_curve.py --set model.history_len=50 --delays 60,86400 \\
        --models nightly,nightly+stream --log bench/results/freshness_sweep.json

Each run records its settings overrides, the command line, every figure of
``batch.freshness.freshness_curve`` and its wall time, so every measured configuration
stays on file next to the figures it gave.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from batch.freshness import CURVE_MODELS, format_curve, freshness_curve  # noqa: E402
from common.data.datasets import load_dataset  # noqa: E402
from common.data.events import DAY_MS  # noqa: E402
from common.infra.atomic import write_text_atomic  # noqa: E402
from common.infra.settings import load_settings  # noqa: E402


def _overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        group, _, name = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(group, {})[name] = tuple(value) if isinstance(value, list) else value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delays", default="60,600,3600,86400")
    p.add_argument("--models", default=",".join(CURVE_MODELS))
    p.add_argument("--test-days", type=int, default=30)
    p.add_argument("--users", default="all", choices=["all", "warm"])
    p.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE")
    p.add_argument("--prior", action="store_true", help="decayed-popularity prior")
    p.add_argument("--holdout-days", type=int, default=0,
                   help="drop the last N days first: with N=30 the curve is measured on the "
                   "30 days before the test window (for choosing configurations without "
                   "looking at the test window)")
    p.add_argument("--note", default="")
    p.add_argument("--log", type=Path, default=Path("bench/results/freshness_sweep.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    overrides = _overrides(args.set)
    s = load_settings().with_overrides(**overrides)
    data = load_dataset("ml-100k", s.data_cache)
    if args.holdout_days:
        end = (int(data.events.ts_ms.max()) // DAY_MS + 1 - args.holdout_days) * DAY_MS
        data = replace(data, events=data.events.between(None, end))
    started = time.perf_counter()
    report = freshness_curve(s, data, args.test_days, [int(d) for d in args.delays.split(",")],
                             args.models.split(","), args.users, prior=args.prior)
    print(format_curve(report))
    entry = {"command": "python bench/freshness_curve.py " + " ".join(argv or sys.argv[1:]),
             "overrides": overrides, "note": args.note,
             "wall_s": round(time.perf_counter() - started, 1), "report": report}
    log = json.loads(args.log.read_text()) if args.log.exists() else []
    log.append(entry)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.log, json.dumps(log, indent=1, default=list))


if __name__ == "__main__":
    main()
