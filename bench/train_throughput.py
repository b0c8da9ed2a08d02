"""Training throughput: examples/s of ``Trainer.step`` (full and embedding-only) against a
plain PyTorch two-tower step measured in the same run, so the speed-up is a ratio taken on
one machine.

    python bench/train_throughput.py --users 1000000 --items 1000000 \\
        --json bench/results/train_throughput.json

Data: synthetic power-law positives over N users × N items (every user and item clicked at
least once, so with ``min_count=1`` both ID tables have N rows), one categorical side field
per tower and one multi-valued field (tags) on items. Examples are encoded once; each timed
step takes its batch from them as the training loop does.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
from collections.abc import Callable

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.events import Events
from common.data.tables import FeatureTable, FieldSpec
from common.infra.settings import Settings
from common.model.bundle import Examples, Features, ModelBundle, encode_examples
from common.model.training import Trainer

USER_FIELDS = (FieldSpec("segment", "categorical"),)
ITEM_FIELDS = (FieldSpec("category", "categorical"), FieldSpec("tags", "multi", max_len=4))
N_SEGMENTS, N_CATEGORIES, N_TAGS = 20, 50, 200


def power_law(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """``size`` draws from ranks 0..n-1 with probability ∝ (rank + 1)^-exponent."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)


def synthetic_positives(n_users: int, n_items: int, n_events: int, seed: int) -> Events:
    """Clicks where every user and item appears at least once and the rest is power-law."""
    rng = np.random.default_rng(seed)
    n_events = max(n_events, n_users, n_items)
    users = np.concatenate([rng.permutation(n_users),
                            power_law(rng, n_users, n_events - n_users, 0.8)])
    items = np.concatenate([rng.permutation(n_items),
                            power_law(rng, n_items, n_events - n_items, 1.0)])
    order = rng.permutation(n_events)
    return Events.from_columns(
        event_id=np.char.add("e", np.arange(n_events).astype(str)).astype(object),
        user_id=np.char.add("u", users[order].astype(str)).astype(object),
        item_id=np.char.add("i", items[order].astype(str)).astype(object),
        ts_ms=np.arange(n_events, dtype=np.int64) * 1000)


def feature_tables(n_users: int, n_items: int, seed: int) -> tuple[FeatureTable, FeatureTable]:
    rng = np.random.default_rng(seed + 1)
    seg = np.char.add("s", rng.integers(N_SEGMENTS, size=n_users).astype(str)).astype(object)
    cat = np.char.add("c", rng.integers(N_CATEGORIES, size=n_items).astype(str)).astype(object)
    tag_names = [f"t{k}" for k in range(N_TAGS)]
    tags = rng.integers(N_TAGS, size=(n_items, 3))
    n_tags = rng.integers(1, 4, size=n_items)
    users = FeatureTable.build(np.char.add("u", np.arange(n_users).astype(str)), USER_FIELDS,
                               {"segment": seg})
    items = FeatureTable.build(
        np.char.add("i", np.arange(n_items).astype(str)), ITEM_FIELDS,
        {"category": cat,
         "tags": [tuple(tag_names[t] for t in row[:k]) for row, k in zip(tags, n_tags,
                                                                          strict=True)]})
    return users, items


def setup(args: argparse.Namespace) -> tuple[Settings, ModelBundle, Features, Examples]:
    model: dict[str, object] = {"min_count": 1, "embedding_dim": args.dim}
    if args.history_len is not None:
        model["history_len"] = args.history_len
    settings = Settings().with_overrides(
        model=model,
        train={"batch_size": args.batch, "seed": args.seed})
    users, items = feature_tables(args.users, args.items, args.seed)
    positives = synthetic_positives(args.users, args.items,
                                    int(args.events_per_id * max(args.users, args.items)),
                                    args.seed)
    bundle = ModelBundle.create(settings.model, users, items, seed=args.seed)
    bundle.observe(positives)
    features = Features.build(bundle, users, items)
    return settings, bundle, features, encode_examples(bundle, features, positives)


class NaiveTower(nn.Module):
    """A plain tower: nn.Embedding ID table (sparse grads), side features, MLP, unit vector."""

    def __init__(self, rows: int, dim: int, feature_dim: int, cat_rows: int, bag_rows: int,
                 hidden: tuple[int, ...], out: int) -> None:
        super().__init__()
        self.ids = nn.Embedding(rows, dim, sparse=True)
        nn.init.normal_(self.ids.weight, std=0.05)
        self.cat = nn.Embedding(cat_rows, feature_dim)
        self.bag = nn.EmbeddingBag(bag_rows, feature_dim, mode="mean", padding_idx=0) \
            if bag_rows else None
        width = dim + feature_dim * (2 if bag_rows else 1)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, rows: torch.Tensor, cat: torch.Tensor,
                multi: torch.Tensor | None) -> torch.Tensor:
        fields = [self.ids(rows), self.cat(cat[:, 0])]
        if self.bag is not None and multi is not None:
            fields.append(self.bag(multi))
        return F.normalize(self.mlp(torch.cat(fields, dim=1)), dim=1)


class NaiveStep:
    """The straightforward step: SparseAdam on the ID tables, Adam on the rest, plain
    in-batch softmax (no logQ, no duplicate masking)."""

    def __init__(self, bundle: ModelBundle, features: Features, settings: Settings,
                 embedding_only: bool) -> None:
        ms, cfg = settings.model, bundle.model.cfg
        self.features, self.temperature = features, ms.temperature
        self.user = NaiveTower(bundle.model.user.ids.num_rows, ms.embedding_dim, ms.feature_dim,
                               cfg.user_cat[0], 0, ms.hidden_dims, ms.output_dim)
        self.item = NaiveTower(bundle.model.item.ids.num_rows, ms.embedding_dim, ms.feature_dim,
                               cfg.item_cat[0], cfg.item_multi[0], ms.hidden_dims,
                               ms.output_dim)
        tables = [self.user.ids.weight, self.item.ids.weight]
        dense = [p for t in (self.user, self.item) for n, p in t.named_parameters()
                 if not n.startswith("ids.")]
        for p in dense:
            p.requires_grad_(not embedding_only)
        self.opts: list[torch.optim.Optimizer] = [
            torch.optim.SparseAdam(tables, lr=settings.train.lr_embedding)]
        if not embedding_only:
            self.opts.append(torch.optim.Adam(dense, lr=settings.train.lr_dense))

    def step(self, ex: Examples) -> float:
        u_cat, _ = self.features.users.gather(torch.from_numpy(ex.user_feat))
        i_cat, i_multi = self.features.items.gather(torch.from_numpy(ex.item_feat))
        u = self.user(torch.from_numpy(ex.user_rows), u_cat, None)
        v = self.item(torch.from_numpy(ex.item_rows), i_cat, i_multi[0])
        logits = u @ v.T / self.temperature
        loss = F.cross_entropy(logits, torch.arange(len(ex)))
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.opts:
            opt.step()
        return float(loss.detach())


def measure(step: Callable[[Examples], object], examples: Examples, args: argparse.Namespace,
            rng: np.random.Generator) -> list[float]:
    """Examples/s of each repeat of ``args.steps`` batches, after ``args.warmup`` batches."""
    def run(n_steps: int) -> float:
        order = rng.permutation(len(examples))[: n_steps * args.batch]
        with harness.Timer() as timer:
            for lo in range(0, len(order), args.batch):
                step(examples.take(order[lo: lo + args.batch]))
        return len(order) / timer.s

    run(args.warmup)
    return [run(args.steps) for _ in range(args.repeats)]


def profile(step: Callable[[Examples], object], examples: Examples, args: argparse.Namespace,
            rng: np.random.Generator, label: str) -> None:
    """cProfile of ``args.steps`` steps (tottime, the top 25 functions), printed."""
    order = rng.permutation(len(examples))[: args.steps * args.batch]
    prof = cProfile.Profile()
    prof.enable()
    for lo in range(0, len(order), args.batch):
        step(examples.take(order[lo: lo + args.batch]))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(f"--- profile: {label} ---\n{out.getvalue()}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.parser(__doc__)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="timed batches per repeat")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--history-len", type=int, default=None,
                   help="positives the user tower reads (default: the settings' default, 50; "
                   "0: ID row and side features only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--events-per-id", type=float, default=2.0,
                   help="positives generated per user/item id (at least one each)")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile of each measured step")
    return harness.parse(p, argv)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with harness.Timer() as setup_time:
        settings, bundle, features, examples = setup(args)
    rng = np.random.default_rng(args.seed)
    # Built one at a time, just before use: a Trainer sets requires_grad for its mode on
    # the shared model, and each naive step allocates its own tables and optimiser state.
    makers: dict[str, Callable[[], Callable[[Examples], object]]] = {
        "full": lambda: Trainer(bundle, features, settings.train, mode="full").step,
        "embedding_only": lambda: Trainer(bundle, features, settings.train,
                                          mode="embedding").step,
        "naive_full": lambda: NaiveStep(bundle, features, settings, False).step,
        "naive_embedding_only": lambda: NaiveStep(bundle, features, settings, True).step,
    }
    runs: dict[str, list[float]] = {}
    for name, make in makers.items():
        step = make()
        runs[name] = measure(step, examples, args, rng)
        if args.profile:
            profile(step, examples, args, rng, name)
        del step
    result = report(args, runs, len(examples), setup_time.s)
    harness.write_json(args.json, result)
    return result


def report(args: argparse.Namespace, runs: dict[str, list[float]], n_examples: int,
           setup_s: float) -> dict[str, object]:
    """Print the table and return the JSON document."""
    med = {name: statistics.median(v) for name, v in runs.items()}
    result: dict[str, object] = {f"{name}_examples_per_s": round(m) for name, m in med.items()}
    result["speedup_full"] = round(med["full"] / med["naive_full"], 2)
    result["speedup_embedding_only"] = round(
        med["embedding_only"] / med["naive_embedding_only"], 2)
    result["repeats_examples_per_s"] = {n: [round(x) for x in v] for n, v in runs.items()}
    result["config"] = harness.config_of(args)
    result["examples"] = n_examples
    result["setup_s"] = round(setup_s, 1)
    result["torch"] = torch.__version__
    result["numpy"] = np.__version__
    result["python"] = platform.python_version()
    result["cpu_count"] = os.cpu_count()
    result["torch_threads"] = torch.get_num_threads()
    result["machine"] = harness.processor()
    print(f"train throughput: {args.users:,} users × {args.items:,} items, dim {args.dim}, "
          f"batch {args.batch}, {args.steps} steps × {args.repeats} repeats, "
          f"{torch.get_num_threads()} torch threads ({os.cpu_count()} cpus), "
          f"torch {torch.__version__}")
    print(f"{'step':<22}{'median ex/s':>14}{'min':>12}{'max':>12}")
    for name, v in runs.items():
        print(f"{name:<22}{med[name]:>14,.0f}{min(v):>12,.0f}{max(v):>12,.0f}")
    print(f"speed-up vs naive: full ×{result['speedup_full']}, "
          f"embedding-only ×{result['speedup_embedding_only']}")
    return result


if __name__ == "__main__":
    main()
