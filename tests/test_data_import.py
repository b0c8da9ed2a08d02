"""``recstream data import`` and ``data describe``: bad rows counted exactly by kind with
nothing good lost, every timestamp form, the CLI's report and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.data.contract import ContractError
from common.data.directory import read_directory
from common.data.importer import ImportOptions, import_events
from recstream.cli import EXIT_FAILED, EXIT_USAGE, build_parser, main

N_GOOD, N_BAD = 20_000, 1_000
T0 = 1_709_251_200  # 2024-03-01T00:00:00Z
EVENT_KINDS = ("malformed_row", "missing_field", "bad_id", "bad_timestamp", "bad_value")


def _good(rng: np.random.Generator, k: int) -> dict:
    ts = T0 + int(rng.integers(0, 30 * 86_400))
    value = None if k % 3 == 0 else int(rng.integers(1, 6))
    return {"user_id": f"u{rng.integers(0, 500)}", "item_id": f"i{rng.integers(0, 300)}",
            "ts": ts, "event_type": "like" if k % 2 else "view", "value": value}


def _bad(kind: str, rng: np.random.Generator, k: int) -> dict | None:
    """A row with exactly one problem (None: a row that does not parse at all)."""
    row = _good(rng, k)
    if kind == "malformed_row":
        return None
    if kind == "bad_encoding":
        row["user_id"] = f"caf\udce9{k}"  # written as the byte 0xE9: latin-1, not UTF-8
    if kind == "missing_field":
        row[("user_id", "item_id", "ts")[k % 3]] = None
    elif kind == "bad_id":
        row[("user_id", "item_id")[k % 2]] = "x" * (257 + k % 50)
    elif kind == "bad_timestamp":
        row["ts"] = ("yesterday", "1800-01-01T00:00:00Z", "99", "2024-02-30")[k % 4]
    elif kind == "bad_value":
        row["value"] = ("abc", "nan", "inf", "1e40")[k % 4]
    return row


def _rows(kinds: tuple[str, ...], seed: int = 0
          ) -> tuple[list[dict | None], list[tuple[str, str, int]]]:
    rng = np.random.default_rng(seed)
    rows: list[dict | None] = [_good(rng, k) for k in range(N_GOOD)]
    good = [(r["user_id"], r["item_id"], r["ts"] * 1000) for r in rows if r is not None]
    for kind in kinds:
        rows += [_bad(kind, rng, k) for k in range(N_BAD)]
    order = rng.permutation(len(rows))
    return [rows[k] for k in order], good


def _csv(rows: list[dict | None], path: Path) -> Path:
    lines = ["user_id,item_id,ts,event_type,value"]
    for k, r in enumerate(rows):
        if r is None:
            lines.append("u1,i1,1709251200" if k % 2 else "u1,i1,1709251200,like,4,extra")
        else:
            lines.append(",".join("" if r[c] is None else str(r[c])
                                  for c in ("user_id", "item_id", "ts", "event_type", "value")))
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    return path


def _jsonl(rows: list[dict | None], path: Path) -> Path:
    lines = []
    for k, r in enumerate(rows):
        if r is None:
            lines.append('{"user_id": "u1", "item_id": ' if k % 2 else '["not", "an object"]')
        else:
            lines.append(json.dumps({c: v for c, v in r.items() if v is not None}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("write, kinds", [(_csv, ("bad_encoding", *EVENT_KINDS)),
                                          (_jsonl, EVENT_KINDS)])
def test_1000_bad_rows_of_each_kind_are_counted_exactly_and_nothing_good_is_lost(
        tmp_path: Path, write, kinds: tuple[str, ...]) -> None:
    rows, good = _rows(kinds)
    source = write(rows, tmp_path / f"log{'.csv' if write is _csv else '.jsonl'}")
    report = import_events(source, tmp_path / "ds", ImportOptions(
        value_col="value", type_col="event_type", positive="event_type in [like]"))
    assert report.bad.counts == {kind: N_BAD for kind in kinds}
    assert report.events == N_GOOD
    ds, bad = read_directory(tmp_path / "ds")
    assert bad.total == 0
    got = sorted(zip(ds.events.user_id.tolist(), ds.events.item_id.tolist(),
                     ds.events.ts_ms.tolist(), strict=True))
    assert got == sorted(good)
    assert int(ds.events.positive_mask(4.0).sum()) == N_GOOD // 2  # the likes


def test_bad_feature_rows_of_each_kind_are_counted_exactly(tmp_path: Path) -> None:
    lines = ["item_id,price,brand"]
    lines += [f"i{k},{k % 97}.5,b{k % 7}" for k in range(5_000)]
    lines += [f"i{k},cheap,b1" for k in range(5_000, 6_000)]  # bad_feature
    lines += [f"i{k},1.0,b2" for k in range(1_000)]  # duplicate_id
    lines += [f"{'i' * 300}{k},1.0,b3" for k in range(1_000)]  # bad_id
    lines += [",1.0,b4"] * 1_000  # missing_field
    (tmp_path / "items.csv").write_text("\n".join(lines) + "\n")
    events = _csv([_good(np.random.default_rng(1), k) for k in range(100)],
                  tmp_path / "log.csv")
    report = import_events(events, tmp_path / "ds", ImportOptions(
        items=tmp_path / "items.csv", item_fields="price:numeric:5,brand"))
    assert report.bad.counts == {"bad_feature": 1000, "duplicate_id": 1000, "bad_id": 1000,
                                 "missing_field": 1000}
    assert report.items == 5_000
    ds, bad = read_directory(tmp_path / "ds")
    assert bad.total == 0 and ds.items.ids.tolist() == [f"i{k}" for k in range(5_000)]
    assert ds.items.columns["price"][:3].tolist() == [0.5, 1.5, 2.5]
    assert ds.items.fields[0].buckets == 5


@pytest.mark.parametrize("text, ms", [
    ("1709251200", 1_709_251_200_000),  # epoch seconds
    ("1709251200.25", 1_709_251_200_250),  # fractional epoch seconds
    ("1709251200123", 1_709_251_200_123),  # epoch milliseconds
    ("2024-03-01T00:00:00Z", 1_709_251_200_000),  # ISO-8601, UTC
    ("2024-03-01T02:00:00+02:00", 1_709_251_200_000),  # ISO-8601 with an offset
    ("2024-03-01T00:00:00.123456", 1_709_251_200_123),  # no zone = UTC; sub-ms cut
    ("2024-03-01 00:00:00", 1_709_251_200_000),  # a space for the T
    ("2024-03-01", 1_709_251_200_000),  # a date alone
])
def test_each_timestamp_form_is_recognised_without_a_flag(tmp_path: Path, text: str,
                                                          ms: int) -> None:
    (tmp_path / "log.csv").write_text(f"user_id,item_id,ts\nu,i,{text}\n")
    report = import_events(tmp_path / "log.csv", tmp_path / "ds")
    assert report.bad.total == 0
    assert read_directory(tmp_path / "ds")[0].events.ts_ms.tolist() == [ms]


def test_ts_format_reads_any_other_shape(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("user_id,item_id,ts\nu,i,01/03/2024 00:00\nu,i,soon\n")
    report = import_events(tmp_path / "log.csv", tmp_path / "ds",
                           ImportOptions(ts_format="%d/%m/%Y %H:%M"))
    assert report.bad.counts == {"bad_timestamp": 1}
    assert read_directory(tmp_path / "ds")[0].events.ts_ms.tolist() == [1_709_251_200_000]


def test_parquet_source_with_typed_columns_and_renamed_fields(tmp_path: Path) -> None:
    pq.write_table(pa.table({
        "who": pa.array([1, 2, 3]), "what": pa.array(["a", "b", "a"]),
        "when": pa.array([1_709_251_200_000, 1_709_251_260_000, 0], pa.int64())
        .cast(pa.timestamp("ms")),
        "stars": pa.array([5.0, 2.0, 4.0])}), tmp_path / "log.parquet")
    report = import_events(tmp_path / "log.parquet", tmp_path / "ds", ImportOptions(
        user_col="who", item_col="what", ts_col="when", value_col="stars",
        positive="value >= 4"))
    assert report.events == 2 and report.bad.counts == {"bad_timestamp": 1}
    ds = read_directory(tmp_path / "ds")[0]
    assert ds.events.user_id.tolist() == ["1", "2"]
    assert ds.events.positive_mask(4.0).tolist() == [True, False]


def test_import_refuses_a_rule_without_its_column_and_a_full_target(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("user_id,item_id,ts\nu,i,1709251200\n")
    with pytest.raises(ContractError, match="needs a value column"):
        import_events(tmp_path / "log.csv", tmp_path / "ds",
                      ImportOptions(positive="value >= 4"))
    assert not (tmp_path / "ds").exists()
    with pytest.raises(ContractError, match="not empty"):
        import_events(tmp_path / "log.csv", tmp_path)


def test_cli_import_then_describe(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path / "home"))
    lines = ["customer,sku,time,stars"]
    lines += [f"c{k % 40},s{k % 7 if k % 3 else 0},{T0 + 3600 * k},{1 + k % 5}"
              for k in range(200)]
    lines += ["c1,s1,never,4", "c1,s1"]
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n")
    code = main(["data", "import", str(tmp_path / "log.csv"), "--to", str(tmp_path / "ds"),
                 "--user-col", "customer", "--item-col", "sku", "--ts-col", "time",
                 "--value-col", "stars", "--positive", "value >= 4"])
    out, err = capsys.readouterr()
    assert code == 0
    assert len(out.strip().splitlines()) == 1
    assert out.startswith(f"imported 200 events, 0 users, 0 items into {tmp_path / 'ds'} in ")
    assert out.strip().endswith("; bad rows: 1 malformed_row, 1 bad_timestamp")
    assert "bad_timestamp (first: " in err and "column 'time': 'never'" in err
    assert main(["data", "describe", str(tmp_path / "ds"), "--json",
                 str(tmp_path / "d.json")]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures == json.loads((tmp_path / "d.json").read_text())
    assert (figures["events"], figures["users"], figures["items"]) == (200, 40, 7)
    assert figures["positives"] == 80 and figures["days"] == 9
    assert figures["first_day"] == "2024-03-01"
    # s0 takes every third event, and there are 7 items: the top 1% is one item.
    assert figures["top_1pct_items"] == 1
    per_item: dict[str, int] = {}
    for k in range(200):
        if 1 + k % 5 >= 4:
            item = f"s{k % 7 if k % 3 else 0}"
            per_item[item] = per_item.get(item, 0) + 1
    assert figures["top_1pct_items_positive_share"] == pytest.approx(
        max(per_item.values()) / 80)
    assert figures["events_per_day"]["max"] == 24


@pytest.mark.parametrize("args, expected", [
    (["data", "import", "log.csv", "--to", "x", "--positive", "value > 4"], "is not one of"),
    (["data", "import", "log.csv"], "the following arguments are required: --to"),
    (["data", "import", "log.csv", "--to", "x", "--item-fields", "p:vector"],
     "kind 'vector'"),
    (["data", "describe", "/no/such/dir"], "invalid choice: '/no/such/dir'"),
    (["eval", "--dataset", "/no/such/dir"], "invalid choice"),
])
def test_bad_data_arguments_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                   args: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_USAGE
    assert expected in err and len(err.strip().splitlines()) == 1


def test_import_failure_is_one_line_and_exit_1(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSTREAM_HOME", str(tmp_path / "home"))
    code = main(["data", "import", str(tmp_path / "missing.csv"), "--to", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and "no such file" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [
    ["train", "--bootstrap"], ["nightly"], ["schedule"], ["eval"], ["replay"], ["stream"],
    ["publisher", "publish", "v000001"], ["demo"]])
def test_every_dataset_flag_takes_a_directory(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "dataset.toml").write_text('name = "x"\n')
    args = build_parser().parse_args([*command, "--dataset", str(tmp_path)])
    assert args.dataset == str(tmp_path)


def test_given_event_ids_are_kept_and_an_over_long_one_is_a_bad_id(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("event_id,user_id,item_id,ts\n"
                                      f"e1,u,i,1709251200\n{'e' * 257},u,i,1709251201\n"
                                      ",u,i,1709251202\n")
    report = import_events(tmp_path / "log.csv", tmp_path / "ds", ImportOptions(name="shop"))
    assert report.bad.counts == {"bad_id": 1}
    assert read_directory(tmp_path / "ds")[0].events.event_id.tolist() == ["e1", "shop-1"]


def test_a_line_that_is_not_utf8_is_a_bad_row_not_a_failed_import(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_bytes(b"user_id,item_id,ts\nu1,i1,1709251200\n"
                                       b"caf\xe9,i1,1709251201\nu2,i\xff,1709251202\n"
                                       b"u3,i3,1709251203\n")
    report = import_events(tmp_path / "log.csv", tmp_path / "ds")
    assert report.bad.counts == {"bad_encoding": 2} and report.events == 2
    assert "row 2, column 'user_id'" in report.bad.examples["bad_encoding"]
