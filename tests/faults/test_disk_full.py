"""Disk full while writing state. The lander and the nightly run under a file-size limit
(RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG as on a full disk); the
trainer, whose fetcher hands records over in shared memory, gets a small tmpfs for its
checkpoints that is filled up (ENOSPC). What was written before stays intact, nothing
is committed or released past the failure, the error is reported, and a restart with
room finishes the work."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from publishing import control_for, released_champion
from streaming import bootstrap_champion, produce, stream_env, stream_settings, wait_for
from test_nightly_job import day_ms_of, land_day, nightly_env, world  # noqa: F401

from batch.nightly import NightlyJob
from common.data.events import DAY_MS, format_day
from common.data.landed import landed_parts, read_landed_day
from common.data.synthetic import SyntheticData
from common.infra.settings import load_settings
from common.model.registry import Registry
from recstream.daemons import lander, trainer
from stream.checkpoint import load_checkpoint


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec hook: files of this process cannot grow past ``limit`` bytes."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def digests(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_lander_on_a_full_disk_stops_keeps_its_files_and_lands_all_after_a_restart(
        tmp_path: Path, kafka_bootstrap: str, topic: str, world: SyntheticData,  # noqa: F811
        fault, daemons) -> None:
    day_ms = day_ms_of(world)
    events = world.dataset.events.between(day_ms, day_ms + DAY_MS)
    small, large = events.take(np.arange(100)), events.take(np.arange(100, 4000))
    extra = {"RECSTREAM_STREAM_LANDER_FLUSH_S": "0.5"}
    settings = stream_settings(tmp_path, kafka_bootstrap, topic, **extra)
    env = stream_env(tmp_path, kafka_bootstrap, topic, **extra)
    # The first files (~3 KB) fit, the next flush's (~25 KB each) do not.
    full = daemons.start(lander(env, tmp_path, preexec=file_size_limit(12 * 1024)))
    produce(kafka_bootstrap, topic, small)
    wait_for(lambda: full.counter("recstream_lander_events") == len(small), 60,
             "the small batch landed (its files fit)")
    before = digests([p.path for p in landed_parts(settings.events_dir)])
    produce(kafka_bootstrap, topic, large)
    wait_for(lambda: not full.alive(), 60, "the lander to stop on the failed write")
    fault.injected += 1
    assert full.proc is not None and full.proc.returncode == 1
    assert "File too large" in full.log_text()  # the error, reported in one line
    assert digests(list(before)) == before  # the files landed before are intact
    assert {p.path for p in landed_parts(settings.events_dir)} == set(before)
    again = daemons.start(lander(env, tmp_path))
    wait_for(lambda: again.counter("recstream_lander_events") == len(large), 120,
             "the restarted lander to land the rest")
    fault.recovered += 1
    landed = read_landed_day(settings.events_dir, format_day(day_ms))
    rows = sum(p.last_offset - p.first_offset + 1 for p in landed_parts(settings.events_dir))
    fault.events_lost += len(events.take(np.arange(4000))) - len(landed)
    assert len(landed) == rows == 4000  # every event once


def test_nightly_on_a_full_disk_fails_cleanly_and_a_rerun_releases(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    env = nightly_env(tmp_path, redis_url, prefix)
    settings = load_settings(env)
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    argv = [sys.executable, "-m", "recstream", "nightly", "--dataset", "synthetic", "--day",
            format_day(day_ms)]
    full = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                          preexec_fn=file_size_limit(32 * 1024), timeout=300)
    fault.injected += 1
    assert full.returncode == 1, full.stderr
    assert "File too large" in full.stderr.splitlines()[-1]
    registry = Registry(settings.models_dir)
    assert registry.versions() == [champion]  # no half-written version
    assert not list(settings.models_dir.glob(".staging-*"))
    assert control_for(settings).pub.users.release().champion == champion
    again = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    fault.recovered += 1
    release = control_for(settings).pub.users.release()
    assert release.champion != champion and release.previous == champion
    for version in registry.versions():
        registry.load(version)  # checksums hold


@contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only: skips elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()[:80]}): the "
                    "trainer's full-disk case needs one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave: int) -> Path:
    """Fill the file system of ``path`` until ``leave`` bytes are free."""
    st = os.statvfs(path)
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def test_trainer_checkpoint_on_a_full_disk_keeps_the_last_one_and_loses_nothing(
        tmp_path: Path, kafka_bootstrap: str, topic: str, world: SyntheticData,  # noqa: F811
        fault, daemons) -> None:
    day_ms = day_ms_of(world)
    events = world.dataset.events.between(day_ms, day_ms + DAY_MS).take(np.arange(4000))
    extra = {"RECSTREAM_STREAM_UPDATE_INTERVAL_S": "0.3",
             "RECSTREAM_STREAM_CHECKPOINT_EVERY_STEPS": "1"}
    settings = stream_settings(tmp_path, kafka_bootstrap, topic, **extra)
    env = stream_env(tmp_path, kafka_bootstrap, topic, **extra)
    bootstrap_champion(settings, world.dataset, day_ms)
    ckpt_dir = settings.checkpoints_dir / "trainer"
    # A checkpoint here is ~2 MB; two are kept and a third is staged before the oldest goes.
    with tiny_tmpfs(ckpt_dir, "16m"):
        first = daemons.start(trainer(env, tmp_path))
        produce(kafka_bootstrap, topic, events.take(np.arange(1000)))
        wait_for(lambda: first.counter("recstream_stream_events_applied") == 1000, 120,
                 "the first events applied")
        assert first.stop() == 0  # SIGTERM: a checkpoint on the way out
        saved = load_checkpoint(ckpt_dir)
        assert saved is not None and saved[0].events_applied == 1000
        before = digests([p for d in ckpt_dir.glob("ckpt-*") for p in d.iterdir()])
        filler = fill(ckpt_dir, leave=512 * 1024)  # the next checkpoint cannot fit
        full = daemons.start(trainer(env, tmp_path))
        produce(kafka_bootstrap, topic, events.take(np.arange(1000, 4000)))
        wait_for(lambda: not full.alive(), 120, "the trainer to stop on the failed checkpoint")
        fault.injected += 1
        assert full.proc is not None and full.proc.returncode == 1
        assert "No space left on device" in full.log_text()
        assert digests(list(before)) == before  # the last good checkpoint is intact
        filler.unlink()  # room again
        again = daemons.start(trainer(env, tmp_path))
        # It resumes from the intact checkpoint's offsets: the 3000 events after it again.
        wait_for(lambda: again.counter("recstream_stream_events_applied") == 3000, 120,
                 "the restarted trainer to catch up")
        assert again.stop() == 0
        final = load_checkpoint(ckpt_dir)
    assert final is not None
    fault.events_lost += len(events) - final[0].events_applied
    assert final[0].events_applied == len(events)  # every event applied, none twice
    fault.recovered += 1


def test_index_write_on_a_full_disk_fails_the_publish_and_a_rerun_releases(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    with tiny_tmpfs(settings.indexes_dir, "8m"):
        champion = released_champion(settings, world.dataset, day_ms)
        land_day(settings, world, day_ms)
        filler = fill(settings.indexes_dir, leave=8 * 1024)  # no room for another index
        first = NightlyJob(settings, world.dataset, control_for(settings)).run(
            format_day(day_ms))
        fault.injected += 1
        assert first.result == "failed" and first.reason.startswith("publish: ")
        assert "No space left on device" in first.reason
        release = control_for(settings).pub.users.release()
        assert release.champion == champion  # still serving, its index intact
        assert control_for(settings).pub.indexes.load(champion)[0] is not None
        filler.unlink()
        again = NightlyJob(settings, world.dataset, control_for(settings)).run(
            format_day(day_ms))
        assert again.result == "released" and again.version == first.version
        fault.recovered += 1
