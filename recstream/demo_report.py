"""The demo's report: figures from the prequential arms and the trainer's /metrics, written
as ``demo.json``, ``demo.md`` and two PNG plots.

>>> text = '''# TYPE f histogram
... f_bucket{le="1.0"} 50
... f_bucket{le="2.0"} 100
... f_bucket{le="+Inf"} 100
... f_sum 120
... f_count 100
... '''
>>> h = read_histogram(text, "f")
>>> h.quantile(0.5), h.quantile(0.99), h.count
(1.0, 1.98, 100)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from batch.freshness import VALIDATION_DAYS, plot_curve
from common.data.events import DAY_MS, format_day
from common.evaluation.prequential import PrequentialResult
from common.infra.atomic import write_text_atomic


@dataclass
class Histogram:
    """A scraped Prometheus histogram: cumulative counts per upper bound."""

    bounds: list[float] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def quantile(self, q: float) -> float:
        """Linear interpolation inside the bucket (as PromQL's histogram_quantile)."""
        if not self.count:
            return float("nan")
        rank, lower, below = q * self.count, 0.0, 0.0
        for bound, cum in zip(self.bounds, self.cumulative, strict=True):
            if cum >= rank:
                if math.isinf(bound):
                    return lower
                return round(lower + (bound - lower) * (rank - below) / max(cum - below, 1e-12),
                             3)
            lower, below = bound, cum
        return lower


def read_histogram(text: str, name: str) -> Histogram:
    """The histogram ``name`` (no labels) from a /metrics text; empty if absent."""
    h = Histogram()
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == name + "_bucket":
                h.bounds.append(float(s.labels["le"]))
                h.cumulative.append(float(s.value))
            elif s.name == name + "_sum":
                h.total = float(s.value)
            elif s.name == name + "_count":
                h.count = int(s.value)
    return h


def counter(text: str, name: str) -> int:
    """A counter's value (summed over its labels) from a /metrics text; 0 if absent."""
    return int(sum(s.value for family in text_string_to_metric_families(text)
                   if family.name == name for s in family.samples
                   if s.name == name + "_total"))


def gauge(text: str, name: str) -> float:
    """An unlabelled gauge's value from a /metrics text; NaN if absent."""
    return next((float(s.value) for family in text_string_to_metric_families(text)
                 if family.name == name for s in family.samples if s.name == name),
                float("nan"))


def per_day_rows(results: dict[str, dict[int, PrequentialResult]],
                 ks: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per day: scored positives and each arm's recall at each k."""
    days: dict[int, dict[str, Any]] = {}
    for arm, per_k in results.items():
        for k in ks:
            for stat in per_k[k].per_day():
                row = days.setdefault(stat.key, {"day": format_day(stat.key * DAY_MS),
                                                 "scored": stat.n_events})
                row[f"{arm} recall@{k}"] = round(stat.recall, 4)
    return [days[d] for d in sorted(days)]


def write_report(out_dir: Path, summary: dict[str, Any], days: list[dict[str, Any]],
                 arms: list[str], ks: tuple[int, ...], freshness: Histogram,
                 curve: dict[str, Any] | None = None) -> Path:
    """Write demo.json, demo.md, recall_per_day.png, freshness.png and, with the offline
    ``curve``, recall_vs_delay.png; returns demo.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "demo.json", json.dumps({**summary, "per_day": days},
                                                        indent=2))
    _plot_recall(out_dir / "recall_per_day.png", days, arms, ks)
    _plot_freshness(out_dir / "freshness.png", freshness)
    if curve is not None:  # its title names the data set: say which days of it
        plot_curve({**curve, "dataset": f"{summary['dataset']} {summary['first_day']} to "
                    f"{summary['last_day']}"}, out_dir / "recall_vs_delay.png")
    md = out_dir / "demo.md"
    write_text_atomic(md, markdown(summary, days, arms, ks))
    return md


def markdown(summary: dict[str, Any], days: list[dict[str, Any]], arms: list[str],
             ks: tuple[int, ...]) -> str:
    """The summary, the per-arm table, the per-day table and the plots."""
    cols = [f"recall@{k}" for k in ks]
    lines = [f"# recstream demo: {summary['dataset']}, {summary['days']} replayed days "
             f"({summary['first_day']} to {summary['last_day']})",
             "", summary["setup"], "",
             "| arm | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{summary['recall'][arm][c]:.4f}"
                                                for c in cols) + " |")
    lines += ["", f"Scored positives: {summary['scored_positives']}. "
              f"Nightly runs: {summary['nightly']['released']} released, "
              f"{summary['nightly']['not_released']} not released.",
              f"Freshness (send → delta published, trainer histogram): p50 "
              f"{summary['freshness_p50_s']} s, p99 {summary['freshness_p99_s']} s. "
              f"Trainer throughput while stepping: {summary['trainer_events_per_s']:,.0f} "
              "events/s.", f"Wall time: {summary['wall_s']} s ({_timings(summary)}).", "",
              "![recall per day](recall_per_day.png)", "",
              "![freshness](freshness.png)", "",
              *curve_section(summary.get("offline_curve")), "## Per day", "",
              "| day | scored | " + " | ".join(f"{a} {c}" for a in arms for c in cols) + " |",
              "|---|---:|" + "---:|" * (len(arms) * len(cols))]
    for row in days:
        lines.append(f"| {row['day']} | {row['scored']} | " + " | ".join(
            f"{row.get(f'{a} {c}', float('nan')):.3f}" for a in arms for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _timings(summary: dict[str, Any]) -> str:
    t = summary["timings_s"]
    names = {"bootstrap": "bootstrap", "replay": "lockstep replay", "scoring": "of which "
             "scoring", "nightlies": "of which nightlies", "curve": "offline curve, alongside "
             "the replay", "curve_wait": "waiting for the curve after the replay"}
    return ", ".join(f"{label} {t[key]} s" for key, label in names.items() if key in t)


def curve_section(curve: dict[str, Any] | None) -> list[str]:
    """The offline freshness curve as Markdown: recall@10 / recall@50 per model and delay."""
    if not curve:
        return []
    delays = [str(d) for d in curve["delays_s"]]
    n = next(iter(next(iter(curve["models"].values())).values()))["n_scored"]
    lines = ["## Offline freshness curve (same days, in-process)", "",
             f"The same {curve['test_days']} days replayed without Kafka by "
             "`batch.freshness.freshness_curve` from the same bootstrap: each model's state "
             "is updated after every window of the given delay, then the next window is "
             f"scored ({n:,} scored positives; baselines tuned on the "
             f"{VALIDATION_DAYS} days before). Cells: recall@10 / recall@50.", "",
             "| model | " + " | ".join(_delay(int(d)) for d in delays) + " |",
             "|---|" + "---:|" * len(delays)]
    for model, per in curve["models"].items():
        lines.append(f"| {model} | " + " | ".join(
            f"{per[d]['recall@10']:.4f} / {per[d]['recall@50']:.4f}" for d in delays) + " |")
    return [*lines, "", "![recall against update delay](recall_vs_delay.png)", ""]


def _delay(seconds: int) -> str:
    """``60`` → ``1 min``, ``86400`` → ``1 d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _plot_recall(path: Path, days: list[dict[str, Any]], arms: list[str],
                 ks: tuple[int, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ks), 1, figsize=(10, 3.2 * len(ks)), sharex=True)
    labels = [row["day"][5:] for row in days]
    for ax, k in zip(axes if len(ks) > 1 else [axes], ks, strict=True):
        for arm in arms:
            ax.plot(labels, [row.get(f"{arm} recall@{k}") for row in days], marker="o",
                    markersize=3, label=arm)
        ax.set_ylabel(f"prequential recall@{k}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes_list = axes if len(ks) > 1 else [axes]
    axes_list[-1].tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle("Prequential recall per replayed day")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_freshness(path: Path, h: Histogram) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    finite = [(b, c) for b, c in zip(h.bounds, h.cumulative, strict=True) if not math.isinf(b)]
    counts = [c - (finite[i - 1][1] if i else 0) for i, (_, c) in enumerate(finite)]
    ax.bar([f"≤{b:g}" for b, _ in finite], counts)
    ax.set_xlabel("seconds from send to the delta being published")
    ax.set_ylabel("events")
    ax.set_title(f"Freshness (p50 {h.quantile(0.5)} s, p99 {h.quantile(0.99)} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
