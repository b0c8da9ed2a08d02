"""The data contract: what a data set directory holds, and its ``dataset.toml``.

A data set is a directory::

    dataset.toml           name, event column mapping, positive rule, feature fields
    events/                one or more .parquet or .csv files (read in name order)
    users.parquet|csv      optional: one row per user, the user feature fields
    items.parquet|csv      optional: one row per item, the item feature fields

Event files have the columns ``user_id``, ``item_id``, ``ts`` and optionally
``event_type``, ``value``, ``event_id`` and ``context`` (kept, not read by training yet).
``[events]`` in ``dataset.toml`` maps these names onto the files' own column names. ``ts``
is a Parquet timestamp, epoch seconds or epoch milliseconds (told apart by magnitude: both
must fall in 1990..2100, the wire contract's range) or an ISO-8601 string (without a zone
it is UTC). Ids are strings of 1..256 characters.

The positive rule says which events are positives; it is one of

- nothing (the default): every event is a positive;
- ``value >= T``: events with a finite value are ratings, positive at or above ``T``
  (MovieLens: ``value >= 4``, the same positives as ``train.rating_threshold = 4``);
- ``event_type in [click, like]``: events of those types are positives, others are not.

Loading maps the rule onto the event types the rest of recstream knows (``click`` is
always a positive, ``rating`` is one at or above ``train.rating_threshold``, and
``impression`` never is), so the trainer, the stream and the evaluation need no second
notion of a positive. A ``value >= T`` rule therefore needs ``T`` to equal the
``train.rating_threshold`` setting; loading says so when they differ.

Feature fields (``[[users.fields]]`` / ``[[items.fields]]``) name a column and its kind:
``categorical`` (one string), ``multi`` (several strings: a Parquet list, or a string
split on ``sep``, default ``|``), ``numeric`` (a number, bucketed into ``buckets``
quantile buckets; empty is missing) or ``text`` (a string, lower-cased and split into
word tokens, at most ``max_len``; a ``multi`` field to the model). An example::

    name = "shop"

    [events]
    user_id = "customer"
    item_id = "sku"
    ts = "time"
    event_type = "action"
    positive = "event_type in [purchase, add_to_cart]"

    [items]
    id = "sku"
    fields = [
      {name = "brand", kind = "categorical"},
      {name = "tags", kind = "multi", max_len = 6},
      {name = "price", kind = "numeric", buckets = 8},
      {name = "title", kind = "text", max_len = 12},
    ]
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.data.tables import FieldSpec

SPEC_FILE = "dataset.toml"
EVENTS_DIR = "events"
EVENT_FIELDS = ("user_id", "item_id", "ts", "event_type", "value", "event_id", "context")
REQUIRED_EVENT_FIELDS = ("user_id", "item_id", "ts")
FIELD_KINDS = ("categorical", "multi", "numeric", "text")
TABLE_SUFFIXES = (".parquet", ".csv")
MAX_ID_CHARS = 256

_RULE_VALUE = re.compile(r"^\s*value\s*>=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_RULE_TYPES = re.compile(r"^\s*event_type\s+in\s*\[(.*)\]\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ContractError(ValueError):
    """A data set directory, or a file in it, breaks the contract; the message names the
    file (and the row and column where there is one)."""


@dataclass(frozen=True)
class PositiveRule:
    """Which events are positives: all of them, ``value >= threshold``, or ``types``."""

    threshold: float | None = None
    types: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str | None) -> PositiveRule:
        """``""``/None, ``value >= 4`` or ``event_type in [click, like]``.

        >>> PositiveRule.parse("event_type in [click, 'like']").types
        ('click', 'like')
        >>> PositiveRule.parse("value >= 4").threshold
        4.0
        """
        if text is None or not text.strip():
            return cls()
        if m := _RULE_VALUE.match(text):
            return cls(threshold=float(m.group(1)))
        if m := _RULE_TYPES.match(text):
            types = tuple(t.strip().strip("'\"") for t in m.group(1).split(",") if t.strip())
            if types and all(types):
                return cls(types=types)
        raise ContractError(f"positive rule {text!r} is not one of: 'value >= NUMBER', "
                            f"'event_type in [a, b]', or empty (every event a positive)")

    def text(self) -> str:
        if self.threshold is not None:
            return f"value >= {self.threshold:g}"
        if self.types is not None:
            return f"event_type in [{', '.join(self.types)}]"
        return ""


@dataclass(frozen=True)
class FieldDef:
    """One feature field of the users or items file (see the module docstring)."""

    name: str
    kind: str
    column: str = ""  # the file's column; default: ``name``
    buckets: int = 10
    max_len: int = 8
    sep: str = "|"

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ContractError(f"feature field {self.name!r}: kind {self.kind!r} is not one "
                                f"of {', '.join(FIELD_KINDS)}")
        if self.buckets < 1 or self.max_len < 1 or not self.sep:
            raise ContractError(f"feature field {self.name!r}: buckets and max_len must be "
                                f"at least 1 and sep non-empty")

    @property
    def source(self) -> str:
        return self.column or self.name

    def spec(self) -> FieldSpec:
        """The model's field: ``text`` is a ``multi`` field of tokens."""
        kind = "multi" if self.kind == "text" else self.kind
        return FieldSpec(self.name, kind, buckets=self.buckets, max_len=self.max_len)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TableDef:
    """The users or items file: its id column and feature fields."""

    id: str
    fields: tuple[FieldDef, ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``dataset.toml``."""

    name: str
    columns: dict[str, str] = field(default_factory=dict)  # contract field -> file column
    positive: PositiveRule = PositiveRule()
    users: TableDef = TableDef("user_id")
    items: TableDef = TableDef("item_id")
    source: str = ""  # what wrote the directory (a cache checks it is still current)

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


def read_spec(directory: Path) -> DatasetSpec:
    """Parse and check ``directory/dataset.toml``."""
    path = Path(directory) / SPEC_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContractError(f"{directory} is not a data set directory: it has no "
                            f"{SPEC_FILE}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ContractError(f"{path}: not valid TOML: {exc}") from None
    try:
        return _spec(raw, Path(directory).name)
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ContractError(f"{path}: {exc}") from None


def _spec(raw: dict[str, Any], default_name: str) -> DatasetSpec:
    unknown = set(raw) - {"name", "source", "events", "users", "items"}
    if unknown:
        raise ContractError(f"unknown key(s) {', '.join(sorted(unknown))}")
    name = str(raw.get("name", default_name))
    if not _NAME.match(name):
        raise ContractError(f"name {name!r} must be 1..64 letters, digits, '.', '_' or '-'")
    events = dict(raw.get("events", {}))
    rule = PositiveRule.parse(events.pop("positive", None))
    bad = set(events) - set(EVENT_FIELDS)
    if bad:
        raise ContractError(f"[events] maps unknown field(s) {', '.join(sorted(bad))}; the "
                            f"contract's are {', '.join(EVENT_FIELDS)}")
    columns = {k: str(v) for k, v in events.items()}
    if rule.types is not None and columns.get("event_type") == "":
        raise ContractError("the positive rule reads event_type, which is mapped to nothing")
    return DatasetSpec(name, columns, rule, _table(raw.get("users", {}), "user_id", "users"),
                       _table(raw.get("items", {}), "item_id", "items"),
                       str(raw.get("source", "")))


def _table(raw: dict[str, Any], default_id: str, what: str) -> TableDef:
    unknown = set(raw) - {"id", "fields"}
    if unknown:
        raise ContractError(f"[{what}] has unknown key(s) {', '.join(sorted(unknown))}")
    fields = tuple(FieldDef(**f) for f in raw.get("fields", []))
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ContractError(f"[{what}] names a field twice: {names}")
    return TableDef(str(raw.get("id", default_id)), fields)


def write_spec(directory: Path, spec: DatasetSpec) -> Path:
    """Write ``spec`` as ``directory/dataset.toml`` (what ``read_spec`` reads back)."""
    lines = [f"name = {_q(spec.name)}"]
    if spec.source:
        lines.append(f"source = {_q(spec.source)}")
    lines += ["", "[events]"]
    lines += [f"{k} = {_q(v)}" for k, v in spec.columns.items()]
    if spec.positive.text():
        lines.append(f"positive = {_q(spec.positive.text())}")
    for what, table in (("users", spec.users), ("items", spec.items)):
        lines += ["", f"[{what}]", f"id = {_q(table.id)}", "fields = ["]
        for f in table.fields:
            extra = [f"column = {_q(f.column)}"] if f.column else []
            if f.kind == "numeric":
                extra.append(f"buckets = {f.buckets}")
            if f.kind in ("multi", "text"):
                extra.append(f"max_len = {f.max_len}")
            if f.kind == "multi" and f.sep != "|":
                extra.append(f"sep = {_q(f.sep)}")
            lines.append("  {" + ", ".join([f"name = {_q(f.name)}", f"kind = {_q(f.kind)}",
                                             *extra]) + "},")
        lines.append("]")
    path = Path(directory) / SPEC_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _q(text: str) -> str:
    # A JSON string is a valid TOML basic string for everything json.dumps emits.
    return json.dumps(text, ensure_ascii=False)


def table_file(directory: Path, stem: str) -> Path | None:
    """``users.parquet`` or ``users.csv`` (not both), or None when there is neither."""
    found = [Path(directory) / f"{stem}{s}" for s in TABLE_SUFFIXES
             if (Path(directory) / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise ContractError(f"{directory} holds both {found[0].name} and {found[1].name}; "
                            f"keep one")
    return found[0] if found else None


def event_files(directory: Path) -> list[Path]:
    """The event files of a data set directory, in name order."""
    events = Path(directory) / EVENTS_DIR
    if not events.is_dir():
        raise ContractError(f"{directory} has no {EVENTS_DIR}/ directory")
    files = sorted(p for p in events.iterdir() if p.is_file() and p.suffix in TABLE_SUFFIXES)
    if not files:
        raise ContractError(f"{events} holds no .parquet or .csv files")
    return files
