"""MovieLens loaders: ML-100K fetched from the recbole wheel, or GroupLens' own files.

Every loader returns the same shape: rating events (value = stars, ``ts_ms`` =
seconds * 1000, deterministic event ids, sorted by time), user features ``age``,
``gender``, ``occupation``, ``zip1`` and item features ``genres``, ``year``. The
RecBole and GroupLens copies of ML-100K load identically, ids included, so a
model trained on one reads the other.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.dataset import Dataset
from common.data.events import RATING, Events
from common.data.tables import FeatureTable, FieldSpec
from common.infra.atomic import write_bytes_atomic

RECBOLE_SPEC = "recbole==1.2.1"
RECBOLE_DIR = "recbole/dataset_example/ml-100k/"
ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
FETCH_TIMEOUT_S = 600

USER_FIELDS = (
    FieldSpec("age", "numeric", buckets=6),
    FieldSpec("gender", "categorical"),
    FieldSpec("occupation", "categorical"),
    FieldSpec("zip1", "categorical"),
)
ITEM_FIELDS = (
    FieldSpec("genres", "multi", max_len=6),
    FieldSpec("year", "numeric", buckets=8),
)

# The order of the 0/1 genre flags at the end of GroupLens' u.item (as listed in u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
GROUPLENS_FILES = {
    "ml-100k": ("u.data", "u.user", "u.item"),
    "ml-1m": ("ratings.dat", "users.dat", "movies.dat"),
}
_TITLE_YEAR = re.compile(r"\((\d{4})\)")


class DataFetchError(RuntimeError):
    """A data set could not be downloaded into the cache."""


class DataFormatError(ValueError):
    """Files on disk are not in a format a loader understands."""


def fetch_ml100k(cache_dir: Path) -> Path:
    """Put RecBole's ML-100K files in ``cache_dir/ml-100k`` (downloading only if missing)."""
    target = Path(cache_dir) / "ml-100k"
    if all((target / name).is_file() for name in ML100K_FILES):
        return target
    with tempfile.TemporaryDirectory(prefix="recstream-fetch-") as tmp:
        wheel = _download_recbole_wheel(Path(tmp), target)
        _extract_ml100k(wheel, target)
    return target


def _download_recbole_wheel(dest: Path, target: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", RECBOLE_SPEC, "--no-deps", "--quiet",
           "-d", str(dest)]
    hint = (f"MovieLens-100K comes from the {RECBOLE_SPEC} wheel on PyPI: check that pip can "
            f"reach its package index (PIP_INDEX_URL, proxy settings), or copy "
            f"{', '.join(ML100K_FILES)} into {target} yourself")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataFetchError(f"could not run pip download: {exc}. {hint}") from exc
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        # pip's retry warnings bury the cause; its ERROR lines state it.
        detail = " | ".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-3:])
        raise DataFetchError(f"pip download {RECBOLE_SPEC} failed (exit {proc.returncode}): "
                             f"{detail or 'no output'}. {hint}")
    wheels = sorted(dest.glob("recbole-*.whl"))
    if not wheels:
        raise DataFetchError(f"pip download {RECBOLE_SPEC} produced no wheel in {dest}. {hint}")
    return wheels[0]


def _extract_ml100k(wheel: Path, target: Path) -> None:
    # Each file lands atomically and the cache check wants all three, so an
    # interrupted extraction is simply redone next time.
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in ML100K_FILES:
                write_bytes_atomic(target / name, zf.read(RECBOLE_DIR + name))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise DataFetchError(f"{wheel.name} does not hold MovieLens-100K under "
                             f"{RECBOLE_DIR}: {exc}") from exc


def load_recbole_ml100k(dir: Path) -> Dataset:
    """Read RecBole's atomic files ``ml-100k.{inter,user,item}`` from a directory."""
    dir = Path(dir)
    inter = _read_atomic(dir / "ml-100k.inter", ("user_id", "item_id", "rating", "timestamp"))
    users = _read_atomic(dir / "ml-100k.user",
                         ("user_id", "age", "gender", "occupation", "zip_code"))
    items = _read_atomic(dir / "ml-100k.item", ("item_id", "release_year", "class"))
    events = _rating_events("ml100k", inter["user_id"], inter["item_id"], inter["rating"],
                            inter["timestamp"], dir / "ml-100k.inter")
    user_table = _user_table(users["user_id"], users["age"], users["gender"],
                             users["occupation"], users["zip_code"])
    titles = items.get("movie_title", [""] * len(items["item_id"]))
    item_table = _item_table(items["item_id"], [tuple(c.split()) for c in items["class"]],
                             _years(items["release_year"], titles))
    return Dataset("ml-100k", events, user_table, item_table)


def detect_grouplens_format(path: Path) -> str:
    """Which GroupLens release a directory holds: ``ml-100k`` or ``ml-1m``."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path} is not a directory of MovieLens files")
    for name, files in GROUPLENS_FILES.items():
        if (path / files[0]).is_file():
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise DataFormatError(f"{path} looks like GroupLens {name} but lacks "
                                      f"{', '.join(missing)}")
            return name
    wanted = "; ".join(f"{n}: {', '.join(f)}" for n, f in GROUPLENS_FILES.items())
    raise DataFormatError(f"{path} holds no GroupLens MovieLens files (expected {wanted})")


def load_grouplens(path: Path) -> Dataset:
    """Read GroupLens' own ml-100k (``u.data``…) or ml-1m (``ratings.dat``…) files."""
    path = Path(path)
    if detect_grouplens_format(path) == "ml-100k":
        return _load_grouplens_100k(path)
    return _load_grouplens_1m(path)


def _load_grouplens_100k(path: Path) -> Dataset:
    ratings = _read_delimited(path / "u.data", "\t", 4)
    users = _read_delimited(path / "u.user", "|", 5)
    items = _read_delimited(path / "u.item", "|", 5 + len(ML100K_GENRES))
    u, i, r, t = _columns(ratings, 4)
    events = _rating_events("ml100k", u, i, r, t, path / "u.data")
    user_table = _user_table(*_columns(users, 5))
    genres = [tuple(g for g, flag in zip(ML100K_GENRES, row[-len(ML100K_GENRES):], strict=True)
                    if flag.strip() == "1") for row in items]
    # Release dates look like 01-Jan-1995; one film has none.
    years = _years([row[2].rsplit("-", 1)[-1] for row in items], [row[1] for row in items])
    item_table = _item_table([row[0] for row in items], genres, years)
    return Dataset("ml-100k", events, user_table, item_table)


def _load_grouplens_1m(path: Path) -> Dataset:
    ratings = _read_delimited(path / "ratings.dat", "::", 4)
    users = _read_delimited(path / "users.dat", "::", 5)
    movies = _read_delimited(path / "movies.dat", "::", 3)
    u, i, r, t = _columns(ratings, 4)
    events = _rating_events("ml1m", u, i, r, t, path / "ratings.dat")
    ids, gender, age, occupation, zips = _columns(users, 5)
    user_table = _user_table(ids, age, gender, occupation, zips)
    # Genres are the last field; rejoin the middle in case a title ever holds "::".
    years = _years([""] * len(movies), ["::".join(row[1:-1]) for row in movies])
    genres = [tuple(g for g in row[-1].split("|") if g) for row in movies]
    item_table = _item_table([row[0] for row in movies], genres, years)
    return Dataset("ml-1m", events, user_table, item_table)


def _read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    # GroupLens ships latin-1, but RecBole's copy of ml-100k.item is UTF-8: try
    # UTF-8 first (latin-1 would decode it without error into mojibake).
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    # Split on "\n" only: str.splitlines() also breaks on \x85 and \x1c, which are
    # ordinary characters in latin-1 text.
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def _read_delimited(path: Path, sep: str, min_fields: int) -> list[list[str]]:
    return _split_rows(_read_lines(path), sep, min_fields, path)


def _split_rows(lines: list[str], sep: str, min_fields: int, path: Path) -> list[list[str]]:
    rows = [line.split(sep) for line in lines]
    bad = next((n for n, row in enumerate(rows) if len(row) < min_fields), None)
    if bad is not None:
        raise DataFormatError(f"{path}: a line reads {lines[bad][:80]!r}: expected at least "
                              f"{min_fields} fields separated by {sep!r}, found {len(rows[bad])}")
    return rows


def _columns(rows: list[list[str]], n: int) -> list[list[str]]:
    return [[row[k] for row in rows] for k in range(n)]


def _read_atomic(path: Path, required: Sequence[str]) -> dict[str, list[str]]:
    """A RecBole atomic file as columns keyed by header name (``name:type`` → ``name``)."""
    lines = _read_lines(path)
    if not lines:
        raise DataFormatError(f"{path} is empty; expected a header like 'user_id:token'")
    names = [h.split(":", 1)[0].strip() for h in lines[0].split("\t")]
    missing = [r for r in required if r not in names]
    if missing:
        raise DataFormatError(f"{path} lacks column(s) {', '.join(missing)} "
                              f"(header has {', '.join(names)})")
    rows = _split_rows(lines[1:], "\t", len(names), path)
    return {name: [row[k] for row in rows] for k, name in enumerate(names)}


def _rating_events(prefix: str, users: Sequence[str], items: Sequence[str],
                   ratings: Sequence[str], ts_s: Sequence[str], source: Path) -> Events:
    rating = _numbers(ratings, source, "rating")
    ts_ms = np.round(_numbers(ts_s, source, "timestamp") * 1000).astype(np.int64)
    user = np.asarray([u.strip() for u in users], dtype=object)
    item = np.asarray([i.strip() for i in items], dtype=object)
    event_id = np.asarray([f"{prefix}-{u}-{i}-{t // 1000}"
                           for u, i, t in zip(user, item, ts_ms.tolist(), strict=True)],
                          dtype=object)
    event_type = np.full(len(user), RATING, dtype=object)
    events = Events(event_id, user, item, event_type, rating.astype(np.float32), ts_ms)
    return events.sorted_by_time()


def _numbers(values: Sequence[str], source: Path, column: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError as exc:
        raise DataFormatError(f"{source}: column {column!r} is not numeric: {exc}") from exc


def _floats_or_nan(values: Sequence[str]) -> np.ndarray:
    out = np.full(len(values), np.nan)
    for k, v in enumerate(values):
        try:
            out[k] = float(v)
        except ValueError:
            continue
    return out


def _years(years: Sequence[str], titles: Sequence[str]) -> list[str]:
    """The year field where it is one, else the last "(YYYY)" in the title, else ""."""
    # RecBole's ml-100k.item has release_year "V" for item 1412, whose title
    # "... (1995) (V)" was split on the wrong parenthesis.
    out = []
    for year, title in zip(years, titles, strict=True):
        found = _TITLE_YEAR.findall(title)
        out.append(year.strip() if year.strip().isdigit() else (found[-1] if found else ""))
    return out


def _text_or_none(values: Sequence[str]) -> list[str | None]:
    return [v.strip() or None for v in values]


def _user_table(ids: Sequence[str], age: Sequence[str], gender: Sequence[str],
                occupation: Sequence[str], zips: Sequence[str]) -> FeatureTable:
    return FeatureTable.build([i.strip() for i in ids], USER_FIELDS, {
        "age": _floats_or_nan(age),
        "gender": _text_or_none(gender),
        "occupation": _text_or_none(occupation),
        "zip1": [z.strip()[:1] or None for z in zips],
    })


def _item_table(ids: Sequence[str], genres: Sequence[tuple[str, ...]],
                years: Sequence[str]) -> FeatureTable:
    return FeatureTable.build([i.strip() for i in ids], ITEM_FIELDS, {
        "genres": genres,
        "year": _floats_or_nan(years),
    })
