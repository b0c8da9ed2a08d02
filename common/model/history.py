"""Each user's last N positives (item ids with timestamps): the user tower's fresh input.

Two jobs, one rule. ``UserHistories`` is the running state (serving and the stream
append each positive as it arrives, before any learning step); ``example_histories``
gives every training example the history its user had *strictly before* the example's
own timestamp, so no example ever sees its own event or a later one. No I/O here.

>>> h = UserHistories(max_len=2)
>>> h.append(["u1", "u1", "u1"], ["a", "b", "c"], [1, 2, 3])
>>> h.items("u1"), h.items("nobody")
(['b', 'c'], [])
>>> hist = example_histories(np.array(["u1", "u1", "u1"]), np.array([7, 8, 9]),
...                          np.array([10, 10, 20]), max_len=2)
>>> hist.rows.tolist()  # the two events at t=10 see nothing; the one at t=20 sees both
[[0, 0], [0, 0], [7, 8]]
>>> hist.mask.tolist()
[[False, False], [False, False], [True, True]]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.data.events import Events

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class HistoryBatch:
    """Padded histories, most recent last. ``rows``/``age_h``/``mask`` are ``[B, N]``:
    item-ID rows (0 where padded), the age in hours at query time, and which are real."""

    rows: np.ndarray  # int64
    age_h: np.ndarray  # float32
    mask: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray) -> HistoryBatch:
        return HistoryBatch(self.rows[idx], self.age_h[idx], self.mask[idx])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.rows), torch.from_numpy(self.age_h),
                torch.from_numpy(self.mask))

    @classmethod
    def empty(cls, n: int, max_len: int) -> HistoryBatch:
        return cls(np.zeros((n, max_len), np.int64), np.zeros((n, max_len), np.float32),
                   np.zeros((n, max_len), bool))


def example_histories(user_ids: np.ndarray, item_rows: np.ndarray, ts_ms: np.ndarray,
                      max_len: int, is_query: np.ndarray | None = None) -> HistoryBatch:
    """For each event with ``is_query`` (default: all), the last ``max_len`` events of the
    same user with a strictly smaller timestamp; returned in the queries' input order.

    Events at the same millisecond never see each other: the serving side cannot know
    the order of events that arrive together either.
    """
    n = len(user_ids)
    if is_query is None:
        is_query = np.ones(n, dtype=bool)
    _, user_code = np.unique(np.asarray(user_ids).astype(str), return_inverse=True)
    order = np.lexsort((ts_ms, user_code))
    u, t, r = user_code[order], np.asarray(ts_ms)[order], np.asarray(item_rows)[order]
    pos = np.arange(n)
    new_user = np.r_[True, u[1:] != u[:-1]] if n else np.zeros(0, bool)
    new_time = new_user | (np.r_[True, t[1:] != t[:-1]] if n else np.zeros(0, bool))
    group_start = np.maximum.accumulate(np.where(new_user, pos, 0)) if n else pos
    # Events before position ``first_same_time`` are exactly the strictly earlier ones.
    first_same_time = np.maximum.accumulate(np.where(new_time, pos, 0)) if n else pos
    sel = np.flatnonzero(np.asarray(is_query)[order])
    idx = first_same_time[sel, None] - max_len + np.arange(max_len)[None, :]
    mask = idx >= group_start[sel, None]
    idx = np.where(mask, idx, 0)
    rows = np.where(mask, r[idx] if n else 0, 0).astype(np.int64)
    age = np.where(mask, (t[sel, None] - t[idx]) / HOUR_MS, 0.0).astype(np.float32)
    back = np.argsort(order[sel], kind="stable")  # sorted position of each query, in input order
    return HistoryBatch(rows[back], age[back], mask[back])


class UserHistories:
    """The last ``max_len`` positives of every user, appended in event-time order."""

    def __init__(self, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        self.max_len = max_len
        self._items: dict[str, deque[str]] = {}
        self._ts: dict[str, deque[int]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, user: str) -> bool:
        return user in self._items

    def append(self, user_ids: Sequence[str], item_ids: Sequence[str],
               ts_ms: Sequence[int]) -> None:
        """Add positives (callers pass them in time order; the oldest drop out)."""
        for user, item, ts in zip(user_ids, item_ids, ts_ms, strict=True):
            key = str(user)
            items = self._items.get(key)
            if items is None:
                items = self._items[key] = deque(maxlen=self.max_len)
                self._ts[key] = deque(maxlen=self.max_len)
            items.append(str(item))
            self._ts[key].append(int(ts))

    def items(self, user: str) -> list[str]:
        return list(self._items.get(user, ()))

    def timestamps(self, user: str) -> list[int]:
        return list(self._ts.get(user, ()))

    def batch(self, user_ids: Sequence[str], lookup: Callable[[list[str]], np.ndarray],
              now_ms: int | np.ndarray, max_len: int | None = None) -> HistoryBatch:
        """Padded histories of ``user_ids`` as seen at ``now_ms``; ``lookup`` maps raw
        item ids to item-ID rows (the model's vocabulary)."""
        n_max = max_len or self.max_len
        out = HistoryBatch.empty(len(user_ids), n_max)
        now = np.broadcast_to(np.asarray(now_ms, dtype=np.int64), (len(user_ids),))
        for b, user in enumerate(user_ids):
            items = self._items.get(str(user))
            if not items:
                continue
            keep = list(items)[-n_max:]
            ts = np.fromiter(list(self._ts[str(user)])[-n_max:], np.int64, len(keep))
            lo = n_max - len(keep)
            out.rows[b, lo:] = lookup(keep)
            out.age_h[b, lo:] = np.maximum(now[b] - ts, 0) / HOUR_MS
            out.mask[b, lo:] = True
        return out

    def context(self, user_ids: Sequence[str], before_ms: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(user, item, ts) of the stored positives of ``user_ids`` older than ``before_ms``,
        to prepend to a training set so its first examples see their earlier history."""
        users, items, ts = [], [], []
        for user in dict.fromkeys(str(u) for u in user_ids):
            for item, t in zip(self._items.get(user, ()), self._ts.get(user, ()), strict=True):
                if t < before_ms:
                    users.append(user)
                    items.append(item)
                    ts.append(t)
        return (np.asarray(users, dtype=object), np.asarray(items, dtype=object),
                np.asarray(ts, dtype=np.int64))

    def copy(self) -> UserHistories:
        out = UserHistories(self.max_len)
        out._items = {u: deque(v, maxlen=self.max_len) for u, v in self._items.items()}
        out._ts = {u: deque(v, maxlen=self.max_len) for u, v in self._ts.items()}
        return out


def context_events(user_ids: Sequence[str], item_ids: Sequence[str],
                   ts_ms: Sequence[int]) -> Events:
    """Stored positives as events, to give a training set's first examples the history
    before it (``encode_examples(..., context=...)``)."""
    n = len(user_ids)
    return Events.from_columns(event_id=[""] * n, user_id=user_ids, item_id=item_ids,
                               ts_ms=ts_ms, event_type=["click"] * n)
