"""Stream steps that stay sane on small windows: a replay buffer of recent positives.

A 60 s window may hold three positives of one user. An in-batch softmax over three
candidates teaches little and moves those rows hard; so each step's new examples are
topped up to ``min_batch`` with positives drawn from the recent past (and the trainer
adds random catalogue negatives), and every new example joins the buffer.

>>> buf = ReplayBuffer(capacity=3, seed=0)
>>> ex = _toy(5)
>>> buf.add(ex)
>>> len(buf), buf.examples.user_rows.tolist()  # the newest three are kept
(3, [2, 3, 4])
>>> len(buf.top_up(_toy(1), min_batch=3))
3
"""

from __future__ import annotations

import numpy as np

from common.model.bundle import Examples
from common.model.history import HistoryBatch

_FIELDS = ("user_rows", "user_feat", "item_rows", "item_feat", "item_keys", "ts_ms")


class ReplayBuffer:
    """The last ``capacity`` positive examples (encoded, with their histories)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}")
        self.capacity = capacity
        self.examples: Examples | None = None
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return 0 if self.examples is None else len(self.examples)

    def add(self, new: Examples) -> None:
        if self.capacity == 0 or len(new) == 0:
            return
        both = new if self.examples is None else concat_examples([self.examples, new])
        self.examples = both.take(np.arange(max(0, len(both) - self.capacity), len(both)))

    def reseed(self, seed: int) -> None:
        """Draw from ``seed`` on (the stream reseeds per step, for replays after a crash)."""
        self.rng = np.random.default_rng(seed % 2**63)

    def state(self) -> dict[str, np.ndarray]:
        """The buffer as arrays (a checkpoint's), empty when it is."""
        ex = self.examples
        if ex is None:
            return {}
        out = {f: getattr(ex, f) for f in _FIELDS}
        if ex.history is not None:
            out |= {f"history_{f}": getattr(ex.history, f) for f in ("rows", "age_h", "mask")}
        return out

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Back to a ``state()``; ignored by a buffer of capacity 0."""
        if not state or self.capacity == 0:
            self.examples = None
            return
        history = None
        if "history_rows" in state:
            history = HistoryBatch(state["history_rows"], state["history_age_h"],
                                   state["history_mask"])
        ex = Examples(**{f: state[f] for f in _FIELDS}, history=history)
        self.examples = ex.take(np.arange(max(0, len(ex) - self.capacity), len(ex)))

    def top_up(self, new: Examples, min_batch: int) -> Examples:
        """``new`` plus enough replayed examples (drawn without replacement) to make
        ``min_batch``, or as many as the buffer holds."""
        missing = min(min_batch - len(new), len(self))
        if missing <= 0 or self.examples is None:
            return new
        idx = self.rng.choice(len(self.examples), size=missing, replace=False)
        return concat_examples([new, self.examples.take(np.sort(idx))])


def concat_examples(parts: list[Examples]) -> Examples:
    """Examples stacked in order (histories must all be present or all absent)."""
    hists = [p.history for p in parts]
    history = None
    if all(h is not None for h in hists):
        history = HistoryBatch(*(np.concatenate([getattr(h, f) for h in hists])
                                 for f in ("rows", "age_h", "mask")))
    cat = {f: np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS}
    return Examples(**cat, history=history)


def _toy(n: int) -> Examples:
    r = np.arange(n)
    return Examples(r, r, r, r, r.astype(np.uint64), r)
