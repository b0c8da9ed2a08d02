"""The stream's ID-row learning rate on MovieLens-100K: prequential recall of embedding-only
updates over the last 30 days, against the frozen bootstrap model.

    python bench/stream_lr_sweep.py --lrs 0.2,0.05,0.02,0.01 --batch 512 \\
        --json bench/results/stream_lr_sweep.json

Bootstrap as the demo does (everything before the last 30 days), then replay the 30 days
in chunks of 6 h of event time or 300 events (the demo's, before its 60 s windows): each
chunk is scored by every arm, then each learning arm takes embedding-only steps on it (no
nightlies, no Kafka: the stream's learning alone). Items a user had seen are excluded.
"""

from __future__ import annotations

import copy

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness

from batch.evaluation import default_train_before
from batch.trainer import bootstrap
from common.data.datasets import load_dataset
from common.data.events import Events, parse_day
from common.evaluation.prequential import prequential_arms
from common.evaluation.two_tower import TwoTowerScorer
from common.infra.settings import load_settings
from common.model.bundle import Features
from common.model.training import Trainer

TEST_DAYS = 30
CHUNK_MS = 6 * 3_600_000  # the chunks the demo replayed in when this sweep was made
CHUNK_EVENTS = 300


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--lrs", default="0.2,0.05,0.02,0.01", help="comma-separated lrs")
    p.add_argument("--batch", type=int, default=512, help="examples per step")
    args = harness.parse(p, argv, seed=False)  # the seed is RECSTREAM_TRAIN_SEED's
    s = load_settings()
    data = load_dataset("ml-100k", s.data_cache)
    split = parse_day(default_train_before(data.events, TEST_DAYS))
    history, test = data.events.between(None, split), data.events.between(split)
    started = harness.Timer()  # the whole sweep, bootstrap included
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
    out = {"batch": args.batch, "seconds": round(started.elapsed, 1),
           "recall": {name: {f"recall@{k}": round(r[k].recall, 4) for k in (10, 50)}
                      for name, r in results.items()}}
    for name, figures in out["recall"].items():
        print(f"{name:10} recall@10 {figures['recall@10']:.4f}  recall@50 "
              f"{figures['recall@50']:.4f}")
    harness.write_json(args.json, out)


if __name__ == "__main__":
    main()
