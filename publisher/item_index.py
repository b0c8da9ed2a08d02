"""The FAISS item index: built per model version, updated by deltas, stored as versioned
files, and double-buffered for serving.

Exact inner-product search up to ``exact_max_items`` items, IVF above. Item ids are
strings outside; inside FAISS they are 63-bit stable hashes, with a map back to names.

>>> import tempfile
>>> from common.infra.settings_groups import IndexSettings
>>> store = IndexStore(Path(tempfile.mkdtemp()), IndexSettings())
>>> _ = store.write_full("v1", ["a", "b", "c"], np.eye(3, dtype=np.float32))
>>> store.append_delta("v1", ["d"], np.array([[0.0, 0.6, 0.8]], np.float32))
1
>>> index, seq = store.load("v1")
>>> [name for name, _ in index.search(np.array([[0.0, 0.0, 1.0]], np.float32), 2)[0]], seq
(['c', 'd'], 1)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.infra.atomic import fsync_dir, npz_bytes, write_bytes_atomic, write_text_atomic
from common.infra.settings_groups import IndexSettings
from common.model.freq import stable_hash

_TRAIN_SEED = 0
# FAISS k-means warns (and clusters poorly) with fewer training points per centroid.
_MIN_POINTS_PER_LIST = 39
_ATTEMPTS = 3
_REPAIR = "publish the version again (write_full) or roll back"
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SNAPSHOT_FILE = re.compile(r"(index|items)(?:\.(\d{12}))?\.(faiss|npz)")
_DELTA_FILE = re.compile(r"(\d{12})\.npz")


class IndexStoreError(RuntimeError):
    """Base class for item index store failures."""


class VersionNotFoundError(IndexStoreError):
    """No complete index exists for the version."""


class IndexCorruptError(IndexStoreError):
    """An index version's files are missing, unreadable or do not match their checksums."""


class DeltaGapError(IndexStoreError):
    """Deltas a reader needs were removed by a snapshot: reload the version with ``load``."""


def faiss_ids(names: Sequence[str]) -> np.ndarray:
    """FAISS ids (int64, non-negative) of item names: stable hashes masked to 63 bits."""
    return (stable_hash(names) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)


def nprobe_for(nlist: int, s: IndexSettings) -> int:
    """Lists searched per query: the setting, or (0) a quarter of the lists. Two-tower
    user vectors sit off the item manifold, so their top-100 spreads over many lists:
    on trained tower outputs of 125k items (1024 lists) 64 lists found 0.80 of the exact
    top-100, 128 found 0.90, 256 found 0.95+."""
    return min(s.ivf_nprobe or max(1, nlist // 4), nlist)


def auto_nlist(n: int) -> int:
    """IVF list count for ``n`` items: about 4 * sqrt(n), rounded to a power of two
    (then capped by the training sample). Fewer, larger lists did worse for two-tower
    queries at the same share searched: 0.85 of the exact top-100 at 128 of 512 lists
    against 0.96 at 256 of 1024 on 125k trained tower outputs."""
    return 1 << max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))


def _matrix(vectors: np.ndarray, rows: int, dim: int | None = None) -> np.ndarray:
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
    index.train(sample)
    # A hashtable direct map lets remove_ids and reconstruct find an id without a scan.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.nprobe = nprobe_for(nlist, s)
    return index


def build_index(vectors: np.ndarray, ids: np.ndarray, s: IndexSettings) -> faiss.Index:
    """An inner-product index over ``vectors`` labelled ``ids``: exact when small, IVF above."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    x = _matrix(vectors, len(ids))
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
    x = _matrix(vectors, len(ids), index.d)
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

    @classmethod
    def build(cls, version: str, names: Sequence[str], vectors: np.ndarray,
              s: IndexSettings) -> ItemIndex:
        """A fresh index of ``names`` and their vectors."""
        ids = faiss_ids(names)
        name_map = _checked_names(ids, names, {})
        return cls(version, build_index(vectors, ids, s), name_map)

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

    def apply(self, names: Sequence[str], vectors: np.ndarray) -> None:
        """Upsert items: new vectors replace old ones, new names are added."""
        ids = faiss_ids(names)
        x = _matrix(vectors, len(ids), self.dim)
        batch = _checked_names(ids, names, self.names)
        apply_delta(self.index, ids, x)
        self.names.update(batch)

    def copy(self) -> ItemIndex:
        """An independent deep copy."""
        return ItemIndex(self.version, faiss.clone_index(self.index), dict(self.names))


def _snapshot_names(seq: int) -> tuple[str, str]:
    """File names of the snapshot taken after delta ``seq`` (0: the full publish)."""
    if seq == 0:
        return "index.faiss", "items.npz"
    return f"index.{seq:012d}.faiss", f"items.{seq:012d}.npz"


def _write_file(path: Path, data: bytes | np.ndarray) -> str:
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _verified(path: Path, digest: str) -> bytes:
    """A file's bytes, read once so the checked bytes are the bytes decoded."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexCorruptError(f"{path} is missing; {_REPAIR}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise IndexCorruptError(f"{path} does not match its checksum in meta.json; {_REPAIR}")
    return data


class IndexStore:
    """Versioned item index files: ``root/{version}/`` holds meta.json (which names the
    current snapshot files and their checksums), the snapshot files and ``deltas/``.

    One writer process (the publisher); any number of reader processes.
    """

    def __init__(self, root: Path, s: IndexSettings) -> None:
        self.root = root
        self.s = s
        self._lock = threading.Lock()
        self._last_seq: dict[str, int] = {}
        if s.threads > 0:  # readers (serving) search with the same thread budget
            faiss.omp_set_num_threads(s.threads)

    def _dir(self, version: str) -> Path:
        if not _VERSION_NAME.fullmatch(version):
            raise ValueError(f"bad index version name {version!r}")
        return self.root / version

    def write_full(self, version: str, names: Sequence[str], vectors: np.ndarray) -> ItemIndex:
        """Build and durably write a version from scratch, replacing any earlier attempt."""
        target = self._dir(version)
        item_index = ItemIndex.build(version, names, vectors, self.s)
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            leftover = re.compile(rf"\.(staging|trash)-{re.escape(version)}-[0-9a-f]{{32}}")
            for stale in self.root.iterdir():
                if leftover.fullmatch(stale.name):  # from a crash: never a version
                    shutil.rmtree(stale, ignore_errors=True)
            staging = self.root / f".staging-{version}-{uuid.uuid4().hex}"
            try:
                (staging / "deltas").mkdir(parents=True)
                self._write_snapshot(staging, item_index, 0)
                fsync_dir(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            # The complete directory appears under its name in one rename. An earlier attempt
            # is moved aside first (rename cannot replace a non-empty directory): the version
            # is briefly absent, never half-written.
            trash = self.root / f".trash-{version}-{uuid.uuid4().hex}"
            if target.exists():
                os.rename(target, trash)
            os.rename(staging, target)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            self._last_seq[version] = 0
        return item_index

    def _write_snapshot(self, d: Path, item_index: ItemIndex, seq: int) -> None:
        """Write the snapshot files, then meta.json naming them (the reader's commit point)."""
        index_name, items_name = _snapshot_names(seq)
        ids = np.fromiter(item_index.names, dtype=np.int64, count=len(item_index.names))
        files = {
            index_name: _write_file(d / index_name, faiss.serialize_index(item_index.index)),
            items_name: _write_file(d / items_name, npz_bytes(
                ids=ids, names=np.asarray(list(item_index.names.values()), dtype=str))),
        }
        kind = "ivf" if isinstance(item_index.index, faiss.IndexIVF) else "flat"
        meta = {"version": item_index.version, "kind": kind, "items": len(item_index),
                "dim": item_index.dim, "snapshot_seq": seq, "files": files}
        write_text_atomic(d / "meta.json", json.dumps(meta, indent=1))

    def _meta(self, version: str) -> dict[str, Any]:
        path = self._dir(version) / "meta.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise VersionNotFoundError(f"no item index for version {version!r} in {self.root} "
                                       f"(published: {self._listed()})") from None
        except (OSError, ValueError) as exc:
            raise IndexCorruptError(f"item index {version!r}: unreadable {path}: {exc}") from exc

    def _read_snapshot(self, version: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        """meta.json and the files it names, checksums verified."""
        for _ in range(_ATTEMPTS):
            meta = self._meta(version)
            try:
                return meta, {name: _verified(self._dir(version) / name, digest)
                              for name, digest in meta["files"].items()}
            except IndexCorruptError:
                # A snapshot may have flipped meta.json and removed the files read meanwhile:
                # only an unchanged meta.json means the files themselves are bad.
                if self._meta(version) == meta:
                    raise
        raise IndexCorruptError(f"item index {version!r}: snapshots kept changing while read")

    def load(self, version: str) -> tuple[ItemIndex, int]:
        """The version's index with every durable delta applied, and the last delta seq."""
        for _ in range(_ATTEMPTS):
            meta, blobs = self._read_snapshot(version)
            item_index = self._decode(version, meta, blobs)
            try:
                deltas = self.deltas_since(version, meta["snapshot_seq"])
            except DeltaGapError:
                continue  # two snapshots passed while reading: start from the newest
            for _, names, vectors in deltas:
                item_index.apply(names, vectors)
            return item_index, deltas[-1][0] if deltas else meta["snapshot_seq"]
        raise IndexCorruptError(f"item index {version!r}: snapshots kept changing while read")

    def _decode(self, version: str, meta: dict[str, Any], blobs: dict[str, bytes]) -> ItemIndex:
        index_name, items_name = _snapshot_names(meta["snapshot_seq"])
        try:
            index = faiss.deserialize_index(np.frombuffer(blobs[index_name], dtype=np.uint8))
            with np.load(io.BytesIO(blobs[items_name]), allow_pickle=False) as z:
                names = dict(zip(z["ids"].tolist(), z["names"].tolist(), strict=True))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise IndexCorruptError(f"item index {version!r}: cannot decode: {exc}") from exc
        if index.ntotal != len(names):
            raise IndexCorruptError(f"{version!r}: {index.ntotal} vectors, {len(names)} names")
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = nprobe_for(index.nlist, self.s)  # a search knob: today's setting
        return ItemIndex(version, index, names)

    def _delta_seqs(self, version: str) -> list[int]:
        d = self._dir(version) / "deltas"
        matches = (_DELTA_FILE.fullmatch(p.name) for p in d.iterdir()) if d.exists() else ()
        return sorted(int(m.group(1)) for m in matches if m)

    def append_delta(self, version: str, names: Sequence[str], vectors: np.ndarray) -> int:
        """Durably store a delta of item vectors for ``version``; returns its sequence number."""
        meta = self._meta(version)
        x = _matrix(vectors, len(names), meta["dim"])
        data = npz_bytes(names=np.asarray(list(names), dtype=str), vectors=x)
        with self._lock:
            if version not in self._last_seq:  # a restart: continue after what is on disk
                self._last_seq[version] = max(self._delta_seqs(version) + [meta["snapshot_seq"]])
            seq = self._last_seq[version] + 1
            write_bytes_atomic(self._dir(version) / "deltas" / f"{seq:012d}.npz", data)
            self._last_seq[version] = seq
        return seq

    def deltas_since(self, version: str, seq: int) -> list[tuple[int, list[str], np.ndarray]]:
        """Deltas after ``seq``, in order, for a reader holding the index up to ``seq``.

        Raises ``DeltaGapError`` when some were deleted by snapshots since; the reader
        must then ``load`` the version again.
        """
        snapshot_seq = self._meta(version)["snapshot_seq"]
        seqs = [n for n in self._delta_seqs(version) if n > seq]
        if seqs != list(range(seq + 1, seq + 1 + len(seqs))) or (not seqs and snapshot_seq > seq):
            raise DeltaGapError(f"item index {version!r}: deltas after {seq} are gone "
                                f"(snapshot at {snapshot_seq}); load the version again")
        out = []
        for n in seqs:
            try:
                with np.load(self._dir(version) / "deltas" / f"{n:012d}.npz",
                             allow_pickle=False) as z:
                    out.append((n, z["names"].tolist(), z["vectors"]))
            except FileNotFoundError:
                raise DeltaGapError(f"item index {version!r}: delta {n} was removed while "
                                    "read; load the version again") from None
        return out

    def snapshot_due(self, version: str, seq: int) -> bool:
        """Whether ``snapshot_every_deltas`` deltas have piled up since the last snapshot."""
        return seq - self._meta(version)["snapshot_seq"] >= self.s.snapshot_every_deltas

    def snapshot(self, item_index: ItemIndex, seq: int) -> None:
        """Rewrite the version's index files from ``item_index``, which holds deltas up to
        ``seq``; deltas and snapshot files older than the previous snapshot are deleted."""
        version = item_index.version
        d = self._dir(version)
        with self._lock:
            previous = self._meta(version)["snapshot_seq"]
            last = max(self._delta_seqs(version) + [previous])
            if seq == previous:
                return  # rewriting the files meta.json names would race readers verifying them
            if not previous < seq <= last:
                raise ValueError(f"snapshot seq {seq} of {version!r} is outside "
                                 f"({previous}, {last}]")
            self._write_snapshot(d, item_index, seq)
            # Keep the previous generation: a reader that loaded it can still catch up.
            for p in d.iterdir():
                m = _SNAPSHOT_FILE.fullmatch(p.name)
                if m and int(m.group(2) or 0) < previous:
                    p.unlink(missing_ok=True)
            for n in self._delta_seqs(version):
                if n <= previous:
                    (d / "deltas" / f"{n:012d}.npz").unlink(missing_ok=True)

    def exists(self, version: str) -> bool:
        """Whether ``version`` was installed whole (its meta.json is written last, so a
        present one means complete); ``load`` verifies the checksums. Cheap: the stream
        asks before every delta."""
        return (self._dir(version) / "meta.json").exists()

    def _listed(self) -> list[str]:
        """Version directories with a meta.json (hidden staging directories never match)."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if _VERSION_NAME.fullmatch(p.name) and (p / "meta.json").exists())

    def versions(self) -> list[str]:
        """Installed versions, by name."""
        return self._listed()

    def remove(self, version: str) -> None:
        """Delete a version (retention); readers see it whole or not at all."""
        with self._lock:
            self._last_seq.pop(version, None)
            if not self._dir(version).exists():
                raise VersionNotFoundError(f"no item index for version {version!r} in {self.root}")
            # Renamed aside first: a reader never finds meta.json with its files half deleted.
            trash = self.root / f".trash-{version}-{uuid.uuid4().hex}"
            os.rename(self._dir(version), trash)
        shutil.rmtree(trash, ignore_errors=True)


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
        with self._cond:
            i = self._active  # taken with the count under one lock: update sees every reader
            self._readers[i] += 1
        try:
            return self._replicas[i].search(queries, k)
        finally:
            with self._cond:
                self._readers[i] -= 1
                if self._readers[i] == 0:
                    self._cond.notify_all()

    def update(self, names: Sequence[str], vectors: np.ndarray, seq: int | None = None) -> None:
        """Apply a delta to both replicas without blocking searches."""
        with self._update_lock:
            # Checked before either replica changes, so a bad delta cannot split them.
            x = _matrix(vectors, len(names), self._replicas[0].dim)
            _checked_names(faiss_ids(names), names, self._replicas[0].names)
            standby = 1 - self._active
            self._replicas[standby].apply(names, x)  # no readers: they only enter the active
            with self._cond:
                self._active = standby
                self._cond.wait_for(lambda: self._readers[1 - standby] == 0)
            self._replicas[1 - standby].apply(names, x)
            if seq is not None:
                self.seq = seq
