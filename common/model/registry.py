"""Model registry on disk: immutable versions under ``models/`` plus aliases.

Layout::

    models/v000001/{weights.pt, model.json, user_vocab.npz, item_vocab.npz,
                    encoders.json, freq.npz, meta.json}
    models/aliases.json     {"champion": "v000002", "previous": "v000001"}

A version is staged in a hidden directory and renamed into place complete, with
``meta.json`` listing a SHA-256 for every file; loading verifies them and loads
weights with ``weights_only=True``, so a partial or tampered version is refused.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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
from common.model.features import FeatureEncoder
from common.model.freq import FrequencyEstimator
from common.model.prior import item_popularity
from common.model.towers import TwoTower, TwoTowerConfig
from common.model.vocab import IdVocab, VocabError

ALIASES = ("champion", "previous")
_FILES = ("weights.pt", "model.json", "user_vocab.npz", "item_vocab.npz", "encoders.json",
          "freq.npz")


class RegistryError(RuntimeError):
    """Base class for registry failures."""


class VersionNotFoundError(RegistryError):
    """No such version or alias."""


class CorruptVersionError(RegistryError):
    """A version's files are missing, partial or do not match their checksums."""


class Registry:
    """Versions of model bundles with their metadata and the champion/previous aliases."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def register(self, bundle: ModelBundle, *, kind: str, cutoff_ms: int, parent: str | None,
                 metrics: dict[str, float], config_hash: str,
                 extra: dict[str, Any] | None = None) -> str:
        """Write a bundle as a new version and return its name (no alias changes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            self._write_bundle(staging, bundle)
            meta = {"kind": kind, "parent": parent, "cutoff_ms": int(cutoff_ms),
                    "created_at": time.time(), "metrics": metrics, "config_hash": config_hash,
                    "files": {f: sha256_file(staging / f) for f in _FILES}, **(extra or {})}
            with self._locked():
                version = self._next_version()
                meta["version"] = version
                write_text_atomic(staging / "meta.json", json.dumps(meta, indent=2))
                os.rename(staging, self.root / version)
                fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def _next_version(self) -> str:
        numbers = [int(p.name[1:]) for p in self.root.glob("v[0-9]*") if p.name[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:06d}"

    @staticmethod
    def _write_bundle(d: Path, b: ModelBundle) -> None:
        buf = io.BytesIO()
        torch.save(b.model.state_dict(), buf)
        write_bytes_atomic(d / "weights.pt", buf.getvalue())
        write_text_atomic(d / "model.json", json.dumps(b.model.current_config().to_dict()))
        b.user_vocab.save(d / "user_vocab.npz")
        b.item_vocab.save(d / "item_vocab.npz")
        write_text_atomic(d / "encoders.json", json.dumps(
            {"user": b.user_encoder.to_dict(), "item": b.item_encoder.to_dict()}))
        write_bytes_atomic(d / "freq.npz", npz_bytes(item_counts=b.item_counts,
                                                      item_pop=b.item_pop,
                                                      **b.freq.state_dict()))

    def versions(self) -> list[str]:
        """Complete versions (those with a meta.json), oldest first."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.glob("v[0-9]*") if (p / "meta.json").exists())

    def aliases(self) -> dict[str, str | None]:
        path = self.root / "aliases.json"
        if not path.exists():
            return dict.fromkeys(ALIASES)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptVersionError(f"{path} is not valid JSON: {exc}") from exc
        return {a: data.get(a) for a in ALIASES}

    def resolve(self, ref: str) -> str:
        """A version name from a version or an alias; raises if it does not exist."""
        version = self.aliases().get(ref) if ref in ALIASES else ref
        if version is None:
            raise VersionNotFoundError(f"alias {ref!r} is not set (no version promoted yet)")
        if not (self.root / version).is_dir():
            raise VersionNotFoundError(f"model version {version!r} not found in {self.root}")
        return version

    def meta(self, ref: str) -> dict[str, Any]:
        """A version's metadata after verifying its files against their checksums."""
        version = self.resolve(ref)
        d = self.root / version
        try:
            meta = json.loads((d / "meta.json").read_text())
        except FileNotFoundError:
            raise CorruptVersionError(
                f"model version {version} is incomplete (no meta.json): "
                "a registration was interrupted; delete the directory") from None
        except json.JSONDecodeError as exc:
            raise CorruptVersionError(f"{d / 'meta.json'} is not valid JSON: {exc}") from exc
        for name, digest in meta.get("files", {}).items():
            if not (d / name).exists():
                raise CorruptVersionError(f"model version {version} is missing {name}")
            if sha256_file(d / name) != digest:
                raise CorruptVersionError(
                    f"model version {version}: {name} does not match its checksum "
                    "(corrupt or tampered); refusing to load it")
        return meta

    def load(self, ref: str) -> tuple[ModelBundle, dict[str, Any]]:
        """Load and verify a version (or alias) into a bundle."""
        meta = self.meta(ref)
        d = self.root / meta["version"]
        try:
            cfg = TwoTowerConfig.from_dict(json.loads((d / "model.json").read_text()))
            model = TwoTower(cfg)
            model.load_weights(torch.load(d / "weights.pt", weights_only=True))
            enc = json.loads((d / "encoders.json").read_text())
            with np.load(d / "freq.npz", allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
            bundle = ModelBundle(
                model, IdVocab.load(d / "user_vocab.npz"), IdVocab.load(d / "item_vocab.npz"),
                FeatureEncoder.from_dict(enc["user"]), FeatureEncoder.from_dict(enc["item"]),
                FrequencyEstimator.from_state(state), state["item_counts"].astype(np.float64),
                item_popularity(state))
        except pickle.UnpicklingError:
            # torch's message suggests weights_only=False: exactly what must never happen.
            raise CorruptVersionError(
                f"model version {meta['version']}: weights.pt holds objects, not only "
                "tensors; refusing to load it (it could run code)") from None
        except (OSError, ValueError, KeyError, RuntimeError, VocabError) as exc:
            raise CorruptVersionError(f"cannot load model version {meta['version']}: {exc}") \
                from exc
        if not all(torch.isfinite(t).all() for t in model.state_dict().values()
                   if t.is_floating_point()):
            raise CorruptVersionError(f"model version {meta['version']} has NaN/inf weights")
        return bundle, meta

    def set_aliases(self, **aliases: str | None) -> None:
        """Point aliases at versions, atomically and under the registry lock."""
        with self._locked():
            current = self.aliases()
            for name, version in aliases.items():
                if name not in ALIASES:
                    raise RegistryError(f"unknown alias {name!r}; known: {', '.join(ALIASES)}")
                if version is not None:
                    self.resolve(version)
                current[name] = version
            self._write_aliases(current)

    def promote(self, version: str) -> None:
        """Make ``version`` the champion; the old champion becomes ``previous``."""
        with self._locked():
            self.resolve(version)
            current = self.aliases()
            if current["champion"] != version:
                current.update(champion=version, previous=current["champion"])
                self._write_aliases(current)

    def _write_aliases(self, aliases: dict[str, str | None]) -> None:
        write_text_atomic(self.root / "aliases.json", json.dumps(aliases, indent=2))
