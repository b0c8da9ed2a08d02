"""Versioned item index files: each version's FAISS index written whole to a temp
directory and renamed into place, its deltas appended as durable files, folded into a
new snapshot every ``snapshot_every_deltas``; readers load a snapshot and its deltas.

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
import os
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.infra.atomic import fsync_dir, npz_bytes, write_bytes_atomic, write_text_atomic
from common.infra.settings_groups import IndexSettings
from publisher.item_index import ItemIndex, checked_vectors, nprobe_for

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

    def write_full(self, version: str, names: Sequence[str], vectors: np.ndarray,
                   queries: np.ndarray | None = None) -> ItemIndex:
        """Build and durably write a version from scratch, replacing any earlier attempt
        (``queries``: a sample of its served user vectors, to choose nprobe with)."""
        target = self._dir(version)
        item_index = ItemIndex.build(version, names, vectors, self.s, queries)
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
                "dim": item_index.dim, "snapshot_seq": seq, "files": files,
                "search": item_index.search_meta}
        write_text_atomic(d / "meta.json", json.dumps(meta, indent=1))

    def search_meta(self, version: str) -> dict[str, Any]:
        """How ``version``'s index searches (kind, lists, nprobe and the sweep that chose
        it), as its meta.json records it."""
        meta = self._meta(version)
        return {"kind": meta.get("kind"), "items": meta.get("items"),
                **(meta.get("search") or {})}

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
        search = dict(meta.get("search") or {})
        if isinstance(index, faiss.IndexIVF):
            # A search knob: a set RECSTREAM_INDEX_IVF_NPROBE overrides the build's sweep.
            if self.s.ivf_nprobe or "nprobe" not in search:
                search.update(nprobe=nprobe_for(index.nlist, self.s), nprobe_from="setting"
                              if self.s.ivf_nprobe else "a quarter of the lists")
            index.nprobe = int(search["nprobe"])
        return ItemIndex(version, index, names, search)

    def _delta_seqs(self, version: str) -> list[int]:
        d = self._dir(version) / "deltas"
        matches = (_DELTA_FILE.fullmatch(p.name) for p in d.iterdir()) if d.exists() else ()
        return sorted(int(m.group(1)) for m in matches if m)

    def append_delta(self, version: str, names: Sequence[str], vectors: np.ndarray) -> int:
        """Durably store a delta of item vectors for ``version``; returns its sequence number."""
        meta = self._meta(version)
        x = checked_vectors(vectors, len(names), meta["dim"])
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

