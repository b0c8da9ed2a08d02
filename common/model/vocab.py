"""ID vocabulary: raw string ids → embedding rows, growing without retraining.

Row 0 is the shared cold row: ids seen fewer than ``min_count`` times (and ids
never seen) map to it until they earn a row of their own.

>>> v = IdVocab(min_count=2)
>>> v.observe(["a", "a", "b"])
1
>>> v.lookup(["a", "b", "zzz"]).tolist()
[1, 0, 0]
>>> v.observe(["b"]), v.lookup(["b"]).tolist()
(1, [2])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLD_ROW = 0


@dataclass(frozen=True)
class Distinct:
    """A column's distinct ids, in order of first appearance, computed once and reused
    for every per-id lookup of a batch (sorting strings is the expensive part).

    >>> d = Distinct.of(np.array(["b", "a", "b"], dtype=object))
    >>> d.values, d.counts.tolist(), d.spread(np.array([10, 20])).tolist()
    (['b', 'a'], [2, 1], [10, 20, 10])
    """

    values: list[str]
    inverse: np.ndarray  # position in ``values`` of each element of the column
    counts: np.ndarray

    @classmethod
    def of(cls, ids: np.ndarray) -> Distinct:
        if len(ids) == 0:
            return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64))
        uniq, first, inverse, counts = np.unique(ids.astype(str), return_index=True,
                                                 return_inverse=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return cls(uniq[order].tolist(), rank[inverse.reshape(-1)], counts[order])

    def spread(self, per_value: np.ndarray) -> np.ndarray:
        """Per-distinct results broadcast back over the column."""
        return np.asarray(per_value)[self.inverse]


class VocabError(ValueError):
    """A saved vocabulary is unreadable or inconsistent."""


class IdVocab:
    """Frequency-filtered, append-only id → row map."""

    def __init__(self, min_count: int = 1) -> None:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self.min_count = min_count
        self._rows: dict[str, int] = {}
        self._ids: list[str] = []
        self._pending: Counter[str] = Counter()

    def __len__(self) -> int:
        """Rows in use, including the cold row."""
        return len(self._ids) + 1

    def __contains__(self, raw_id: object) -> bool:
        return raw_id in self._rows

    @property
    def ids(self) -> list[str]:
        """Ids with their own row, in row order (row = position + 1)."""
        return list(self._ids)

    def observe(self, ids: Iterable[str]) -> int:
        """Count occurrences; ids reaching ``min_count`` get a row. Returns rows added."""
        counts = Counter(i for i in ids if i not in self._rows)
        return self.observe_distinct(Distinct(list(counts), np.zeros(0, np.int64),
                                              np.fromiter(counts.values(), np.int64,
                                                          len(counts))))

    def observe_distinct(self, distinct: Distinct) -> int:
        """``observe`` for a column already reduced to distinct ids and their counts."""
        before = len(self._ids)
        for raw_id, c in zip(distinct.values, distinct.counts.tolist(), strict=True):
            if raw_id in self._rows:
                continue
            total = self._pending[raw_id] + c
            if total >= self.min_count:
                self._pending.pop(raw_id, None)
                self._rows[raw_id] = len(self._ids) + 1
                self._ids.append(raw_id)
            else:
                self._pending[raw_id] = total
        return len(self._ids) - before

    def lookup(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Rows for ids (int64); unknown and cold ids get ``COLD_ROW``."""
        get = self._rows.get
        return np.fromiter((get(i, COLD_ROW) for i in ids), dtype=np.int64, count=len(ids))

    def ids_of(self, rows: np.ndarray) -> list[str]:
        """Raw ids of rows that have their own (not the cold row)."""
        return [self._ids[r - 1] for r in rows.tolist()]

    def lookup_many(self, ids: np.ndarray) -> np.ndarray:
        """Like ``lookup`` but resolves each distinct id once (fast for long arrays)."""
        distinct = Distinct.of(ids)
        return distinct.spread(self.lookup(distinct.values))

    def copy(self) -> IdVocab:
        """An independent copy (a checkpoint is written from one while learning goes on)."""
        other = IdVocab(self.min_count)
        other._rows, other._ids = self._rows.copy(), list(self._ids)
        other._pending = self._pending.copy()
        return other

    def save(self, path: Path) -> None:
        """Write as a numpy archive (no pickle); callers rename it into place."""
        pending_ids = list(self._pending)
        with open(path, "wb") as fh:
            np.savez(
                fh,
                min_count=np.int64(self.min_count),
                ids=np.asarray(self._ids, dtype=str),
                pending_ids=np.asarray(pending_ids, dtype=str),
                pending_counts=np.asarray([self._pending[i] for i in pending_ids], np.int64),
            )

    @classmethod
    def load(cls, path: Path) -> IdVocab:
        try:
            with np.load(path, allow_pickle=False) as z:
                vocab = cls(int(z["min_count"]))
                ids = z["ids"].tolist()
                pending = zip(z["pending_ids"].tolist(), z["pending_counts"].tolist(),
                              strict=True)
                vocab._pending.update(dict(pending))
        except (OSError, ValueError, KeyError) as exc:
            raise VocabError(f"cannot read vocabulary {path}: {exc}") from exc
        vocab._ids = ids
        vocab._rows = {raw: r for r, raw in enumerate(ids, start=1)}
        if len(vocab._rows) != len(ids):
            raise VocabError(f"vocabulary {path} has duplicate ids")
        return vocab
