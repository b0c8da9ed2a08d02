"""Operators acting at once: two `rollback`s of the same bad release, a `promote` while a
nightly waits to release. The end state is always one consistent version: the Redis
release and the registry aliases agree, and the champion is published completely."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from publishing import control_for, released_champion
from streaming import wait_for
from test_nightly_job import day_ms_of, land_day, nightly_env, world  # noqa: F401

from batch.jobs import bootstrap_job
from batch.nightly import NightlyJob
from common.data.events import DAY_MS, format_day
from common.data.synthetic import SyntheticData
from common.infra.settings import Settings, load_settings
from common.model.registry import Registry
from publisher.redis_users import COMPLETE, VersionStateError


def consistent(settings: Settings) -> bool:
    control = control_for(settings)
    release = control.pub.users.release()
    aliases = Registry(settings.models_dir).aliases()
    meta = control.pub.users.meta(release.champion) if release.champion else None
    return (aliases["champion"] == release.champion and meta is not None
            and meta.state == COMPLETE and control.pub.indexes.exists(release.champion))


def second_release(settings: Settings, data: SyntheticData, day_ms: int) -> str:
    """Another version, published and released over the first (the 'bad' one)."""
    version = bootstrap_job(settings, data.dataset, None, day_ms - DAY_MS, epochs=1,
                            promote=False).version
    control = control_for(settings)
    control.publish(version, data.dataset)
    control.promote(version, force=True)
    return version


def test_two_rollbacks_at_once_roll_back_once(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    env = nightly_env(tmp_path, redis_url, prefix)
    settings = load_settings(env)
    day_ms = day_ms_of(world)
    good = released_champion(settings, world.dataset, day_ms)
    bad = second_release(settings, world, day_ms)
    argv = [sys.executable, "-m", "recstream", "publisher", "rollback"]
    procs = [subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    fault.injected += 1
    assert sorted(code for code, _, _ in results) == [0, 1], results
    refused = next(err for code, _, err in results if code == 1)
    assert len(refused.strip().splitlines()) == 1  # one line saying why
    assert "withdrawn" in refused or "release changed" in refused
    release = control_for(settings).pub.users.release()
    assert (release.champion, release.previous) == (good, bad)
    assert bad in control_for(settings).pub.users.withdrawn()
    fault.versions_corrupted += not consistent(settings)
    fault.recovered += 1


def test_a_promote_while_a_nightly_waits_to_release_ends_consistent(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix,
                                         RECSTREAM_PUBLISHER_REBASE_TIMEOUT_S="3"))
    day_ms = day_ms_of(world)
    first = released_champion(settings, world.dataset, day_ms)
    other = bootstrap_job(settings, world.dataset, None, day_ms - DAY_MS, epochs=1,
                          promote=False).version
    control_for(settings).publish(other, world.dataset)
    land_day(settings, world, day_ms)
    outcome: dict[str, Any] = {}
    job = NightlyJob(settings, world.dataset, control_for(settings))
    nightly = threading.Thread(target=lambda: outcome.update(report=job.run(
        format_day(day_ms))))
    nightly.start()
    # The nightly waits up to 3 s for a rebase (no stream runs): promote meanwhile.
    wait_for(lambda: _published_nightly(settings), 120, "the nightly to publish")
    control_for(settings).promote(other, force=True)
    fault.injected += 1
    nightly.join(120)
    report = outcome["report"]
    release = control_for(settings).pub.users.release()
    # Whoever flipped last is champion; nothing half done.
    assert release.champion in (other, report.version) and release.champion != first
    fault.versions_corrupted += not consistent(settings)
    fault.recovered += 1
    assert fault.versions_corrupted == 0


def _published_nightly(settings: Settings) -> bool:
    registry, users = Registry(settings.models_dir), control_for(settings).pub.users
    return any(registry.meta(v).get("kind") == "nightly" and m.state == COMPLETE
               for v, m in users.versions().items())


def test_a_second_rollback_of_the_same_release_is_refused(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:  # noqa: F811
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    good = released_champion(settings, world.dataset, day_ms)
    bad = second_release(settings, world, day_ms)
    control = control_for(settings)
    assert control.rollback().champion == good
    with pytest.raises(VersionStateError, match=f"previous version {bad} was withdrawn"):
        control.rollback()  # would bring the bad release back
    assert control.pub.users.release().champion == good
