"""The FAISS item index of one model version: chosen by corpus size, updated in place by
deltas, and double-buffered for serving (its versioned files: ``publisher.index_store``).

Exact inner-product search up to ``exact_max_items`` items, IVF above. Item ids are
strings outside; inside FAISS they are 63-bit stable hashes, with a map back to names.

>>> from common.infra.settings_groups import IndexSettings
>>> index = ItemIndex.build("v1", ["a", "b", "c"], np.eye(3, dtype=np.float32), IndexSettings())
>>> index.apply(["d"], np.array([[0.0, 0.6, 0.8]], np.float32))
>>> [name for name, _ in index.search(np.array([[0.0, 0.0, 1.0]], np.float32), 2)[0]]
['c', 'd']
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from common.infra.settings_groups import IndexSettings
from common.model.freq import stable_hash
from publisher.index_tuning import tune_nprobe

_TRAIN_SEED = 0
# FAISS k-means warns (and clusters poorly) with fewer training points per centroid.
_MIN_POINTS_PER_LIST = 39


def faiss_ids(names: Sequence[str]) -> np.ndarray:
    """FAISS ids (int64, non-negative) of item names: stable hashes masked to 63 bits."""
    return (stable_hash(names) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)


def nprobe_for(nlist: int, s: IndexSettings) -> int:
    """Lists searched per query when no sweep chose them (``index_tuning``): the setting,
    or (0) a quarter of the lists. Two-tower user vectors sit off the item manifold, so
    their top-100 spreads over many lists: on trained tower outputs of 125k items (1024
    lists) 64 lists found 0.80 of the exact top-100, 128 found 0.90, 256 found 0.95+."""
    return min(s.ivf_nprobe or max(1, nlist // 4), nlist)


def auto_nlist(n: int) -> int:
    """IVF list count for ``n`` items: about 4 * sqrt(n), rounded to a power of two
    (then capped by the training sample). Fewer, larger lists did worse for two-tower
    queries at the same share searched: 0.85 of the exact top-100 at 128 of 512 lists
    against 0.96 at 256 of 1024 on 125k trained tower outputs."""
    return 1 << max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))


def checked_vectors(vectors: np.ndarray, rows: int, dim: int | None = None) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 [rows, dim] matrix, or ``ValueError``."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] != rows or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"expected vectors of shape ({rows}, {dim or 'd'}), got {x.shape}")
    return x


def _last_occurrences(ids: np.ndarray) -> np.ndarray:
    """Row positions keeping the last row of each repeated id (a later value wins)."""
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return np.sort(len(ids) - 1 - first_in_reversed)


def _train_ivf(x: np.ndarray, s: IndexSettings) -> faiss.IndexIVFFlat:
    n, d = x.shape
    rng = np.random.default_rng(_TRAIN_SEED)
    sample = x if n <= s.train_sample else x[np.sort(rng.choice(n, s.train_sample, False))]
    nlist = max(1, min(s.ivf_nlist or auto_nlist(n), len(sample) // _MIN_POINTS_PER_LIST))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = s.ivf_train_iters
    index.train(sample)
    # A hashtable direct map lets remove_ids and reconstruct find an id without a scan.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.nprobe = nprobe_for(nlist, s)
    return index


def build_index(vectors: np.ndarray, ids: np.ndarray, s: IndexSettings) -> faiss.Index:
    """An inner-product index over ``vectors`` labelled ``ids``: exact when small, IVF above."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = checked_vectors(vectors, len(ids))
    keep = _last_occurrences(ids)
    ids, x = ids[keep], x[keep]
    if s.threads > 0:
        faiss.omp_set_num_threads(s.threads)
    if len(ids) <= s.exact_max_items:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    else:
        # IVF keeps its own ids. Not IndexIDMap2(IVF): measured on faiss 1.15.1, IDMap's
        # remove_ids compacts its id_map while IVF keeps the old internal sequence numbers,
        # so after removing 500 of 2000 items every search returned a label shifted by 500.
        index = _train_ivf(x, s)
    index.add_with_ids(x, ids)
    return index


def apply_delta(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Replace the vectors of ids already in ``index`` and add the others."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = checked_vectors(vectors, len(ids), index.d)
    if len(ids) == 0:
        return
    keep = _last_occurrences(ids)
    ids, x = np.ascontiguousarray(ids[keep]), np.ascontiguousarray(x[keep])
    # IVF's hashtable removes by id lookup (an array selector); IDMap2 tests every stored
    # id for membership, where the batch selector's hash set beats an array's linear scan.
    selector = faiss.IDSelectorArray if isinstance(index, faiss.IndexIVF) else faiss.IDSelectorBatch
    index.remove_ids(selector(ids.size, faiss.swig_ptr(ids)))
    index.add_with_ids(x, ids)


def _checked_names(ids: np.ndarray, names: Sequence[str], known: dict[int, str]) -> dict[int, str]:
    """``{faiss id: name}`` for a batch, refusing two names that share a hash."""
    batch: dict[int, str] = {}
    for fid, name in zip(ids.tolist(), names, strict=True):
        other = batch.get(fid, known.get(fid, name))
        if other != name:
            raise ValueError(f"item ids {other!r} and {name!r} hash to the same FAISS id {fid}")
        batch[fid] = name
    return batch


@dataclass
class ItemIndex:
    """A FAISS index of one model version's items with the map from FAISS ids to names."""

    version: str
    index: faiss.Index
    names: dict[int, str] = field(default_factory=dict)
    # How the IVF search knob was set (meta.json's "search"): nprobe and where it came from.
    search_meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, version: str, names: Sequence[str], vectors: np.ndarray,
              s: IndexSettings, queries: np.ndarray | None = None) -> ItemIndex:
        """A fresh index of ``names`` and their vectors. On an IVF index without a set
        ``ivf_nprobe``, ``queries`` (a sample of the version's served user vectors) choose
        nprobe by a recall sweep (``index_tuning``)."""
        ids = faiss_ids(names)
        name_map = _checked_names(ids, names, {})
        index = build_index(vectors, ids, s)
        search: dict[str, Any] = {}
        if isinstance(index, faiss.IndexIVF):
            search = {"nprobe": int(index.nprobe), "nprobe_from": "setting" if s.ivf_nprobe
                      else "a quarter of the lists (no queries to sweep with)"}
            if not s.ivf_nprobe and queries is not None and len(queries):
                keep = _last_occurrences(ids)
                search = tune_nprobe(index, checked_vectors(vectors, len(ids))[keep],
                                     ids[keep], checked_vectors(queries, len(queries),
                                                                index.d), s.target_recall)
            search["nlist"] = int(index.nlist)
        return cls(version, index, name_map, search)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The top ``k`` (name, inner product) per query row, best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (m, {self.dim}), got {q.shape}")
        if k <= 0 or len(self) == 0:
            return [[] for _ in range(len(q))]
        scores, labels = self.index.search(q, min(k, len(self)))
        # IVF returns -1 labels when the probed lists hold fewer than k items.
        return [[(self.names[i], s)
                 for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True) if i >= 0]
                for row_s, row_i in zip(scores, labels, strict=True)]

    def vectors(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Which ``names`` the index holds (bool ``[n]``) and their vectors as it holds
        them now, deltas included (``[n, dim]``, zeros where absent).

        Read back from FAISS by id (``reconstruct_batch``): IndexIDMap2 keeps a reverse
        map and the IVF index a hashtable direct map, so both find an id without a scan
        (measured on faiss 1.15.1: 5 us for 50 ids on either). Only ids in ``names`` are
        asked for: FAISS raises on an id it does not hold, and the map of names is the
        set of ids held (deltas only upsert)."""
        ids = faiss_ids(names)
        found = np.fromiter((self.names.get(i) == n for i, n in zip(ids.tolist(), names,
                                                                     strict=True)),
                            bool, len(ids))
        out = np.zeros((len(ids), self.dim), np.float32)
        if found.any():
            out[found] = self.index.reconstruct_batch(np.ascontiguousarray(ids[found]))
        return found, out

    def apply(self, names: Sequence[str], vectors: np.ndarray) -> None:
        """Upsert items: new vectors replace old ones, new names are added."""
        ids = faiss_ids(names)
        x = checked_vectors(vectors, len(ids), self.dim)
        batch = _checked_names(ids, names, self.names)
        apply_delta(self.index, ids, x)
        self.names.update(batch)

    def copy(self) -> ItemIndex:
        """An independent deep copy."""
        return ItemIndex(self.version, faiss.clone_index(self.index), dict(self.names),
                         dict(self.search_meta))


class DoubleBufferedIndex:
    """What serving holds: two replicas of one ItemIndex, searched and updated at once.

    FAISS forbids adding to an index while it is searched, so updates go to the standby
    replica, the replicas swap, and the old active one is updated once its searches end.
    faiss' Python search releases the GIL (its SWIG wrappers call PyEval_SaveThread;
    measured: two threads searching a flat index ran 1.6x faster than one after the
    other on two cores), so concurrent searches run in parallel.
    """

    def __init__(self, item_index: ItemIndex, seq: int = 0) -> None:
        self._replicas = (item_index, item_index.copy())
        self._active = 0
        self._readers = [0, 0]
        self._cond = threading.Condition()
        self._update_lock = threading.Lock()
        self.seq = seq  # last delta applied; set by the updater

    @property
    def version(self) -> str:
        return self._replicas[0].version

    @property
    def replicas(self) -> tuple[ItemIndex, ItemIndex]:
        """Both replicas (equal between updates); for checks, never for searching."""
        return self._replicas

    def __len__(self) -> int:
        return len(self._replicas[self._active])

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Search the active replica; safe from any number of threads."""
        with self._reading() as replica:
            return replica.search(queries, k)

    def vectors(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``ItemIndex.vectors`` of the active replica; safe from any number of threads."""
        with self._reading() as replica:
            return replica.vectors(names)

    @contextmanager
    def _reading(self) -> Iterator[ItemIndex]:
        """The active replica, counted as read until the block ends."""
        with self._cond:
            i = self._active  # taken with the count under one lock: update sees every reader
            self._readers[i] += 1
        try:
            yield self._replicas[i]
        finally:
            with self._cond:
                self._readers[i] -= 1
                if self._readers[i] == 0:
                    self._cond.notify_all()

    def update(self, names: Sequence[str], vectors: np.ndarray, seq: int | None = None) -> None:
        """Apply a delta to both replicas without blocking searches."""
        with self._update_lock:
            # Checked before either replica changes, so a bad delta cannot split them.
            x = checked_vectors(vectors, len(names), self._replicas[0].dim)
            _checked_names(faiss_ids(names), names, self._replicas[0].names)
            standby = 1 - self._active
            self._replicas[standby].apply(names, x)  # no readers: they only enter the active
            with self._cond:
                self._active = standby
                self._cond.wait_for(lambda: self._readers[1 - standby] == 0)
            self._replicas[1 - standby].apply(names, x)
            if seq is not None:
                self.seq = seq
