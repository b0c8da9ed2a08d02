"""SIGKILL `recstream schedule --run-now` at every step of the nightly: the champion keeps
serving, nothing half-made is left behind, and the next run finishes the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from publishing import control_for, released_champion
from test_nightly_job import day_ms_of, land_day, nightly_env, world  # noqa: F401

from common.data.events import format_day
from common.data.synthetic import SyntheticData
from common.infra.settings import Settings, load_settings
from common.model.registry import Registry, RegistryError
from publisher.redis_users import COMPLETE

# Killed during the step after the one named (the job prints a line as each step ends).
KILL_AFTER = ["landed", "train", "evaluate", "register", "publish"]


def corrupted_versions(settings: Settings) -> int:
    """Registered versions that fail their checksums, plus released ones not published
    completely."""
    registry, control = Registry(settings.models_dir), control_for(settings)
    bad = 0
    for version in registry.versions():
        try:
            registry.load(version)
        except RegistryError:
            bad += 1
    champion = control.pub.users.release().champion
    meta = control.pub.users.meta(champion) if champion else None
    if champion and (meta is None or meta.state != COMPLETE
                     or not control.pub.indexes.exists(champion)):
        bad += 1
    return bad


def run_when_free(env: dict[str, str], kill_after: str | None
                  ) -> tuple[int | None, str, float]:
    """``run_now`` again while a killed run's lock has not expired (its TTL: 2 s here);
    returns its outcome and how long the lock kept it waiting."""
    start = time.monotonic()
    while True:
        code, out = run_now(env, kill_after)
        if "holds the lock" not in out:
            return code, out, time.monotonic() - start
        assert time.monotonic() - start < 30, out


def run_now(env: dict[str, str], kill_after: str | None) -> tuple[int | None, str]:
    """Run the scheduler once; SIGKILL it once a line containing ``kill_after`` shows."""
    proc = subprocess.Popen([sys.executable, "-m", "recstream", "schedule", "--run-now",
                             "--dataset", "synthetic"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if kill_after is not None and kill_after in line:
            proc.kill()
            proc.wait()
            return None, "".join(seen)
    return proc.wait(timeout=120), "".join(seen)


def test_sigkill_at_every_step_leaves_the_champion_and_a_rerun_releases(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    env_vars = nightly_env(tmp_path, redis_url, prefix, RECSTREAM_NIGHTLY_CATCHUP_DAYS="1",
                           RECSTREAM_NIGHTLY_LOCK_TTL_S="2",
                           RECSTREAM_PUBLISHER_REBASE_TIMEOUT_S="3")
    settings = load_settings(env_vars)
    day_ms = day_ms_of(world)
    # Pending: the days after the champion's data, oldest first; one per run here.
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    env = {**os.environ, **env_vars}
    day = format_day(day_ms)
    for i, step in enumerate(KILL_AFTER):
        code, out, waited = run_when_free(env, f"[nightly {day}] {step} ")
        assert code is None, f"the run ended before the kill point {step}:\n{out}"
        if i:  # the run after a kill got through once the lock expired
            fault.recovered += 1
            fault.recovery_s.append(waited)
        fault.injected += 1
        assert control_for(settings).pub.users.release().champion == champion
        assert Registry(settings.models_dir).aliases()["champion"] == champion
        fault.versions_corrupted += corrupted_versions(settings)
    code, out, waited = run_when_free(env, None)
    assert code == 0, out
    fault.recovered += 1
    fault.recovery_s.append(waited)
    release = control_for(settings).pub.users.release()
    registry = Registry(settings.models_dir)
    nightlies = [v for v in registry.versions() if registry.meta(v).get("day") == day]
    assert len(nightlies) == 1, nightlies  # resumed, not trained again after the register
    assert release.champion == nightlies[0] and release.previous == champion
    fault.versions_corrupted += corrupted_versions(settings)
    assert fault.versions_corrupted == 0

