"""Data import throughput: ``recstream data import`` of a generated CSV event log against
pyarrow's own ``read_csv`` of the same file in the same run, and the time to load the
imported directory for training.

    python bench/data_import.py --events 10000000 --json bench/results/data_import.json

The log: N events of U users and I items (power-law activity and popularity), columns
``user_id,item_id,ts,event_type,value`` with epoch-second timestamps in time order
(``--shuffled``: random order, which the loader must sort), a view/click/like
type and a 1..5 value on a third of the rows; plus ``users.csv`` (age, region) and
``items.csv`` (category, tags, price). Per core is per CPU second of the process
(``time.process_time``, all its threads), so a reader that uses two cores is not
credited twice; the ratio to pyarrow is taken both on wall time and on CPU time. The
generated files live in a temporary directory and are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/harness.py puts the repository root on sys.path for the project imports below.
import harness
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from common.data.importer import ImportOptions, import_events

T0 = 1_704_067_200  # 2024-01-01
DAYS = 30


def _ids(prefix: str, rows: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(rows).cast(pa.string()), "")


def _power(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    """Rows 0..n-1 drawn with probability ∝ (rank+1)^-exponent, ranks shuffled."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cum = np.cumsum(weights)
    ranks = np.searchsorted(cum, rng.random(size) * cum[-1])
    return rng.permutation(n)[np.minimum(ranks, n - 1)]


def _stamps(rng: np.random.Generator, start: int, n: int, total: int,
            shuffled: bool) -> np.ndarray:
    """Epoch seconds over DAYS days: in time order, as a log is written, or shuffled."""
    if shuffled:
        return T0 + rng.integers(0, DAYS * 86_400, n)
    span = DAYS * 86_400 / total
    return T0 + np.sort(rng.integers(int(start * span), int((start + n) * span), n))


def generate(work: Path, n_events: int, n_users: int, n_items: int, seed: int,
             shuffled: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    chunk = 2_000_000
    path = work / "events.csv"
    with pcsv.CSVWriter(path, pa.schema([
            ("user_id", pa.string()), ("item_id", pa.string()), ("ts", pa.int64()),
            ("event_type", pa.string()), ("value", pa.float64())])) as writer:
        for start in range(0, n_events, chunk):
            n = min(chunk, n_events - start)
            types = np.array(["view", "click", "like"])[rng.integers(0, 3, n)]
            value = np.where(rng.random(n) < 1 / 3, rng.integers(1, 6, n), np.nan)
            writer.write_table(pa.table({
                "user_id": _ids("u", _power(rng, n_users, n, 0.6)),
                "item_id": _ids("i", _power(rng, n_items, n, 1.0)),
                "ts": pa.array(_stamps(rng, start, n, n_events, shuffled)),
                "event_type": pa.array(types),
                "value": pa.array(value, from_pandas=True)}))
    pcsv.write_csv(pa.table({
        "user_id": _ids("u", np.arange(n_users)),
        "age": pa.array(rng.integers(16, 80, n_users)),
        "region": _ids("r", rng.integers(0, 50, n_users))}), work / "users.csv")
    tags = [f"t{a}|t{b}" for a, b in rng.integers(0, 300, (n_items, 2)).tolist()]
    pcsv.write_csv(pa.table({
        "item_id": _ids("i", np.arange(n_items)),
        "category": _ids("c", rng.integers(0, 100, n_items)),
        "tags": pa.array(tags),
        "price": pa.array(np.round(rng.lognormal(2.0, 0.8, n_items), 2))}), work / "items.csv")
    return {"events_csv_mib": round(path.stat().st_size / 2**20, 1)}


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


_LOAD = """
import json, sys, time
from pathlib import Path
from common.data.directory import load_directory
wall, cpu = time.perf_counter(), time.process_time()
ds = load_directory(Path(sys.argv[1]))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps([wall, cpu, len(ds.events), len(ds.users), len(ds.items)]))
"""


def _load_in_fresh_process(path: Path, args: Any) -> tuple[float, float]:
    """``load_directory`` timed in a new interpreter, as a training job starts: not in this
    one, whose heap the CSV reads and imports above have already grown."""
    env = {**os.environ, "PYTHONPATH": str(harness.ROOT)}
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path)], capture_output=True,
                         text=True, check=True, env=env).stdout
    wall, cpu, events, users, items = json.loads(out.strip().splitlines()[-1])
    assert (events, users, items) == (args.events, args.users, args.items)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict:
    p = harness.parser(__doc__)
    p.add_argument("--events", type=int, default=10_000_000)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--shuffled", action="store_true",
                   help="timestamps in random order (default: in time order, as logs are; "
                   "loading then sorts)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of pyarrow and of the import (interleaved), and of the load; "
                   "the best of each is kept, every run is in the JSON")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where to write the generated files (default: a temp dir)")
    args = harness.parse(p, argv)
    load_start = harness.loadavg()
    work = Path(tempfile.mkdtemp(prefix="recstream-bench-import-", dir=args.workdir))
    try:
        _, gen_s, _ = timed(lambda: generate(work, args.events, args.users, args.items,
                                             args.seed, args.shuffled))
        size = round((work / "events.csv").stat().st_size / 2**20, 1)
        arrow_runs, import_runs = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            table, wall, cpu = timed(lambda: pcsv.read_csv(work / "events.csv"))
            assert table.num_rows == args.events
            del table
            arrow_runs.append((wall, cpu))
            shutil.rmtree(work / "ds_events", ignore_errors=True)
            report, wall, cpu = timed(lambda: import_events(
                work / "events.csv", work / "ds_events", ImportOptions(
                    value_col="value", type_col="event_type",
                    positive="event_type in [click, like]")))
            assert report.events == args.events and report.bad.total == 0, report.line()
            import_runs.append((wall, cpu))
        # The best run of each: the one the machine's other load disturbed least.
        arrow_wall, arrow_cpu = min(w for w, _ in arrow_runs), min(c for _, c in arrow_runs)
        imp_wall, imp_cpu = min(w for w, _ in import_runs), min(c for _, c in import_runs)
        full, full_wall, full_cpu = timed(lambda: import_events(
            work / "events.csv", work / "ds", ImportOptions(
                value_col="value", type_col="event_type",
                positive="event_type in [click, like]", users=work / "users.csv",
                items=work / "items.csv", item_fields="category,tags:multi:2,price:numeric")))
        load_runs = [_load_in_fresh_process(work / "ds", args) for _ in range(args.repeat)]
        load_wall, load_cpu = min(w for w, _ in load_runs), min(c for _, c in load_runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.events
    result = {
        "bench": "data_import", "date": harness.now(), "config": harness.config_of(args),
        "machine": harness.machine(load_start, pyarrow=pa.__version__),
        "cpus_available": len(os.sched_getaffinity(0)),
        "events_csv_mib": size,
        "generate_s": round(gen_s, 2),
        "pyarrow_read_csv": {"wall_s": round(arrow_wall, 3), "cpu_s": round(arrow_cpu, 3),
                             "events_per_s": round(n / arrow_wall),
                             "events_per_cpu_s": round(n / arrow_cpu)},
        "import_events": {"wall_s": round(imp_wall, 3), "cpu_s": round(imp_cpu, 3),
                          "events_per_s": round(n / imp_wall),
                          "events_per_cpu_s": round(n / imp_cpu)},
        "runs_wall_cpu_s": {"pyarrow_read_csv": arrow_runs, "import_events": import_runs,
                            "load_for_training": load_runs},
        "ratio_to_pyarrow_wall": round(arrow_wall / imp_wall, 3),
        "ratio_to_pyarrow_cpu": round(arrow_cpu / imp_cpu, 3),
        "import_with_users_items": {"wall_s": round(full_wall, 3), "cpu_s": round(full_cpu, 3),
                                    "report": full.line()},
        "load_for_training": {"wall_s": round(load_wall, 3), "cpu_s": round(load_cpu, 3)},
        "goals": {"events_per_cpu_s_at_least": 1_000_000, "ratio_to_pyarrow_at_least": 0.5,
                  "load_s_at_most": 10.0},
    }
    print(f"data import: {n:,} events, {args.users:,} users, {args.items:,} items "
          f"({size} MiB CSV)")
    harness.print_rows([
        ("pyarrow read_csv", f"{arrow_wall:.2f} s wall, {arrow_cpu:.2f} s CPU "
                             f"({n / arrow_cpu / 1e6:.2f}M events per CPU s)"),
        ("import (events)", f"{imp_wall:.2f} s wall, {imp_cpu:.2f} s CPU "
                            f"({n / imp_cpu / 1e6:.2f}M events per CPU s)"),
        ("ratio to pyarrow", f"{arrow_wall / imp_wall:.2f}x wall, "
                             f"{arrow_cpu / imp_cpu:.2f}x CPU"),
        ("import + users/items", f"{full_wall:.2f} s wall"),
        ("load for training", f"{load_wall:.2f} s wall, {load_cpu:.2f} s CPU"),
    ], 22)
    harness.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
