"""Raw side-feature tables keyed by id: the data a loader returns, before any encoding.

A ``FeatureTable`` holds raw values (strings, tuples of strings, floats); the model
layer's ``FeatureEncoder`` (``common.model.features``) turns it into index tensors.

>>> t = FeatureTable.build(["u1"], (FieldSpec("age", "numeric"),), {"age": [20.0]})
>>> len(t), t.columns["age"].dtype.name
(1, 'float64')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

FieldKind = Literal["categorical", "multi", "numeric"]


@dataclass(frozen=True)
class FieldSpec:
    """One side-feature field. ``buckets`` applies to numeric, ``max_len`` to multi."""

    name: str
    kind: FieldKind
    buckets: int = 10
    max_len: int = 8


@dataclass(frozen=True)
class FeatureTable:
    """Raw side features, one row per id.

    Columns: categorical → object array of str (None = missing); multi → object
    array of tuples of str; numeric → float64 array (NaN = missing).
    """

    ids: np.ndarray
    fields: tuple[FieldSpec, ...]
    columns: dict[str, np.ndarray]

    @classmethod
    def build(cls, ids: Any, fields: tuple[FieldSpec, ...],
              columns: dict[str, Any]) -> FeatureTable:
        ids_arr = np.asarray([str(i) for i in ids], dtype=object)
        cols: dict[str, np.ndarray] = {}
        for f in fields:
            raw = columns[f.name]
            if len(raw) != len(ids_arr):
                raise ValueError(f"feature column {f.name!r} has {len(raw)} rows, "
                                 f"expected {len(ids_arr)}")
            if f.kind == "numeric":
                cols[f.name] = np.asarray(raw, dtype=np.float64)
            elif f.kind == "multi":
                arr = np.empty(len(raw), dtype=object)
                arr[:] = [tuple(str(v) for v in (x or ())) for x in raw]
                cols[f.name] = arr
            else:
                cols[f.name] = np.asarray([None if v is None else str(v) for v in raw],
                                          dtype=object)
        return cls(ids_arr, tuple(fields), cols)

    @classmethod
    def empty(cls) -> FeatureTable:
        return cls(np.array([], dtype=object), (), {})

    def __len__(self) -> int:
        return len(self.ids)
