"""A full publish killed half way (SIGKILL, real process): readers keep the released
version intact, the half version cannot be released, and a restarted publish
completes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from publishing import (
    control_for,
    exact_answer,
    publish_env,
    publish_settings,
    released_champion,
    service_for,
)

from batch.jobs import nightly_job
from common.data.synthetic import SyntheticConfig, generate
from publisher.redis_users import WRITING, VersionStateError
from serving.recall import wait_until_serving

# The child publishes for real and SIGKILLs itself after writing half of the users.
_KILL_MID_PUBLISH = """
import os, signal, sys
from common.infra.settings import load_settings
from common.data.synthetic import SyntheticConfig, generate
from publisher.control import ReleaseControl
from publisher.redis_users import UserStore

real_write = UserStore.write
def write_half_then_die(self, version, ids, vectors, features=None):
    half = len(ids) // 2
    real_write(self, version, ids[:half], vectors[:half],
               None if features is None else features[:half])
    os.kill(os.getpid(), signal.SIGKILL)
UserStore.write = write_half_then_die
dataset = generate(SyntheticConfig(**eval(sys.argv[2]))).dataset
settings = load_settings()
ReleaseControl.from_settings(settings).publish(sys.argv[1], dataset)
"""
CONFIG = {"n_users": 400, "n_items": 200, "n_days": 4, "events_per_day": 2000, "seed": 5}


def test_killed_full_publish_leaves_readers_on_the_released_version(
        tmp_path: Path, redis_url: str, prefix: str, fault) -> None:
    data = generate(SyntheticConfig(**CONFIG))
    settings = publish_settings(tmp_path, redis_url, prefix)
    v1 = released_champion(settings, data.dataset, int(data.day_start_ms[2]))
    v2 = nightly_job(settings, data.dataset, int(data.day_start_ms[2])).version
    service = service_for(settings)
    wait_until_serving(service, v1)
    user = control_for(settings).registry.load(v1)[0].user_vocab.ids[0]
    before = service.recall(user, 10)

    child = subprocess.run(
        [sys.executable, "-c", _KILL_MID_PUBLISH, v2, repr(CONFIG)], capture_output=True,
        text=True, timeout=120, cwd=Path(__file__).parents[2],
        env={**os.environ, **publish_env(tmp_path, redis_url, prefix)})
    assert child.returncode == -9, child.stderr[-2000:]
    fault.injected += 1

    control = control_for(settings)
    assert control.pub.users.meta(v2).state == WRITING
    assert control.pub.users.release().champion == v1
    service.refresh()
    after = service.recall(user, 10)
    assert after == before and after.version == v1
    assert [i for i, _ in after.items] == exact_answer(
        settings, data.dataset, v1, user, 10, set(service.users.seen(user)))
    with pytest.raises(VersionStateError, match="not published completely"):
        control.promote(v2, force=True)

    fault.versions_corrupted += after.version != v1  # readers never saw the half version
    control.publish(v2, data.dataset)  # the operator runs it again
    control.promote(v2, force=True)
    wait_until_serving(service, v2)
    answer = service.recall(user, 10)
    assert answer.version == v2 and answer.fallback is None
    assert [i for i, _ in answer.items] == exact_answer(
        settings, data.dataset, v2, user, 10, set(service.users.seen(user)))
    fault.recovered += 1
