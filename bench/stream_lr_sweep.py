"""The stream's ID-row learning rate on MovieLens-100K: prequential recall of embedding-only
updates over the last 30 days, against the frozen bootstrap model.

    python bench/stream_lr_sweep.py --lrs 0.2,0.05,0.02,0.01 --batch 512 \\
        --json bench/results/stream_lr_sweep.json

Bootstrap as the demo does (everything before the last 30 days), then replay the 30 days
in the demo's chunks (6 h of event time or 300 events): each chunk is scored by every arm,
then each learning arm takes embedding-only steps on it (no nightlies, no Kafka: the
stream's learning alone). Items a user had seen are excluded.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batch.evaluation import default_train_before  # noqa: E402
from batch.trainer import bootstrap  # noqa: E402
from common.data.events import Events, parse_day  # noqa: E402
from common.data.movielens import load_dataset  # noqa: E402
from common.evaluation.prequential import prequential_arms  # noqa: E402
from common.evaluation.two_tower import TwoTowerScorer  # noqa: E402
from common.infra.atomic import write_text_atomic  # noqa: E402
from common.infra.settings import load_settings  # noqa: E402
from common.model.bundle import Features  # noqa: E402
from common.model.training import Trainer  # noqa: E402
from recstream.demo import CHUNK_EVENTS, CHUNK_MS, TEST_DAYS  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs", default="0.2,0.05,0.02,0.01", help="comma-separated lrs")
    p.add_argument("--batch", type=int, default=512, help="examples per step")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    s = load_settings()
    data = load_dataset("ml-100k", s.data_cache)
    split = parse_day(default_train_before(data.events, TEST_DAYS))
    history, test = data.events.between(None, split), data.events.between(split)
    started = time.perf_counter()
    base, _ = bootstrap(s.model, s.train, data, history)
    catalog = data.catalog()

    def scorer(lr: float | None) -> TwoTowerScorer:
        bundle = copy.deepcopy(base)
        features = Features.build(bundle, data.users, data.items)
        if lr is None:
            return TwoTowerScorer(bundle, features, catalog)
        ts = s.train.model_copy(update={"batch_size": args.batch, "lr_embedding": lr})
        return TwoTowerScorer(bundle, features, catalog, Trainer(bundle, features, ts,
                                                                 mode="embedding"),
                              ts.rating_threshold)

    arms = {"frozen": scorer(None)}
    arms |= {f"lr={lr}": scorer(float(lr)) for lr in args.lrs.split(",")}

    def learn(chunk: Events) -> None:
        for name, arm in arms.items():
            if name != "frozen":
                arm.learn(chunk)

    results = prequential_arms(arms, learn, catalog, test, (10, 50), chunk_events=CHUNK_EVENTS,
                               chunk_ms=CHUNK_MS, rating_threshold=s.train.rating_threshold,
                               seen=history)
    out = {"batch": args.batch, "seconds": round(time.perf_counter() - started, 1),
           "recall": {name: {f"recall@{k}": round(r[k].recall, 4) for k in (10, 50)}
                      for name, r in results.items()}}
    for name, figures in out["recall"].items():
        print(f"{name:10} recall@10 {figures['recall@10']:.4f}  recall@50 "
              f"{figures['recall@50']:.4f}")
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
