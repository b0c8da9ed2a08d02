"""MovieLens loaders: the fetched ML-100K, GroupLens' own formats, and the dispatcher."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from common.data import movielens
from common.data.dataset import Dataset
from common.data.datasets import load_dataset
from common.data.movielens import (
    DataFetchError,
    DataFormatError,
    fetch_ml100k,
    load_grouplens,
    load_recbole_ml100k,
)
from common.infra.settings import load_settings

# Three users, four films, five ratings, written out in every format below.
RATINGS = [("1", "10", 5, 881250949), ("2", "10", 3, 881250900), ("1", "20", 4, 881250949),
           ("3", "30", 1, 881260000), ("2", "40", 2, 881240000)]
USERS = [("1", "24", "M", "technician", "85711"), ("2", "53", "F", "other", "94043"),
         ("3", "23", "M", "writer", "")]
FILMS = [("10", "Toy Story (1995)", "01-Jan-1995", ("Animation", "Children's", "Comedy")),
         ("20", "Misérables, Les (1995)", "01-Jan-1995", ("Drama", "Musical")),
         ("30", "unknown", "", ("unknown",)),
         ("40", "Land Before Time III (1995) (V)", "", ("Animation",))]


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return fetch_ml100k(load_settings().data_cache)


@pytest.fixture(scope="session")
def ml100k(ml100k_dir: Path) -> Dataset:
    return load_recbole_ml100k(ml100k_dir)


def write_grouplens_100k(path: Path) -> Path:
    genres = movielens.ML100K_GENRES
    (path / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (path / "u.user").write_text("".join("|".join(u) + "\n" for u in USERS))
    items = ["|".join([i, title, date, "", "http://imdb"]
                      + ["1" if g in gs else "0" for g in genres]) + "\n"
             for i, title, date, gs in FILMS]
    (path / "u.item").write_bytes("".join(items).encode("latin-1"))
    return path


def write_recbole_100k(path: Path) -> Path:
    # Columns deliberately out of RecBole's usual order: the header decides.
    (path / "ml-100k.inter").write_text(
        "timestamp:float\tuser_id:token\titem_id:token\trating:float\n"
        + "".join(f"{t}\t{u}\t{i}\t{r}\n" for u, i, r, t in RATINGS))
    (path / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        + "".join("\t".join(u) + "\n" for u in USERS))
    year = {"01-Jan-1995": "1995", "": "unknown"}
    (path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\t{title}\t{year[date]}\t{' '.join(gs)}\n"
                  for i, title, date, gs in FILMS), encoding="utf-8")
    return path


def write_grouplens_1m(path: Path) -> Path:
    (path / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    (path / "users.dat").write_text("1::M::25::17::85711\n2::F::56::1::94043\n3::M::18::4::\n")
    (path / "movies.dat").write_bytes(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n"
        "20::Misérables, Les (1995)::Drama|Musical\n"
        "30::City of Lost Children, The (1995)::Adventure|Sci-Fi\n"
        "40::Untitled::Drama\n".encode("latin-1"))
    return path


def test_ml100k_has_100k_ratings_943_users_1682_items(ml100k: Dataset) -> None:
    assert len(ml100k.events) == 100_000
    assert len(set(ml100k.events.user_id.tolist())) == 943
    assert len(set(ml100k.events.item_id.tolist())) == 1682
    assert (len(ml100k.users), len(ml100k.items)) == (943, 1682)


def test_ml100k_ratings_are_whole_stars_1_to_5(ml100k: Dataset) -> None:
    assert set(np.unique(ml100k.events.value).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(ml100k.events.event_type.tolist()) == {"rating"}


def test_ml100k_events_are_sorted_by_time_in_milliseconds(ml100k: Dataset) -> None:
    ts = ml100k.events.ts_ms
    assert np.all(np.diff(ts) >= 0)
    assert np.all(ts % 1000 == 0)
    assert (ts[0], ts[-1]) == (874_724_710_000, 893_286_638_000)  # 1997-09-20 .. 1998-04-22


def test_ml100k_event_ids_are_unique_and_deterministic(ml100k: Dataset,
                                                       ml100k_dir: Path) -> None:
    assert len(set(ml100k.events.event_id.tolist())) == 100_000
    again = load_recbole_ml100k(ml100k_dir)
    assert again.events.event_id.tolist() == ml100k.events.event_id.tolist()


def test_ml100k_feature_tables_are_populated(ml100k: Dataset) -> None:
    users, items = ml100k.users.columns, ml100k.items.columns
    assert np.isfinite(users["age"]).all()
    assert set(users["gender"].tolist()) == {"F", "M"}
    assert len(set(users["occupation"].tolist())) == 21
    assert None not in users["zip1"].tolist()
    assert all(1 <= len(g) <= 6 for g in items["genres"])
    assert int(np.isnan(items["year"]).sum()) == 1  # item 267, "unknown" in every field


def test_ml100k_year_falls_back_to_the_title(ml100k: Dataset) -> None:
    # RecBole's release_year for item 1412 reads "V" (from the title's "(1995) (V)").
    row = ml100k.items.ids.tolist().index("1412")
    assert ml100k.items.columns["year"][row] == 1995.0


def test_fetch_reuses_the_cache_without_pip(ml100k_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the files are cached")

    monkeypatch.setattr(movielens.subprocess, "run", no_pip)
    assert fetch_ml100k(ml100k_dir.parent) == ml100k_dir


def test_fetch_failure_raises_an_actionable_error(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(movielens.subprocess, "run", failing_pip)
    with pytest.raises(DataFetchError, match="No matching distribution") as exc:
        fetch_ml100k(tmp_path)
    assert "recbole==1.2.1" in str(exc.value) and str(tmp_path / "ml-100k") in str(exc.value)
    assert not (tmp_path / "ml-100k").exists()


def test_grouplens_100k_reads_ratings_users_and_items(tmp_path: Path) -> None:
    ds = load_grouplens(write_grouplens_100k(tmp_path))
    assert ds.name == "ml-100k" and len(ds.events) == 5
    assert np.all(np.diff(ds.events.ts_ms) >= 0)
    assert ds.events.event_id[0] == "ml100k-2-40-881240000"
    assert ds.events.value.tolist() == [2.0, 3.0, 5.0, 4.0, 1.0]
    assert ds.users.columns["zip1"].tolist() == ["8", "9", None]
    assert ds.items.columns["genres"][1] == ("Drama", "Musical")
    assert ds.items.columns["year"][0] == 1995.0


def test_grouplens_100k_missing_release_date_uses_title_or_nan(tmp_path: Path) -> None:
    year = load_grouplens(write_grouplens_100k(tmp_path)).items.columns["year"]
    assert np.isnan(year[2]) and year[3] == 1995.0


def test_equal_ties_in_time_keep_file_order(tmp_path: Path) -> None:
    ds = load_grouplens(write_grouplens_100k(tmp_path))
    tied = [e for e in ds.events.event_id.tolist() if e.endswith("-881250949")]
    assert tied == ["ml100k-1-10-881250949", "ml100k-1-20-881250949"]


def test_recbole_and_grouplens_copies_load_identically(tmp_path: Path) -> None:
    (tmp_path / "gl").mkdir()
    (tmp_path / "rb").mkdir()
    gl = load_grouplens(write_grouplens_100k(tmp_path / "gl"))
    rb = load_recbole_ml100k(write_recbole_100k(tmp_path / "rb"))
    assert gl.events.to_records() == rb.events.to_records()
    for a, b in ((gl.users, rb.users), (gl.items, rb.items)):
        assert a.fields == b.fields and a.ids.tolist() == b.ids.tolist()
        for name, col in a.columns.items():
            np.testing.assert_array_equal(col, b.columns[name])


def test_recbole_missing_column_is_named(tmp_path: Path) -> None:
    write_recbole_100k(tmp_path)
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
    with pytest.raises(DataFormatError, match="lacks column.*rating, timestamp"):
        load_recbole_ml100k(tmp_path)


def test_grouplens_1m_reads_codes_and_title_years(tmp_path: Path) -> None:
    ds = load_grouplens(write_grouplens_1m(tmp_path))
    assert ds.name == "ml-1m" and len(ds.events) == 5
    assert ds.events.event_id[0] == "ml1m-2-40-881240000"
    assert ds.users.columns["age"].tolist() == [25.0, 56.0, 18.0]
    assert ds.users.columns["occupation"].tolist() == ["17", "1", "4"]
    assert ds.items.columns["genres"][0] == ("Animation", "Children's", "Comedy")
    year = ds.items.columns["year"]
    assert year[:3].tolist() == [1995.0] * 3 and np.isnan(year[3])


def test_grouplens_formats_share_field_names(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = load_grouplens(write_grouplens_100k(tmp_path / "a"))
    large = load_grouplens(write_grouplens_1m(tmp_path / "b"))
    assert small.users.fields == large.users.fields
    assert small.items.fields == large.items.fields


def test_unrecognised_directory_error_names_it(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataFormatError, match="holds no GroupLens") as exc:
        load_grouplens(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_partial_grouplens_directory_names_the_missing_file(tmp_path: Path) -> None:
    write_grouplens_100k(tmp_path)
    (tmp_path / "u.item").unlink()
    with pytest.raises(DataFormatError, match="lacks u.item"):
        load_grouplens(tmp_path)


def test_load_dataset_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ml-100k, ml-1m, synthetic"):
        load_dataset("netflix", tmp_path)


def test_load_dataset_ml1m_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ratings.dat"):
        load_dataset("ml-1m", tmp_path)


def test_load_dataset_reads_grouplens_from_a_path(tmp_path: Path) -> None:
    ds = load_dataset("ml-1m", tmp_path / "cache", path=write_grouplens_1m(tmp_path))
    assert ds.name == "ml-1m"


def test_load_dataset_rejects_a_path_holding_the_other_release(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="holds GroupLens ml-100k, not ml-1m"):
        load_dataset("ml-1m", tmp_path, path=write_grouplens_100k(tmp_path))


def test_load_dataset_passes_options_to_the_generator(tmp_path: Path) -> None:
    ds = load_dataset("synthetic", tmp_path, n_days=2, events_per_day=50)
    assert ds.name == "synthetic" and len(ds.events) == 100


def test_load_dataset_rejects_generator_options_for_movielens(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="apply to 'synthetic' only"):
        load_dataset("ml-1m", tmp_path, n_days=2)
