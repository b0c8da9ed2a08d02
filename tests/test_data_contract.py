"""The data contract: MovieLens and synthetic through their cached directories load exactly
as their own loaders did; rules, checks and errors of a hand-written directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_movielens import write_grouplens_1m

from common.data.contract import ContractError, PositiveRule, read_spec, write_spec
from common.data.dataset import Dataset
from common.data.datasets import dataset_dir, load_dataset
from common.data.directory import read_directory
from common.data.events import COLUMNS
from common.data.movielens import fetch_ml100k, load_grouplens, load_recbole_ml100k
from common.data.synthetic import SyntheticConfig, generate
from common.infra.settings import load_settings


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name
    for c in COLUMNS:
        x, y = getattr(a.events, c), getattr(b.events, c)
        assert x.dtype == y.dtype, c
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), c
    for which in ("users", "items"):
        s, t = getattr(a, which), getattr(b, which)
        assert s.fields == t.fields and s.ids.tolist() == t.ids.tolist()
        for f in s.fields:
            x, y = s.columns[f.name], t.columns[f.name]
            assert x.dtype == y.dtype, f.name
            if x.dtype.kind == "f":
                assert np.array_equal(x, y, equal_nan=True), f.name
            else:
                assert x.tolist() == y.tolist(), f.name


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data cache holding only the fetched ML-100K files (no directory yet)."""
    root = tmp_path_factory.mktemp("cache")
    shutil.copytree(fetch_ml100k(load_settings().data_cache), root / "ml-100k")
    return root


def test_ml100k_through_the_directory_is_todays_loader_bit_for_bit(cache: Path) -> None:
    before = load_recbole_ml100k(cache / "ml-100k")
    through = load_dataset("ml-100k", cache, rating_threshold=4.0)
    assert (cache / "datasets" / "ml-100k" / "dataset.toml").is_file()
    assert_same(before, through)
    assert len(through.events) == 100_000
    # The rule "value >= 4" is today's default threshold: the same 55,375 positives.
    assert read_spec(cache / "datasets" / "ml-100k").positive == PositiveRule(threshold=4.0)
    assert np.array_equal(before.events.positive_mask(4.0), through.events.positive_mask(4.0))
    assert int(through.events.positive_mask(4.0).sum()) == 55_375


def test_a_rule_that_disagrees_with_the_threshold_setting_says_so(cache: Path) -> None:
    with pytest.raises(ContractError, match="RECSTREAM_TRAIN_RATING_THRESHOLD=4"):
        load_dataset("ml-100k", cache, rating_threshold=3.0)


@pytest.mark.parametrize("kwargs", [{}, {"click_only": False, "n_days": 3, "seed": 2}])
def test_synthetic_through_the_directory_is_the_generator(tmp_path: Path, kwargs: dict) -> None:
    assert_same(generate(SyntheticConfig(**kwargs)).dataset,
                load_dataset("synthetic", tmp_path, **kwargs))


def test_grouplens_ml1m_through_the_directory(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    raw = write_grouplens_1m(tmp_path / "raw")
    assert_same(load_grouplens(raw), load_dataset("ml-1m", tmp_path / "c", path=raw))
    # Now cached: the name alone finds it.
    assert load_dataset("ml-1m", tmp_path / "c").name == "ml-1m"


def test_a_stale_cached_directory_is_rewritten(tmp_path: Path) -> None:
    kwargs = {"n_days": 2, "events_per_day": 50}
    path = dataset_dir("synthetic", tmp_path, **kwargs)
    spec = read_spec(path)
    write_spec(path, type(spec)(spec.name, {}, spec.positive, spec.users, spec.items,
                                "written by older code"))
    (path / "events" / "part-00000.parquet").write_bytes(b"not parquet")
    assert len(load_dataset("synthetic", tmp_path, **kwargs).events) == 100


def test_a_directory_is_a_dataset_name(tmp_path: Path) -> None:
    path = dataset_dir("synthetic", tmp_path, n_days=2, events_per_day=50)
    assert len(load_dataset(str(path), tmp_path / "elsewhere").events) == 100
    with pytest.raises(ValueError, match="valid names: ml-100k, ml-1m, synthetic"):
        load_dataset(str(tmp_path / "nothing"), tmp_path)


def _hand_written(root: Path, toml: str, events: str, users: str | None = None) -> Path:
    (root / "events").mkdir(parents=True)
    (root / "dataset.toml").write_text(toml)
    (root / "events" / "a.csv").write_text(events)
    if users is not None:
        (root / "users.csv").write_text(users)
    return root


SHOP = """name = "shop"
[events]
user_id = "customer"
item_id = "sku"
ts = "time"
event_type = "action"
positive = "event_type in [buy, like]"
[users]
id = "customer"
fields = [{name = "age", kind = "numeric", buckets = 4},
          {name = "bio", kind = "text", max_len = 5},
          {name = "tags", kind = "multi", sep = ";"}]
"""


def test_a_hand_written_csv_directory_maps_columns_and_the_rule(tmp_path: Path) -> None:
    path = _hand_written(
        tmp_path / "shop", SHOP,
        "customer,sku,time,action\n"
        "c1,s1,2024-03-01T10:00:00Z,view\nc1,s2,2024-03-01T10:01:00Z,buy\n"
        "c2,s1,1709287140,like\n",
        "customer,age,bio,tags\nc1,31,Likes Hiking & bikes!,a;b\nc2,,,\n")
    ds, bad = read_directory(path)
    assert bad.total == 0 and ds.name == "shop"
    assert ds.events.event_type.tolist() == ["click", "impression", "click"]
    assert ds.events.positive_mask(4.0).tolist() == [True, False, True]
    assert ds.events.event_id.tolist() == ["shop-2", "shop-0", "shop-1"]
    assert ds.users.columns["bio"].tolist() == [("likes", "hiking", "bikes"), ()]
    assert ds.users.columns["tags"].tolist() == [("a", "b"), ()]
    assert np.isnan(ds.users.columns["age"][1]) and ds.users.columns["age"][0] == 31
    assert [f.kind for f in ds.users.fields] == ["numeric", "multi", "multi"]


def test_no_rule_makes_every_event_a_positive(tmp_path: Path) -> None:
    path = _hand_written(tmp_path / "d", 'name = "d"\n',
                         "user_id,item_id,ts,event_type\nu,i,1709287200,view\n")
    ds, _ = read_directory(path)
    assert ds.events.positive_mask(4.0).tolist() == [True]


def test_bad_rows_are_counted_and_named_by_file_row_and_column(tmp_path: Path) -> None:
    long_id = "u" * 257
    path = _hand_written(
        tmp_path / "shop", SHOP,
        "customer,sku,time,action\n"
        f"c1,s1,2024-03-01T10:00:00Z,buy\n{long_id},s1,1709287200,buy\n"
        "c2,s1,last tuesday,buy\nc3,,1709287200,buy\n",
        "customer,age,bio,tags\nc1,old,x,\nc2,40,,\nc2,41,,\n")
    ds, bad = read_directory(path)
    assert len(ds.events) == 1 and ds.users.ids.tolist() == ["c2"]
    assert bad.counts == {"bad_id": 1, "bad_timestamp": 1, "missing_field": 1,
                          "bad_feature": 1, "duplicate_id": 1}
    events = str(path / "events" / "a.csv")
    assert bad.examples["bad_timestamp"] == f"{events}, row 3, column 'time': 'last tuesday'"
    assert bad.examples["bad_id"].startswith(f"{events}, row 2, column 'customer'")
    assert bad.examples["missing_field"] == f"{events}, row 4, column 'sku'"
    assert bad.examples["bad_feature"] == f"{path / 'users.csv'}, row 1, column 'age': 'old'"


def test_a_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = _hand_written(tmp_path / "shop", SHOP, "customer,sku,action\nc1,s1,buy\n")
    with pytest.raises(ContractError, match=r"a\.csv: no column 'time' \(for ts\)"):
        read_directory(path)


@pytest.mark.parametrize("toml, match", [
    ('name = "x"\n[events]\npositive = "value > 4"\n', "is not one of"),
    ('name = "x"\n[users]\nfields = [{name = "a", kind = "vector"}]\n', "kind 'vector'"),
    ('name = "x"\n[events]\nuser = "u"\n', "unknown field"),
    ('name = "x y"\n', "name 'x y'"),
    ("name = \n", "not valid TOML"),
])
def test_a_bad_dataset_toml_is_named(tmp_path: Path, toml: str, match: str) -> None:
    path = _hand_written(tmp_path / "d", toml, "user_id,item_id,ts\nu,i,1709287200\n")
    with pytest.raises(ContractError, match=match) as exc:
        read_directory(path)
    assert "dataset.toml" in str(exc.value)


def test_dataset_toml_round_trips(tmp_path: Path) -> None:
    path = _hand_written(tmp_path / "shop", SHOP, "customer,sku,time,action\n")
    spec = read_spec(path)
    write_spec(tmp_path, spec)
    assert read_spec(tmp_path) == spec
