"""``recstream data import``: someone's event log (CSV, Parquet or JSON lines; one file or a
directory of them) into a data set directory under the contract, checked row by row.

The source is streamed in blocks, so its size is bounded by disk, not memory. Every bad row
is counted by kind (``common.data.validate.BAD_KINDS``) and reported with the first example
of each kind; every good row lands. The directory appears only when the import finished.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from common.data.contract import (
    EVENTS_DIR,
    ContractError,
    DatasetSpec,
    FieldDef,
    PositiveRule,
    TableDef,
    write_spec,
)
from common.data.directory import replace_dir
from common.data.event_files import clean_events, csv_header, read_csv_strings
from common.data.feature_files import read_feature_table, write_feature_table
from common.data.validate import BadRows, decode_text, parse_values

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
BLOCK_BYTES = 8 << 20
JSON_LINES_PER_BLOCK = 200_000


@dataclass(frozen=True)
class ImportOptions:
    """Where the contract's fields are in the source, and how to read it."""

    user_col: str = "user_id"
    item_col: str = "item_id"
    ts_col: str = "ts"
    value_col: str | None = None  # None: "value" if the source has it
    type_col: str | None = None  # None: "event_type" if the source has it
    ts_format: str | None = None  # strptime format; None: ISO-8601 or epoch s/ms
    positive: str = ""  # the positive rule; "" = every event
    name: str | None = None  # default: the target directory's name
    delimiter: str = ","
    users: Path | None = None
    items: Path | None = None
    user_fields: str | None = None  # "age:numeric:6,gender,tags:multi"; None: inferred
    item_fields: str | None = None


@dataclass
class ImportReport:
    target: Path
    events: int = 0
    users: int = 0
    items: int = 0
    bad: BadRows = field(default_factory=BadRows)
    seconds: float = 0.0

    def line(self) -> str:
        return (f"imported {self.events:,} events, {self.users:,} users, {self.items:,} "
                f"items into {self.target} in {self.seconds:.1f} s; bad rows: "
                f"{self.bad.summary()}")


def import_events(source: Path, target: Path, opts: ImportOptions = ImportOptions()
                  ) -> ImportReport:
    """Import ``source`` into the new data set directory ``target``."""
    start = time.perf_counter()
    source, target = Path(source), Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ContractError(f"{target} exists and is not empty: import into a new directory")
    files = source_files(source)
    rule = PositiveRule.parse(opts.positive)
    name = opts.name or _name(target)
    report = ImportReport(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / EVENTS_DIR).mkdir()
        report.events = _write_events(files, tmp / EVENTS_DIR / "part-00000.parquet", opts,
                                      rule, report.bad)
        users = _copy_table(opts.users, tmp / "users.parquet", opts.user_col, "user_id",
                            opts.user_fields, report.bad)
        items = _copy_table(opts.items, tmp / "items.parquet", opts.item_col, "item_id",
                            opts.item_fields, report.bad)
        report.users, report.items = users[1], items[1]
        write_spec(tmp, DatasetSpec(name, {}, rule, users[0], items[0],
                                    f"import of {source.resolve()}"))
        if target.exists():
            target.rmdir()
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - start
    return report


def source_files(source: Path) -> list[Path]:
    """``source`` itself, or the event files directly in it (name order)."""
    known = CSV_SUFFIXES + PARQUET_SUFFIXES + JSON_SUFFIXES
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix in known)
        if not files:
            raise ContractError(f"{source} holds no {', '.join(known)} files")
        return files
    if not source.is_file():
        raise ContractError(f"{source}: no such file or directory")
    if source.suffix not in known:
        raise ContractError(f"{source}: unknown format {source.suffix!r}; expected one of "
                            f"{', '.join(known)}")
    return [source]


def _name(target: Path) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in target.name)
    return cleaned.lstrip("._-")[:64] or "dataset"


def _mapping(opts: ImportOptions) -> dict[str, str]:
    cols = {"user_id": opts.user_col, "item_id": opts.item_col, "ts": opts.ts_col}
    if opts.value_col:
        cols["value"] = opts.value_col
    if opts.type_col:
        cols["event_type"] = opts.type_col
    return cols


def _write_events(files: list[Path], out: Path, opts: ImportOptions, rule: PositiveRule,
                  bad: BadRows) -> int:
    """Read every block here; check and write it on a second thread (Arrow kernels and
    Parquet writes release the GIL), so reading block k+1 overlaps block k's checks."""
    sink = _EventSink(out, _mapping(opts), rule, opts.ts_format, bad)
    try:
        for batch, where, row0 in _batches(files, opts, bad):
            sink.put(batch, where, row0)
    finally:
        sink.close()
    if sink.writer is None:
        raise ContractError(f"{files[0]}: no events to import")
    return sink.rows


class _EventSink:
    """Blocks checked by ``clean_events`` and appended to one Parquet file, on one worker
    thread, one block in flight; a worker's error comes out of the next ``put``/``close``."""

    def __init__(self, out: Path, columns: dict[str, str], rule: PositiveRule,
                 ts_format: str | None, bad: BadRows) -> None:
        self.out, self.columns, self.rule, self.ts_format, self.bad = \
            out, columns, rule, ts_format, bad
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future[None] | None = None

    def put(self, batch: pa.Table, where: str, row0: int) -> None:
        self._wait()
        self._pending = self._pool.submit(self._write, batch, where, row0)

    def _write(self, batch: pa.Table, where: str, row0: int) -> None:
        clean = clean_events(batch, self.columns, where, row0, self.bad, self.ts_format)
        if self.writer is None:
            _check_rule(self.rule, clean, where)
            # Plain strings, no compression: dictionary-encoding the ids here cost more
            # than the CSV read itself, and the loader makes its own strings anyway.
            self.writer = pq.ParquetWriter(self.out, clean.schema, compression="none",
                                           write_statistics=False,
                                           use_dictionary=["event_type", "value"])
        self.writer.write_table(_conform(clean, self.writer.schema))
        self.rows += clean.num_rows

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()
            if self.writer is not None:
                self.writer.close()


def _conform(clean: pa.Table, schema: pa.Schema) -> pa.Table:
    """``clean`` with exactly ``schema``'s columns (a later file or block may lack an
    optional one, or have one the first did not: that one is not kept)."""
    cols = [clean[f.name] if f.name in clean.column_names
            else pa.nulls(clean.num_rows, f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def _check_rule(rule: PositiveRule, clean: pa.Table, where: str) -> None:
    if rule.threshold is not None and "value" not in _present(clean):
        raise ContractError(f"{where}: the positive rule {rule.text()!r} needs a value "
                            f"column (--value-col)")
    if rule.types is not None and "event_type" not in _present(clean):
        raise ContractError(f"{where}: the positive rule {rule.text()!r} needs an event "
                            f"type column (--type-col)")


def _present(clean: pa.Table) -> set[str]:
    return {c for c in clean.column_names if clean[c].null_count < clean.num_rows
            or clean.num_rows == 0}


def _batches(files: list[Path], opts: ImportOptions, bad: BadRows
             ) -> Iterator[tuple[pa.Table, str, int]]:
    """(block, file name, rows of that file before the block) over every source file."""
    for path in files:
        row0 = 0
        for block in _file_blocks(path, opts, bad):
            yield block, str(path), row0
            row0 += block.num_rows


def _wanted(opts: ImportOptions) -> list[str]:
    cols = [opts.user_col, opts.item_col, opts.ts_col, opts.value_col or "value",
            opts.type_col or "event_type", "event_id", "context"]
    return list(dict.fromkeys(cols))


def _file_blocks(path: Path, opts: ImportOptions, bad: BadRows) -> Iterator[pa.Table]:
    wanted = _wanted(opts)
    if path.suffix in PARQUET_SUFFIXES:
        pf = pq.ParquetFile(path)
        present = [c for c in wanted if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=1 << 20, columns=present):
            yield pa.Table.from_batches([batch])
    elif path.suffix in JSON_SUFFIXES:
        yield from _json_blocks(path, wanted, bad)
    else:
        yield from _csv_blocks(path, wanted, opts.delimiter, bad)


def _csv_blocks(path: Path, wanted: list[str], delimiter: str, bad: BadRows
                ) -> Iterator[pa.Table]:
    def malformed(row: pcsv.InvalidRow) -> str:
        bad.add("malformed_row", 1, f"{path}: {row.actual_columns} fields where the header "
                                    f"has {row.expected_columns}: {row.text[:60]!r}")
        return "skip"

    parse = pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=malformed)
    header = csv_header(path, delimiter)
    present = [c for c in wanted if c in header]
    reader = pcsv.open_csv(
        path, read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES), parse_options=parse,
        convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in present},
                                            include_columns=present,
                                            strings_can_be_null=True, null_values=[""]))
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _json_blocks(path: Path, wanted: list[str], bad: BadRows) -> Iterator[pa.Table]:
    """JSON lines, each an object; values become strings for the checks to parse (a line
    that is not an object is ``malformed_row``)."""
    with path.open("rb") as fh:
        line_no = 0
        while True:
            lines = fh.readlines(BLOCK_BYTES)
            if not lines:
                return
            cols: dict[str, list[str | None]] = {c: [] for c in wanted}
            for line in lines:
                line_no += 1
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict):
                    bad.add("malformed_row", 1, f"{path}, line {line_no}: not a JSON object: "
                                                f"{line[:60]!r}")
                    continue
                for c in wanted:
                    cols[c].append(_json_text(obj.get(c)))
            # event_id and context only where some line has them (see to_events).
            present = {c: v for c, v in cols.items()
                       if c not in ("event_id", "context") or any(x is not None for x in v)}
            yield pa.table({c: pa.array(v, pa.string()) for c, v in present.items()})


def _json_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return orjson.dumps(value).decode()


def _copy_table(path: Path | None, out: Path, id_col: str, default_id: str,
                fields: str | None, bad: BadRows) -> tuple[TableDef, int]:
    """A users or items file checked into ``out`` (Parquet); its definition and row count."""
    if path is None:
        return TableDef(default_id), 0
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: no such file")
    if path.suffix in PARQUET_SUFFIXES:
        raw = pq.read_table(path)
    else:
        # Only to infer kinds: its bad rows are counted when the file is read for real.
        raw = read_csv_strings(path, BadRows())
        raw = decode_text(raw, str(path), 0, BadRows(), np.zeros(raw.num_rows, dtype=bool))
    id_name = id_col if id_col in raw.column_names else default_id
    if id_name not in raw.column_names:
        raise ContractError(f"{path}: no id column {id_col!r} (columns are "
                            f"{', '.join(raw.column_names)})")
    defs = parse_fields(fields, path) if fields else infer_fields(raw, id_name)
    table = read_feature_table(path, TableDef(id_name, defs), bad)
    return write_feature_table(table, out, default_id), len(table)


def parse_fields(text: str, where: Path | str) -> tuple[FieldDef, ...]:
    """``age:numeric:6,gender,tags:multi:5,title:text`` → field definitions (kind defaults
    to categorical; the number is buckets for numeric, max_len for multi and text)."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        bits = part.split(":")
        name, kind = bits[0], bits[1] if len(bits) > 1 else "categorical"
        try:
            size = int(bits[2]) if len(bits) > 2 else None
        except ValueError:
            raise ContractError(f"{where}: field {part!r}: {bits[2]!r} is not a number") \
                from None
        if kind == "numeric":
            out.append(FieldDef(name, kind, **({"buckets": size} if size else {})))
        else:
            out.append(FieldDef(name, kind, **({"max_len": size} if size else {})))
    return tuple(out)


def infer_fields(table: pa.Table, id_name: str) -> tuple[FieldDef, ...]:
    """Every column but the id: numeric when every value is a number, multi when values
    hold ``|`` (or are lists), text when they are long and spaced, else categorical."""
    out = []
    for name in table.column_names:
        if name == id_name:
            continue
        col = table[name]
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            out.append(FieldDef(name, "multi"))
            continue
        values, wrong = parse_values(col)
        if not wrong.any() and (values == values).any():
            out.append(FieldDef(name, "numeric"))
            continue
        texts = [t for t in col.cast(pa.string()).to_pylist()[:10_000] if t]
        if any("|" in t for t in texts):
            out.append(FieldDef(name, "multi"))
        elif texts and sum(len(t) for t in texts) / len(texts) > 24 \
                and sum(" " in t for t in texts) > len(texts) / 2:
            out.append(FieldDef(name, "text", max_len=16))
        else:
            out.append(FieldDef(name, "categorical"))
    return tuple(out)
