"""``recstream demo``: the main job end to end on embedded defaults.

Until the stream and publisher land this is the batch half of the loop: fetch
MovieLens-100K, bootstrap a champion on everything before the last 30 days, run
one nightly update, and print the offline evaluation table against the baselines.
"""

from __future__ import annotations

import json

from batch.evaluation import DEFAULT_MODELS, default_train_before, format_table, run_offline_eval
from batch.jobs import bootstrap_job, nightly_job
from common.atomic import write_text_atomic
from common.events import parse_day
from common.movielens import load_dataset
from common.settings import Settings

TEST_DAYS = 30


def run_demo(settings: Settings) -> None:
    """Fetch, bootstrap, nightly, evaluate; writes ``RECSTREAM_HOME/report/eval.json``."""
    print(f"[1/4] loading MovieLens-100K (cache: {settings.data_cache})", flush=True)
    dataset = load_dataset("ml-100k", settings.data_cache)
    split = default_train_before(dataset.events, TEST_DAYS)
    split_ms = parse_day(split)
    print(f"[2/4] bootstrapping on {len(dataset.events.between(None, split_ms))} events "
          f"before {split}", flush=True)
    boot = bootstrap_job(settings, dataset, None, split_ms, promote=True)
    print(f"      registered {boot.version} as champion "
          f"({boot.examples_per_s:,.0f} examples/s)", flush=True)
    night = nightly_job(settings, dataset, split_ms, promote=False)
    print(f"[3/4] nightly update on {split}: registered {night.version} "
          f"(parent {boot.version}, {night.examples} examples)", flush=True)
    print(f"[4/4] evaluating {', '.join(DEFAULT_MODELS)} on the last {TEST_DAYS} days",
          flush=True)
    report = run_offline_eval(settings, dataset, split, TEST_DAYS, "all", DEFAULT_MODELS)
    out = settings.home / "report" / "eval.json"
    write_text_atomic(out, json.dumps(report, indent=2))
    print(format_table(report))
    print(f"models in {settings.models_dir}, report in {out}")
