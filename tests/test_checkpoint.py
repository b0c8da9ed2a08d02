"""Trainer checkpoints: atomic, verified, and never lost to a crash mid-save."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from factories import make_bundle

from stream.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    CheckpointWriter,
    load_checkpoint,
    restore_into,
    save_checkpoint,
    snapshot,
    write_checkpoint,
)
from stream.time_index import TimeIndex


def test_round_trip_restores_rows_vocab_and_offsets(tmp_path: Path) -> None:
    bundle = make_bundle()
    save_checkpoint(tmp_path, bundle, CheckpointMeta("v000001", 3, {0: 10, 1: 7}), keep=2)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    meta, payload = loaded
    assert (meta.base_version, meta.step, meta.offsets) == ("v000001", 3, {0: 10, 1: 7})
    fresh = make_bundle()
    fresh.model.user.ids.weight.zero_()
    restore_into(fresh, payload)
    assert fresh.model.user.ids.weight.equal(bundle.model.user.ids.weight)
    assert fresh.user_vocab.ids == bundle.user_vocab.ids


def test_a_tampered_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    bundle = make_bundle()
    save_checkpoint(tmp_path, bundle, CheckpointMeta("v1", 1, {0: 5}), keep=2)
    newest = save_checkpoint(tmp_path, bundle, CheckpointMeta("v1", 2, {0: 9}), keep=2)
    (newest / "tables.pt").write_bytes(b"garbage")
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded[0].step == 1


def test_a_crash_while_replacing_a_step_keeps_that_step(tmp_path: Path) -> None:
    bundle = make_bundle()
    first = save_checkpoint(tmp_path, bundle, CheckpointMeta("v1", 4, {0: 9}), keep=1)
    # The moment between moving the old save aside and renaming the new one in:
    os.rename(first, tmp_path / f".replaced-{first.name}-deadbeef")
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded[0].step == 4
    save_checkpoint(tmp_path, bundle, CheckpointMeta("v1", 5, {0: 12}), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")) \
        == ["ckpt-000000000005"]


def test_a_snapshot_is_written_as_it_was_taken_while_learning_goes_on(tmp_path: Path) -> None:
    """The trainer copies its state between steps and writes it while the next step
    changes rows, grows the vocabularies and moves the frequency estimate on."""
    bundle = make_bundle()
    index = TimeIndex()
    index.add(0, 10, 1_700_000_000_000)
    snap = snapshot(bundle, CheckpointMeta("v1", 7, {0: 11}, index, 42))
    weight = bundle.model.user.ids.weight.clone()
    ids, counts = list(bundle.user_vocab.ids), bundle.item_counts.copy()
    freq_step = bundle.freq.step
    bundle.model.user.ids.weight.add_(1.0)  # the next step, meanwhile
    bundle.model.user.ids.accum.add_(1.0)
    bundle.user_vocab.observe(["a-new-user"] * 5)
    bundle.item_counts[1:] += 3
    bundle.freq.update(np.arange(5, dtype=np.uint64))
    index.add(0, 20, 1_700_000_100_000)
    write_checkpoint(tmp_path, snap, keep=2)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    meta, payload = loaded
    assert (meta.step, meta.offsets, meta.events_applied) == (7, {0: 11}, 42)
    assert meta.time_index.to_dict() != index.to_dict()  # the later entry is not in it
    assert payload["tables"]["user.weight"].equal(weight)
    assert payload["user_vocab"].ids == ids and "a-new-user" not in payload["user_vocab"]
    assert np.array_equal(payload["item_counts"], counts)
    assert payload["freq"].step == freq_step != bundle.freq.step


def test_the_writer_saves_in_the_background_and_raises_a_failure_on_the_next_call(
        tmp_path: Path) -> None:
    bundle, written = make_bundle(), []
    writer = CheckpointWriter(tmp_path / "ok", keep=2, on_written=lambda: written.append(1))
    writer.submit(snapshot(bundle, CheckpointMeta("v1", 1, {0: 3})))
    writer.submit(snapshot(bundle, CheckpointMeta("v1", 2, {0: 5})))  # after the first
    writer.written(block=True)
    loaded = load_checkpoint(tmp_path / "ok")
    assert loaded is not None and loaded[0].step == 2 and written == [1, 1]
    writer.close()

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the checkpoints should go")
    failing = CheckpointWriter(blocked, keep=2, on_written=lambda: written.append(1))
    failing.submit(snapshot(bundle, CheckpointMeta("v1", 3, {0: 7})))  # returns at once
    with pytest.raises(CheckpointError):
        failing.written(block=True)
    failing.written(block=True)  # raised once; nothing in flight now
    assert written == [1, 1]
    failing.close()
