"""Diverging training: an exploding dense learning rate in the nightly, and an exploding
ID-row rate in the stream. No version is registered, the champion keeps serving, and
the metrics an alert reads are set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from publishing import control_for, released_champion
from test_nightly_job import day_ms_of, land_day, nightly_env, world  # noqa: F401

from batch.metrics import NightlyMetrics
from batch.nightly import NightlyJob
from common.data.events import DAY_MS, format_day
from common.data.synthetic import SyntheticData
from common.infra.settings import load_settings
from common.model.registry import Registry
from stream.learner import StreamLearner, stream_train_settings


def test_an_exploding_nightly_registers_nothing_and_counts_a_failure(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    exploding = load_settings(nightly_env(tmp_path, redis_url, prefix,
                                          RECSTREAM_TRAIN_NIGHTLY_LR_DENSE="1e6",
                                          RECSTREAM_TRAIN_MAX_GRAD_NORM="1e9"))
    metrics = NightlyMetrics()
    report = NightlyJob(exploding, world.dataset, control_for(exploding), metrics).run(
        format_day(day_ms))
    fault.injected += 1
    assert report.result in ("failed", "refused"), report
    assert report.reason.startswith(("train: ", "gate: ")), report.reason
    assert Registry(settings.models_dir).versions() == [champion]
    assert control_for(settings).pub.users.release().champion == champion
    assert metrics.runs.labels(report.result)._value.get() == 1  # what an alert reads
    assert metrics.last_success._value.get() == 0
    fault.recovered += 1  # the champion never stopped serving


def test_a_stream_step_that_would_write_non_finite_rows_changes_nothing(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,  # noqa: F811
        fault) -> None:
    # An infinite ID-row learning rate: the loss is finite, the update is not.
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix,
                                         RECSTREAM_STREAM_LR_EMBEDDING="inf"))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    bundle, _ = Registry(settings.models_dir).load(champion)
    before = {n: p.detach().clone() for n, p in bundle.model.state_dict().items()}
    learner = StreamLearner(bundle, world.dataset, stream_train_settings(settings), champion)
    events = world.dataset.events.between(day_ms, day_ms + DAY_MS).take(np.arange(1000))
    out = learner.step(events, 1)
    fault.injected += 1
    assert out.diverged and out.n_examples == 0  # the consumer counts it (diverged steps)
    assert np.isfinite(out.user_vectors).all() and np.isfinite(out.item_vectors).all()
    after = bundle.model.state_dict()
    for name, value in before.items():
        now = after[name]
        if value.ndim:  # ID tables may have grown rows for new ids; the old rows hold
            now = now[: len(value)]
        assert bool((now == value).all()), name  # nothing written
    fault.recovered += 1
