"""Event rows under the data contract: check a table of them, read the files of a data set
directory, and turn the clean rows into ``Events`` under the positive rule.

``clean_events`` is the one place rows are judged: the importer runs it on each batch it
streams from a source, the loader on each file it reads, so a directory that imported
clean also loads clean, and a hand-written one gets the same checks and the same report.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from common.data.contract import REQUIRED_EVENT_FIELDS, ContractError, PositiveRule
from common.data.events import CLICK, RATING, Events
from common.data.validate import (
    BadRows,
    as_strings,
    decode_text,
    id_problems,
    parse_timestamps,
    parse_values,
)
from common.data.wire import IMPRESSION

# The columns of a clean event table, as the importer writes them (ts as a timestamp).
CLEAN_SCHEMA = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                          ("ts", pa.timestamp("ms", "UTC")), ("event_type", pa.string()),
                          ("value", pa.float32())])


def clean_events(table: pa.Table, columns: Mapping[str, str], where: str, row0: int,
                 bad: BadRows, ts_format: str | None = None) -> pa.Table:
    """The good rows of ``table`` in ``CLEAN_SCHEMA`` (plus ``event_id``/``context`` where
    mapped); every other row is counted in ``bad``. ``columns`` maps contract fields to the
    table's column names; a required one the table lacks is a ``ContractError``."""
    def col(name: str) -> str | None:
        mapped = columns.get(name, name)
        if not mapped:
            return None
        if mapped in table.column_names:
            return mapped
        if name in REQUIRED_EVENT_FIELDS or name in columns:
            raise ContractError(f"{where}: no column {mapped!r} (for {name}); columns are "
                                f"{', '.join(table.column_names)}")
        return None

    n = table.num_rows
    rejected = np.zeros(n, dtype=bool)
    table = decode_text(table, where, row0, bad, rejected)
    user_c, item_c, ts_c = col("user_id"), col("item_id"), col("ts")
    assert user_c and item_c and ts_c
    users, items = as_strings(table[user_c], True), as_strings(table[item_c], True)
    u_missing, u_long = id_problems(users)
    i_missing, i_long = id_problems(items)
    ts_raw = table[ts_c]
    ts_missing = pc.is_null(ts_raw).to_numpy(zero_copy_only=False)
    if pa.types.is_string(ts_raw.type):
        ts_missing |= pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ts_raw), ""),
                                   False).to_numpy(zero_copy_only=False)
    bad.note("missing_field", u_missing, rejected, where, row0, user_c, None)
    bad.note("missing_field", i_missing, rejected, where, row0, item_c, None)
    bad.note("missing_field", ts_missing, rejected, where, row0, ts_c, None)
    bad.note("bad_id", u_long, rejected, where, row0, user_c, users)
    bad.note("bad_id", i_long, rejected, where, row0, item_c, items)
    ts_ms, ts_bad = parse_timestamps(ts_raw, ts_format)
    bad.note("bad_timestamp", ts_bad, rejected, where, row0, ts_c, ts_raw)
    value_c = col("value")
    if value_c is not None:
        values, v_bad = parse_values(table[value_c])
        bad.note("bad_value", v_bad, rejected, where, row0, value_c, table[value_c])
    else:
        values = np.full(n, np.nan)
    type_c = col("event_type")
    types = (as_strings(table[type_c], True) if type_c is not None
             else pa.nulls(n, pa.string()))
    out = {"user_id": users, "item_id": items,
           "ts": pa.array(ts_ms, pa.int64()).cast(pa.timestamp("ms", "UTC")),
           "event_type": types,
           "value": pa.array(values.astype(np.float32), from_pandas=True)}  # NaN -> null
    for extra in ("event_id", "context"):
        c = col(extra)
        if c is not None:
            out[extra] = as_strings(table[c])
    if "event_id" in out:  # a missing one is made up (to_events); a long one is bad
        bad.note("bad_id", id_problems(out["event_id"])[1], rejected, where, row0,
                 col("event_id") or "event_id", out["event_id"])
    clean = pa.table(out)
    return clean.filter(pa.array(~rejected)) if rejected.any() else clean


def read_event_file(path: Path, columns: Mapping[str, str], bad: BadRows,
                    ts_format: str | None = None) -> pa.Table:
    """One events/ file (Parquet or CSV), checked by ``clean_events``."""
    table = pq.read_table(path) if path.suffix == ".parquet" else read_csv_strings(path, bad)
    return clean_events(table, columns, str(path), 0, bad, ts_format)


def read_csv_strings(path: Path, bad: BadRows, delimiter: str = ",") -> pa.Table:
    """A CSV file with every column read as bytes (``decode_text`` makes them strings, the
    checks parse them); a line with the wrong number of fields is ``malformed_row``."""
    def malformed(row: pcsv.InvalidRow) -> str:
        bad.add("malformed_row", 1, f"{path}: {row.actual_columns} fields where the header "
                                    f"has {row.expected_columns}: {row.text[:60]!r}")
        return "skip"

    header = csv_header(path, delimiter)
    return pcsv.read_csv(
        path, parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=malformed),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in header},
                                            strings_can_be_null=True, null_values=[""]))


def csv_header(path: Path, delimiter: str = ",") -> list[str]:
    """The column names on a CSV file's first line."""
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        first = fh.readline()
    return next(csv.reader([first], delimiter=delimiter), [])


def to_events(tables: list[pa.Table], name: str, rule: PositiveRule,
              rating_threshold: float | None = None) -> Events:
    """Clean event tables → ``Events`` sorted by time, types mapped under ``rule``.

    ``click`` is always a positive, ``rating`` at or above the rating threshold,
    ``impression`` never; so ``value >= T`` makes valued events ratings (and others
    impressions), ``event_type in [...]`` makes those types clicks (others impressions),
    and no rule makes every event a click.
    """
    if rule.threshold is not None and rating_threshold is not None \
            and rule.threshold != rating_threshold:
        raise ContractError(f"data set {name!r} counts positives as {rule.text()!r}, but "
                            f"train.rating_threshold is {rating_threshold:g}: set "
                            f"RECSTREAM_TRAIN_RATING_THRESHOLD={rule.threshold:g}")
    table = _concat(tables)
    n = table.num_rows
    ts_ms = table["ts"].cast(pa.int64()).to_numpy()
    # Logs mostly come in time order: then nothing is gathered twice.
    order = None if n < 2 or bool(np.all(ts_ms[1:] >= ts_ms[:-1])) \
        else np.argsort(ts_ms, kind="stable")
    value = _in_order(table["value"].to_numpy().astype(np.float32), order)
    labels = np.array([CLICK, RATING, IMPRESSION], dtype=object)
    if rule.threshold is not None:
        code = np.where(np.isfinite(value), 1, 2)
    elif rule.types is not None:
        is_pos = pc.fill_null(pc.is_in(_plain(table["event_type"]), pa.array(rule.types)),
                              False)
        code = np.where(_in_order(is_pos.to_numpy(zero_copy_only=False), order), 0, 2)
    else:
        code = np.zeros(n, dtype=np.int64)
    # Events without an id get "<name>-<row>", row: its place among the loaded events in
    # file order (bad rows left out), so the same files always give the same ids.
    rows = pa.array(np.arange(n) if order is None else order)
    made = pc.binary_join_element_wise(f"{name}-", rows.cast(pa.string()), "")
    if "event_id" in table.column_names:
        given = _plain(table["event_id"])
        given = given if order is None else given.take(rows)
        event_id = pc.coalesce(given, made) if given.null_count else given
    else:
        event_id = made
    return Events(_objects(event_id, None), _objects(table["user_id"], order),
                  _objects(table["item_id"], order), labels[code], value,
                  _in_order(ts_ms, order))


def _in_order(values: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    return values if order is None else values[order]


def _concat(tables: list[pa.Table]) -> pa.Table:
    if not tables:
        return CLEAN_SCHEMA.empty_table()
    if all(t.schema.equals(tables[0].schema) for t in tables):
        return pa.concat_tables(tables)
    # Files of different kinds (a dictionary column from Parquet, plain from CSV): plain.
    plain = [pa.table({c: _plain(t[c]) for c in t.column_names}) for t in tables]
    return pa.concat_tables(plain, promote_options="permissive")


def _plain(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    return arr.cast(arr.type.value_type) if pa.types.is_dictionary(arr.type) else arr


def _objects(arr: pa.ChunkedArray | pa.Array, order: np.ndarray | None) -> np.ndarray:
    """Strings → an object array (in ``order``). One str per row: at 10M events this is
    ~0.7 s a column, where sharing one str per distinct id through a dictionary took 3 s
    (hashing 10M strings) for a saving of memory only."""
    values = _plain(arr if isinstance(arr, pa.ChunkedArray) else pa.chunked_array([arr]))
    out = np.asarray(values.to_numpy(zero_copy_only=False), dtype=object)
    return _in_order(out, order)
