"""``recstream data describe``: the figures that tell whether a data set looks like what
its owner thinks it is (sizes, time span, positives, how concentrated on few items they
are, activity per day), computed from the loaded ``Dataset``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from common.data.dataset import Dataset
from common.data.events import format_day


def describe(dataset: Dataset, rating_threshold: float) -> dict[str, Any]:
    """Figures of ``dataset`` (JSON-ready); positives as ``Events.positive_mask`` has them."""
    ev = dataset.events
    n = len(ev)
    positive = ev.positive_mask(rating_threshold)
    counts = Counter(ev.item_id[positive].tolist())
    top = sorted(counts.values(), reverse=True)
    n_items_seen = len(set(ev.item_id.tolist()))
    k = max(1, int(np.ceil(n_items_seen * 0.01)))
    days, per_day = np.unique(ev.day_index(), return_counts=True) if n else ([], np.zeros(0))
    span = int(days[-1] - days[0] + 1) if n else 0
    return {
        "name": dataset.name,
        "events": n,
        "users": len(set(ev.user_id.tolist())),
        "items": n_items_seen,
        "user_feature_rows": len(dataset.users),
        "item_feature_rows": len(dataset.items),
        "user_fields": [f"{f.name}:{f.kind}" for f in dataset.users.fields],
        "item_fields": [f"{f.name}:{f.kind}" for f in dataset.items.fields],
        "first_day": format_day(int(ev.ts_ms.min())) if n else None,
        "last_day": format_day(int(ev.ts_ms.max())) if n else None,
        "days": span,
        "days_with_events": len(days),
        "positives": int(positive.sum()),
        "positive_share": float(positive.mean()) if n else 0.0,
        "event_types": dict(Counter(ev.event_type.tolist()).most_common()),
        "top_1pct_items": k,
        "top_1pct_items_positive_share": (sum(top[:k]) / sum(top)) if top else 0.0,
        "events_per_day": {
            "mean": float(n / span) if span else 0.0,
            "median": float(np.median(per_day)) if n else 0.0,
            "min": int(per_day.min()) if n else 0,
            "max": int(per_day.max()) if n else 0,
        },
    }
