"""ID vocabulary: frequency filtering, growth, persistence."""

from pathlib import Path

import numpy as np
import pytest

from common.model.vocab import COLD_ROW, IdVocab, VocabError


def test_ids_below_min_count_share_the_cold_row() -> None:
    v = IdVocab(min_count=3)
    v.observe(["a", "a", "b"])
    assert v.lookup(["a", "b"]).tolist() == [COLD_ROW, COLD_ROW]


def test_id_earns_its_row_across_observations() -> None:
    v = IdVocab(min_count=3)
    v.observe(["a", "a"])
    assert v.observe(["a"]) == 1
    assert v.lookup(["a"]).tolist() == [1]


def test_unknown_ids_map_to_cold_row() -> None:
    v = IdVocab()
    v.observe(["x"])
    assert v.lookup(["never-seen"]).tolist() == [COLD_ROW]


def test_rows_are_stable_as_the_vocabulary_grows() -> None:
    v = IdVocab()
    v.observe(["a", "b"])
    before = v.lookup(["a", "b"]).tolist()
    v.observe([f"n{i}" for i in range(1000)])
    assert v.lookup(["a", "b"]).tolist() == before
    assert len(v) == 1003


def test_lookup_many_matches_lookup() -> None:
    v = IdVocab()
    v.observe(["a", "b", "c"])
    ids = np.array(["c", "zz", "a", "c", "b"], dtype=object)
    assert v.lookup_many(ids).tolist() == v.lookup(list(ids)).tolist()


def test_save_and_load_round_trip_keeps_pending_counts(tmp_path: Path) -> None:
    v = IdVocab(min_count=2)
    v.observe(["a", "a", "b", "ü-ñicode"])
    v.save(tmp_path / "v.npz")
    w = IdVocab.load(tmp_path / "v.npz")
    assert w.ids == v.ids and w.min_count == 2
    w.observe(["b"])  # b's earlier sighting was kept, so one more earns a row
    assert w.lookup(["b"]).tolist() == [2]


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.npz"
    path.write_bytes(b"not a numpy archive")
    with pytest.raises(VocabError, match="cannot read vocabulary"):
        IdVocab.load(path)


def test_min_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        IdVocab(min_count=0)
