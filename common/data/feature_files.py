"""The users and items files of a data set directory: read (checked) into a ``FeatureTable``
and write one back. Kinds map onto ``FieldSpec``'s own: categorical and numeric as they
are, multi-valued as ``multi``, text as a ``multi`` field of its lower-cased word tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.data.contract import ContractError, FieldDef, TableDef
from common.data.event_files import read_csv_strings
from common.data.tables import FeatureTable
from common.data.validate import BadRows, as_strings, decode_text, id_problems, parse_values

_TOKEN = re.compile(r"\w+")


def read_feature_table(path: Path, table_def: TableDef, bad: BadRows) -> FeatureTable:
    """``users.*`` or ``items.*`` as a ``FeatureTable`` of ``table_def``'s fields; rows with
    a missing, over-long or repeated id or a feature of the wrong kind are counted in
    ``bad`` and left out."""
    where = str(path)
    table = pq.read_table(path) if path.suffix == ".parquet" else read_csv_strings(path, bad)
    wanted = [table_def.id] + [f.source for f in table_def.fields]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise ContractError(f"{where}: no column(s) {', '.join(map(repr, missing))}; columns "
                            f"are {', '.join(table.column_names)}")
    rejected = np.zeros(table.num_rows, dtype=bool)
    table = decode_text(table, where, 0, bad, rejected)
    ids = as_strings(table[table_def.id])
    id_missing, id_long = id_problems(ids)
    bad.note("missing_field", id_missing, rejected, where, 0, table_def.id, None)
    bad.note("bad_id", id_long, rejected, where, 0, table_def.id, ids)
    columns: dict[str, np.ndarray] = {}
    for f in table_def.fields:
        raw = table[f.source]
        if f.kind == "numeric":
            values, wrong = parse_values(raw)
            bad.note("bad_feature", wrong, rejected, where, 0, f.source, raw)
            columns[f.name] = values
        elif f.kind == "categorical":
            text = pc.utf8_trim_whitespace(as_strings(raw))
            text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
            columns[f.name] = np.asarray(text.to_numpy(zero_copy_only=False), dtype=object)
        else:
            lists = np.empty(len(raw), dtype=object)
            lists[:] = _lists(raw, f)
            columns[f.name] = lists
    id_arr = np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object)
    duplicate = np.zeros(len(id_arr), dtype=bool)
    if pc.count_distinct(ids).as_py() + ids.null_count < len(id_arr):  # else none repeats
        first: set[str] = set()
        for k, i in enumerate(id_arr.tolist()):
            if not rejected[k]:
                duplicate[k] = i in first
                first.add(i)
    bad.note("duplicate_id", duplicate, rejected, where, 0, table_def.id, ids)
    keep = np.flatnonzero(~rejected)
    # Built directly in FeatureTable's column types (FeatureTable.build would coerce every
    # value again in Python: a second per 1M users).
    return FeatureTable(id_arr[keep], tuple(f.spec() for f in table_def.fields),
                        {name: col[keep] for name, col in columns.items()})


def _lists(raw: pa.ChunkedArray, f: FieldDef) -> list[tuple[str, ...]]:
    """A multi or text column: Parquet lists as they are, strings split on ``sep`` (multi)
    or into lower-cased word tokens (text)."""
    if pa.types.is_list(raw.type) or pa.types.is_large_list(raw.type):
        return [tuple(str(v) for v in (x or ()) if v is not None and str(v) != "")
                for x in raw.to_pylist()]
    texts = as_strings(raw).to_pylist()
    if f.kind == "text":
        return [tuple(_TOKEN.findall(t.lower())) if t else () for t in texts]
    return [tuple(p.strip() for p in t.split(f.sep) if p.strip()) if t else ()
            for t in texts]


def write_feature_table(table: FeatureTable, path: Path, id_name: str) -> TableDef:
    """``table`` as Parquet at ``path``; returns its ``[users]``/``[items]`` definition."""
    cols: dict[str, pa.Array] = {id_name: pa.array(table.ids.tolist(), pa.string())}
    fields = []
    for spec in table.fields:
        col = table.columns[spec.name]
        if spec.kind == "numeric":
            cols[spec.name] = pa.array(col, pa.float64(), from_pandas=True)
            fields.append(FieldDef(spec.name, "numeric", buckets=spec.buckets))
        elif spec.kind == "multi":
            cols[spec.name] = pa.array([list(v) for v in col], pa.list_(pa.string()))
            fields.append(FieldDef(spec.name, "multi", max_len=spec.max_len))
        else:
            cols[spec.name] = pa.array(col.tolist(), pa.string())
            fields.append(FieldDef(spec.name, "categorical"))
    pq.write_table(pa.table(cols), path)
    return TableDef(id_name, tuple(fields))
