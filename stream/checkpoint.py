"""Crash-safe trainer checkpoints: the learned ID rows and the offsets they include.

A checkpoint is a directory ``ckpt-{step}`` staged under a hidden name and renamed
into place complete, with ``state.json`` (offsets, base version, time index, SHA-256
of every file) written last. Dense weights are not saved: they are the base version's,
frozen, and reloaded from the registry. Loading takes the newest checkpoint whose files
match their checksums, so a torn or tampered one falls back to the one before.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.infra.atomic import (
    fsync_dir,
    npz_bytes,
    sha256_file,
    write_bytes_atomic,
    write_text_atomic,
)
from common.model.bundle import ModelBundle
from common.model.freq import FrequencyEstimator
from common.model.prior import item_popularity
from common.model.vocab import IdVocab, VocabError
from stream.time_index import TimeIndex

log = logging.getLogger(__name__)
_FILES = ("tables.pt", "user_vocab.npz", "item_vocab.npz", "freq.npz")
_REPLAY = "replay.npz"  # only when the replay buffer holds examples


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


@dataclass
class CheckpointMeta:
    """What a checkpoint includes besides the tensors."""

    base_version: str
    step: int
    offsets: dict[int, int]  # partition -> next offset to read; every event before is in
    time_index: TimeIndex = field(default_factory=TimeIndex)
    events_applied: int = 0
    created_at: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """A copy of the learned state, taken between steps, that can be written while the
    trainer learns on."""

    meta: CheckpointMeta  # its offsets and time index copies, not the live ones
    tables: dict[str, torch.Tensor]
    user_vocab: IdVocab
    item_vocab: IdVocab
    freq: dict[str, np.ndarray]
    item_counts: np.ndarray
    item_pop: np.ndarray
    replay: dict[str, np.ndarray] = field(default_factory=dict)  # the learner's replay buffer


def snapshot(bundle: ModelBundle, meta: CheckpointMeta,
             replay: dict[str, np.ndarray] | None = None) -> Snapshot:
    """Copy what a checkpoint of ``bundle`` (and of the learner's replay buffer, whose
    examples later steps mix in) holds (memory copies: milliseconds)."""
    ids = {"user": bundle.model.user.ids, "item": bundle.model.item.ids}
    meta = replace(meta, offsets=dict(meta.offsets),
                   time_index=TimeIndex.from_dict(meta.time_index.to_dict()))
    return Snapshot(meta,
                    {f"{k}.{n}": getattr(t, n).clone() for k, t in ids.items()
                     for n in ("weight", "accum")},
                    bundle.user_vocab.copy(), bundle.item_vocab.copy(),
                    {k: np.array(v, copy=True) for k, v in bundle.freq.state_dict().items()},
                    np.array(bundle.item_counts, copy=True),
                    np.array(bundle.item_pop, copy=True),
                    {k: np.array(v, copy=True) for k, v in (replay or {}).items()})


def save_checkpoint(root: Path, bundle: ModelBundle, meta: CheckpointMeta, keep: int) -> Path:
    """Write a checkpoint of ``bundle`` atomically; older ones beyond ``keep`` go."""
    return write_checkpoint(root, snapshot(bundle, meta), keep)


def write_checkpoint(root: Path, snap: Snapshot, keep: int) -> Path:
    """Write a snapshot as a checkpoint atomically; older ones beyond ``keep`` are removed.

    Raises ``CheckpointError`` (and leaves the checkpoints before intact) when it cannot.
    """
    meta = snap.meta
    staging = root / f".staging-{uuid.uuid4().hex}"
    final = root / f"ckpt-{meta.step:012d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        buf = io.BytesIO()
        torch.save(snap.tables, buf)
        write_bytes_atomic(staging / "tables.pt", buf.getvalue())
        snap.user_vocab.save(staging / "user_vocab.npz")
        snap.item_vocab.save(staging / "item_vocab.npz")
        write_bytes_atomic(staging / "freq.npz", npz_bytes(item_counts=snap.item_counts,
                                                            item_pop=snap.item_pop,
                                                            **snap.freq))
        files = list(_FILES)
        if snap.replay:
            write_bytes_atomic(staging / _REPLAY, npz_bytes(**snap.replay))
            files.append(_REPLAY)
        state = {"base_version": meta.base_version, "step": meta.step,
                 "offsets": {str(p): o for p, o in meta.offsets.items()},
                 "time_index": meta.time_index.to_dict(),
                 "events_applied": meta.events_applied, "created_at": time.time(),
                 "files": {f: sha256_file(staging / f) for f in files}}
        write_text_atomic(staging / "state.json", json.dumps(state))
        replaced = None
        if final.exists():  # the same step saved again (first sight of a partition, rebase)
            # Move the old one aside rather than delete it: a crash in between must
            # still leave a complete checkpoint of this step behind.
            replaced = root / f".replaced-{final.name}-{uuid.uuid4().hex}"
            os.rename(final, replaced)
        os.rename(staging, final)
        fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint in {root}: {exc}") from exc
    for old in sorted(root.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".staging-*"), *root.glob(".replaced-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-save
    return final


class CheckpointWriter:
    """Writes snapshots on a thread of its own, one at a time, while the trainer learns.

    A failed write is raised (``CheckpointError``) by the next ``submit`` or ``written``;
    the checkpoints before it stay intact.
    """

    def __init__(self, root: Path, keep: int, on_written: Callable[[], None]) -> None:
        self.root, self.keep, self.on_written = root, keep, on_written
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._writing: Future[None] | None = None
        self._lock = threading.RLock()  # the trainer's loop and its rebalance hooks save

    def submit(self, snap: Snapshot) -> None:
        """Write ``snap`` once the save before it is through (one in flight at most)."""
        with self._lock:
            self.written(block=True)
            self._writing = self._pool.submit(self._write, snap)

    def _write(self, snap: Snapshot) -> None:
        write_checkpoint(self.root, snap, self.keep)
        self.on_written()

    def written(self, block: bool) -> None:
        """Raise the error of the save in flight if it failed; with ``block``, wait for it."""
        with self._lock:
            writing = self._writing
            if writing is None or (not block and not writing.done()):
                return
            self._writing = None
            writing.result()

    def close(self) -> None:
        """Wait for the save in flight (raising its failure) and stop the thread."""
        try:
            self.written(block=True)
        finally:
            self._pool.shutdown(wait=True)


def load_checkpoint(root: Path) -> tuple[CheckpointMeta, dict[str, Any]] | None:
    """The newest intact checkpoint as (meta, payload), or None if there is none."""
    # A ".replaced-ckpt-N-…" directory is the previous save of step N when a crash came
    # between moving it aside and renaming the new one in.
    candidates = [*root.glob("ckpt-*"), *root.glob(".replaced-ckpt-*")]
    for d in sorted(candidates, key=lambda p: (int(p.name.split("ckpt-")[1][:12]),
                                               p.name.startswith("ckpt-")), reverse=True):
        try:
            return _read(d)
        except (OSError, ValueError, KeyError, RuntimeError, VocabError,
                pickle.UnpicklingError) as exc:  # a table holding objects: refused
            log.warning("skipping unreadable checkpoint", extra={"path": str(d),
                                                                 "error": str(exc)})
    return None


def _read(d: Path) -> tuple[CheckpointMeta, dict[str, Any]]:
    state = json.loads((d / "state.json").read_text())
    for name, digest in state["files"].items():
        if sha256_file(d / name) != digest:
            raise CheckpointError(f"{d / name} does not match its checksum")
    with np.load(d / "freq.npz", allow_pickle=False) as z:
        freq_state = {k: z[k] for k in z.files}
    payload = {
        "tables": torch.load(d / "tables.pt", weights_only=True),
        "user_vocab": IdVocab.load(d / "user_vocab.npz"),
        "item_vocab": IdVocab.load(d / "item_vocab.npz"),
        "freq": FrequencyEstimator.from_state(freq_state),
        "item_counts": freq_state["item_counts"].astype(np.float64),
        "item_pop": item_popularity(freq_state),
        "replay": {},
    }
    if _REPLAY in state["files"]:
        with np.load(d / _REPLAY, allow_pickle=False) as z:
            payload["replay"] = {k: z[k] for k in z.files}
    meta = CheckpointMeta(state["base_version"], int(state["step"]),
                          {int(p): int(o) for p, o in state["offsets"].items()},
                          TimeIndex.from_dict(state["time_index"]),
                          int(state["events_applied"]), float(state["created_at"]))
    return meta, payload


def restore_into(bundle: ModelBundle, payload: dict[str, Any]) -> None:
    """Overwrite a freshly loaded base bundle's ID rows, vocabularies and frequency state."""
    tables = payload["tables"]
    for side, tower in (("user", bundle.model.user), ("item", bundle.model.item)):
        tower.ids.weight = tables[f"{side}.weight"].clone()
        tower.ids.accum = tables[f"{side}.accum"].clone()
    bundle.user_vocab, bundle.item_vocab = payload["user_vocab"], payload["item_vocab"]
    bundle.freq, bundle.item_counts = payload["freq"], payload["item_counts"]
    bundle.item_pop = payload["item_pop"]
