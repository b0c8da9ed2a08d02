"""The side-feature encoder: raw tables (``common.data.tables``) into index tensors.

A ``FeatureEncoder`` is fitted once on a table and saved with the model: it fixes
which value gets which embedding row (0 always means unknown/missing) and the
bucket edges of numeric fields, so unknown values at serving time degrade to
row 0 instead of failing.

>>> t = FeatureTable.build(
...     ["u1", "u2"],
...     (FieldSpec("gender", "categorical"), FieldSpec("age", "numeric", buckets=2)),
...     {"gender": ["F", "M"], "age": [20.0, 40.0]})
>>> enc = FeatureEncoder.fit(t)
>>> ef = enc.encode(t)
>>> ef.rows(["u2", "nobody"]).tolist()
[2, 0]
>>> ef.cat[2].tolist()  # gender=M, age in the upper bucket
[2, 2]
>>> cat, multi = enc.unpack(ef.packed(["u2"]))  # as published for serving
>>> cat.tolist()
[[2, 2]]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.data.tables import FeatureTable, FieldSpec


@dataclass
class EncodedFeatures:
    """Index tensors for every id of a table; row 0 is the all-unknown row."""

    row_of: dict[str, int]
    cat: torch.Tensor  # int64 [n+1, n_categorical + n_numeric]
    multi: list[torch.Tensor] = field(default_factory=list)  # each int64 [n+1, max_len]

    def rows(self, ids: Any) -> np.ndarray:
        """Feature rows for raw ids; ids without features get row 0."""
        get = self.row_of.get
        return np.fromiter((get(i, 0) for i in ids), dtype=np.int64, count=len(ids))

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # index_select rather than advanced indexing: same result, far cheaper kernel.
        return self.cat.index_select(0, rows), [m.index_select(0, rows) for m in self.multi]

    def packed(self, ids: Any) -> np.ndarray:
        """One int32 row per id (categorical indices, then each multi field's) for
        publishing; ``FeatureEncoder.unpack`` turns rows back into model inputs."""
        cat, multi = self.gather(torch.from_numpy(self.rows(ids)))
        return torch.cat([cat, *multi], dim=1).to(torch.int32).numpy()


@dataclass
class FeatureEncoder:
    """Value vocabularies and bucket edges, fitted on a table and saved with the model."""

    fields: tuple[FieldSpec, ...]
    vocabs: dict[str, dict[str, int]]
    edges: dict[str, list[float]]

    @classmethod
    def fit(cls, table: FeatureTable, min_count: int = 1) -> FeatureEncoder:
        vocabs: dict[str, dict[str, int]] = {}
        edges: dict[str, list[float]] = {}
        for f in table.fields:
            col = table.columns[f.name]
            if f.kind == "numeric":
                finite = col[np.isfinite(col)]
                qs = np.linspace(0, 1, f.buckets + 1)[1:-1]
                edges[f.name] = (sorted(set(np.quantile(finite, qs).tolist()))
                                 if len(finite) else [])
            else:
                values = (v for x in col for v in x) if f.kind == "multi" else \
                    (v for v in col if v is not None)
                counts = Counter(values)
                kept = sorted(v for v, c in counts.items() if c >= min_count)
                vocabs[f.name] = {v: i + 1 for i, v in enumerate(kept)}
        return cls(tuple(table.fields), vocabs, edges)

    @property
    def cat_fields(self) -> list[FieldSpec]:
        """Fields encoded as one index each (categorical, then numeric buckets)."""
        return ([f for f in self.fields if f.kind == "categorical"]
                + [f for f in self.fields if f.kind == "numeric"])

    @property
    def multi_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if f.kind == "multi"]

    def cardinalities(self) -> tuple[list[int], list[int]]:
        """Embedding rows needed per index column and per multi field (incl. row 0)."""
        cat = [len(self.vocabs[f.name]) + 1 if f.kind == "categorical"
               else len(self.edges[f.name]) + 2 for f in self.cat_fields]
        multi = [len(self.vocabs[f.name]) + 1 for f in self.multi_fields]
        return cat, multi

    @property
    def packed_width(self) -> int:
        """Columns of an ``EncodedFeatures.packed`` row."""
        return len(self.cat_fields) + sum(f.max_len for f in self.multi_fields)

    def unpack(self, packed: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Model inputs (categorical indices, multi-field rows) from packed rows."""
        if packed.shape[1] != self.packed_width:
            raise ValueError(f"packed feature rows have {packed.shape[1]} columns, this "
                             f"encoder expects {self.packed_width}")
        t = torch.from_numpy(packed.astype(np.int64))
        n_cat = len(self.cat_fields)
        bounds = np.cumsum([n_cat] + [f.max_len for f in self.multi_fields]).tolist()
        multi = [t[:, lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return t[:, :n_cat], multi

    def encode(self, table: FeatureTable) -> EncodedFeatures:
        n = len(table)
        cat = np.zeros((n + 1, len(self.cat_fields)), dtype=np.int64)
        for j, f in enumerate(self.cat_fields):
            col = table.columns.get(f.name)
            if col is None:
                continue
            if f.kind == "numeric":
                cat[1:, j] = self._bucketize(f.name, col)
            else:
                vocab = self.vocabs[f.name]
                cat[1:, j] = [vocab.get(v, 0) if v is not None else 0 for v in col]
        multi = []
        for f in self.multi_fields:
            m = np.zeros((n + 1, f.max_len), dtype=np.int64)
            col = table.columns.get(f.name)
            if col is not None:
                vocab = self.vocabs[f.name]
                for r, values in enumerate(col, start=1):
                    idx = [vocab[v] for v in values if v in vocab][: f.max_len]
                    m[r, : len(idx)] = idx
            multi.append(torch.from_numpy(m))
        row_of = {str(i): r for r, i in enumerate(table.ids, start=1)}
        return EncodedFeatures(row_of, torch.from_numpy(cat), multi)

    def _bucketize(self, name: str, col: np.ndarray) -> np.ndarray:
        edges = np.asarray(self.edges[name], dtype=np.float64)
        finite = np.isfinite(col)
        out = np.zeros(len(col), dtype=np.int64)
        out[finite] = np.searchsorted(edges, col[finite], side="right") + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "fields": [vars(f) for f in self.fields],
            "vocabs": self.vocabs,
            "edges": self.edges,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureEncoder:
        return cls(tuple(FieldSpec(**f) for f in d["fields"]), d["vocabs"], d["edges"])
