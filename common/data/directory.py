"""A data set directory (``common.data.contract``) read into a ``Dataset``, or written from
one. Every data set recstream trains on goes through here: MovieLens and the synthetic
generator write a directory into the data cache, ``recstream data import`` writes one from
someone's event log, and every command reads them the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common.data.contract import (
    EVENTS_DIR,
    DatasetSpec,
    TableDef,
    event_files,
    read_spec,
    table_file,
    write_spec,
)
from common.data.dataset import Dataset
from common.data.event_files import read_event_file, to_events
from common.data.feature_files import read_feature_table, write_feature_table
from common.data.tables import FeatureTable
from common.data.validate import BadRows

log = logging.getLogger(__name__)


def is_dataset_dir(path: Path) -> bool:
    return (Path(path) / "dataset.toml").is_file()


def read_directory(path: Path, rating_threshold: float | None = None
                   ) -> tuple[Dataset, BadRows]:
    """The data set in ``path`` and the rows left out of it, by kind."""
    path = Path(path)
    spec = read_spec(path)
    bad = BadRows()
    tables = [read_event_file(f, spec.columns, bad) for f in event_files(path)]
    events = to_events(tables, spec.name, spec.positive, rating_threshold)
    users = _table(path, "users", spec.users, bad)
    items = _table(path, "items", spec.items, bad)
    return Dataset(spec.name, events, users, items), bad


def load_directory(path: Path, rating_threshold: float | None = None) -> Dataset:
    """``read_directory``, with a warning naming each kind of row left out."""
    dataset, bad = read_directory(path, rating_threshold)
    if bad.total:
        log.warning("data set %s: %d bad row(s) left out: %s", path, bad.total,
                    "; ".join(bad.details()))
    return dataset


def _table(path: Path, stem: str, table_def: TableDef, bad: BadRows) -> FeatureTable:
    found = table_file(path, stem)
    if found is None:
        return FeatureTable.empty()
    return read_feature_table(found, table_def, bad)


def write_directory(dataset: Dataset, target: Path, spec: DatasetSpec) -> Path:
    """Write ``dataset`` as a data set directory at ``target``, all or nothing: it is built
    beside ``target`` and renamed into place (an existing ``target`` is replaced)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        ev = dataset.events
        (tmp / EVENTS_DIR).mkdir()
        pq.write_table(pa.table({
            "event_id": pa.array(ev.event_id.tolist(), pa.string()),
            "user_id": pa.array(ev.user_id.tolist(), pa.string()),
            "item_id": pa.array(ev.item_id.tolist(), pa.string()),
            "ts": pa.array(ev.ts_ms, pa.int64()).cast(pa.timestamp("ms", "UTC")),
            "event_type": pa.array(ev.event_type.tolist(), pa.string()),
            "value": pa.array(ev.value, pa.float32(), from_pandas=True),  # NaN -> null
        }), tmp / EVENTS_DIR / "part-00000.parquet")
        users = write_feature_table(dataset.users, tmp / "users.parquet", spec.users.id)
        items = write_feature_table(dataset.items, tmp / "items.parquet", spec.items.id)
        write_spec(tmp, DatasetSpec(spec.name, {}, spec.positive, users, items, spec.source))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing an older one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
