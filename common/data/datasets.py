"""``--dataset``: a data set directory, or one of the names ``ml-100k``, ``ml-1m`` and
``synthetic``, shortcuts to a directory in the data cache that this module writes from the
MovieLens files or the generator the first time (and again when the code that writes it
changed). Either way the data comes through ``common.data.directory``: one code path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.data import contract, directory, event_files, feature_files, movielens, synthetic
from common.data.contract import ContractError, DatasetSpec, PositiveRule, TableDef, read_spec
from common.data.dataset import Dataset
from common.data.directory import is_dataset_dir, load_directory, write_directory
from common.data.movielens import (
    DataFormatError,
    detect_grouplens_format,
    fetch_ml100k,
    load_grouplens,
    load_recbole_ml100k,
)
from common.data.synthetic import SyntheticConfig, generate

DATASET_NAMES = ("ml-100k", "ml-1m", "synthetic")
CACHE_SUBDIR = "datasets"
# MovieLens ratings: 4 and 5 stars are positives (train.rating_threshold's default).
MOVIELENS_RULE = PositiveRule(threshold=4.0)
_WRITERS = (contract, directory, event_files, feature_files, movielens, synthetic)


def load_dataset(name: str, cache_dir: Path, path: Path | None = None,
                 rating_threshold: float | None = None, **synthetic_kwargs: Any) -> Dataset:
    """A data set directory, or ``ml-100k`` (fetched, or GroupLens files at ``path``),
    ``ml-1m`` (from ``path``, or cached by an earlier call with one) or ``synthetic``
    (``synthetic_kwargs`` go to ``SyntheticConfig``). With ``rating_threshold``, a
    ``value >= T`` rule must agree with it."""
    return load_directory(dataset_dir(name, cache_dir, path, **synthetic_kwargs),
                          rating_threshold)


def dataset_dir(name: str, cache_dir: Path, path: Path | None = None,
                **synthetic_kwargs: Any) -> Path:
    """The directory ``name`` stands for, written into the cache first where needed."""
    if name not in DATASET_NAMES:
        if is_dataset_dir(Path(name)):
            if path is not None or synthetic_kwargs:
                raise ValueError(f"{name} is a data set directory: --path and generator "
                                 f"options do not apply to it")
            return Path(name)
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}"
                         f", or a directory holding {contract.SPEC_FILE}")
    if synthetic_kwargs and name != "synthetic":
        raise ValueError(f"generator options {sorted(synthetic_kwargs)} apply to 'synthetic' "
                         f"only, not {name!r}")
    root = Path(cache_dir) / CACHE_SUBDIR
    if name == "synthetic":
        if path is not None:
            raise ValueError("the synthetic data set is generated and reads no path")
        config = SyntheticConfig(**synthetic_kwargs)
        key = json.dumps(asdict(config), sort_keys=True)
        target = root / ("synthetic" if not synthetic_kwargs else f"synthetic-{_hash(key)[:12]}")
        rule = PositiveRule() if config.click_only else MOVIELENS_RULE
        return _cached(target, f"synthetic {_hash(key, _code())}", rule,
                       lambda: generate(config).dataset)
    if path is None:
        if name == "ml-1m":
            cached = root / name
            if is_dataset_dir(cached) and read_spec(cached).source.startswith("ml-1m "):
                return cached
            raise ValueError("ml-1m is not downloadable here: pass the path of a directory "
                             "holding GroupLens' ratings.dat, users.dat and movies.dat")
        raw = fetch_ml100k(cache_dir)
        return _cached(root / name, f"ml-100k recbole {_hash(_code())}", MOVIELENS_RULE,
                       lambda: load_recbole_ml100k(raw))
    found = detect_grouplens_format(path)
    if found != name:
        raise DataFormatError(f"{path} holds GroupLens {found}, not {name}")
    files = movielens.GROUPLENS_FILES[name]
    stamp = [(f, (Path(path) / f).stat().st_size, (Path(path) / f).stat().st_mtime_ns)
             for f in files]
    source = f"{name} grouplens {_hash(str(Path(path).resolve()), repr(stamp), _code())}"
    return _cached(root / name, source, MOVIELENS_RULE, lambda: load_grouplens(path))


def _cached(target: Path, source: str, rule: PositiveRule, build: Any) -> Path:
    """``target`` if it was written from ``source``, else (re)written from ``build()``."""
    if is_dataset_dir(target):
        try:
            if read_spec(target).source == source:
                return target
        except ContractError:
            pass  # unreadable: rewrite it
    dataset: Dataset = build()
    spec = DatasetSpec(dataset.name, {}, rule, TableDef("user_id"), TableDef("item_id"), source)
    try:
        return write_directory(dataset, target, spec)
    except OSError:
        # Another process wrote the same directory between our check and our rename.
        if is_dataset_dir(target) and read_spec(target).source == source:
            return target
        raise


def _code() -> str:
    """A digest of the modules that decide what a cached directory holds."""
    return _hash(*(Path(m.__file__).read_text(encoding="utf-8") for m in _WRITERS
                   if m.__file__))


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
