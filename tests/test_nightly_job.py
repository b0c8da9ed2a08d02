"""`recstream nightly`: landed check, train, held-out evaluation against the champion,
gate, register, publish, promote — against a real Redis and real FAISS indexes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from publishing import control_for, publish_env, released_champion

from batch.metrics import NightlyMetrics
from batch.nightly import NightlyJob, pending_days
from common.data.events import DAY_MS, format_day
from common.data.synthetic import SyntheticConfig, SyntheticData, generate
from common.data.wire import decode_event, encode_event
from common.infra.settings import Settings, load_settings
from common.model.registry import Registry
from recstream.cli import main
from stream.parts import write_part

DAY_INDEX = 3
STEPS = ["landed", "train", "evaluate", "gate", "register", "publish", "promote"]


@pytest.fixture(scope="module")
def world() -> SyntheticData:
    return generate(SyntheticConfig())


def nightly_env(tmp_path: Path, redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    # No guard here (tests/test_guard.py and test_scheduler.py watch releases).
    return publish_env(tmp_path, redis_url, prefix, **{
        "RECSTREAM_NIGHTLY_LATENESS_S": "0", "RECSTREAM_PUBLISHER_REBASE_TIMEOUT_S": "0.1",
        "RECSTREAM_NIGHTLY_GUARD_EVENTS": "0", **extra})


def land_day(settings: Settings, world: SyntheticData, day_ms: int,
             next_day_events: int = 5) -> None:
    """Land the day (two partitions) and the first events after its midnight."""
    events = world.dataset.events
    day = events.between(day_ms, day_ms + DAY_MS)
    rows = [(decode_event(encode_event(r)), n) for n, r in enumerate(day.to_records())]
    write_part(settings.events_dir, format_day(day_ms), 0, rows[: len(rows) // 2])
    write_part(settings.events_dir, format_day(day_ms), 1, rows[len(rows) // 2:])
    if next_day_events:
        after = events.between(day_ms + DAY_MS, None).take(np.arange(next_day_events))
        late = [(decode_event(encode_event(r)), len(rows) + n)
                for n, r in enumerate(after.to_records())]
        write_part(settings.events_dir, format_day(day_ms + DAY_MS), 0, late)


def day_ms_of(world: SyntheticData) -> int:
    return int(world.day_start_ms[DAY_INDEX])


def test_a_landed_day_is_trained_evaluated_published_and_released(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    metrics = NightlyMetrics()
    report = NightlyJob(settings, world.dataset, control_for(settings), metrics).run(
        format_day(day_ms))
    assert report.result == "released", report.reason
    assert list(report.steps) == STEPS
    assert report.champion == report.version != champion
    assert control_for(settings).pub.users.release().champion == report.version
    meta = Registry(settings.models_dir).meta(report.version)
    assert meta["kind"] == "nightly" and meta["parent"] == champion and meta["source"] == "landed"
    # The held-out tail is not trained on: the cutoff is its start, inside the day.
    assert day_ms < meta["cutoff_ms"] < day_ms + DAY_MS
    assert meta["eval"]["against"] == champion and meta["eval"]["gate"]["passed"]
    # A day of planted clusters teaches the warm-started model something measurable.
    assert report.metrics["recall@50"] > report.champion_metrics["recall@50"]
    assert metrics.runs.labels("released")._value.get() == 1
    assert metrics.gate.labels("pass")._value.get() == 1


def test_a_day_not_completely_landed_fails_and_leaves_the_champion(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms, next_day_events=0)  # the watermark is before midnight
    report = NightlyJob(settings, world.dataset, control_for(settings)).run(format_day(day_ms))
    assert report.result == "failed" and report.reason.startswith("landed: ")
    assert "not completely landed" in report.reason
    assert report.champion == champion
    assert Registry(settings.models_dir).versions() == [champion]


def test_a_refused_candidate_is_not_registered(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:
    # recall@7 is not among the evaluated ks: the gate metric is missing, so it refuses.
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix,
                                         RECSTREAM_EVAL_GATE_METRIC="recall@7"))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    metrics = NightlyMetrics()
    report = NightlyJob(settings, world.dataset, control_for(settings), metrics).run(
        format_day(day_ms))
    assert report.result == "refused" and report.reason.startswith("gate: recall@7 is nan")
    assert Registry(settings.models_dir).versions() == [champion]
    assert control_for(settings).pub.users.release().champion == champion
    assert metrics.gate.labels("refuse")._value.get() == 1


def test_diverging_training_registers_nothing(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:
    day_ms = day_ms_of(world)
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    # Any loss above 1e-9 now counts as divergence.
    strict = load_settings(nightly_env(tmp_path, redis_url, prefix,
                                       RECSTREAM_TRAIN_MAX_LOSS="1e-9"))
    report = NightlyJob(strict, world.dataset, control_for(strict)).run(format_day(day_ms))
    assert report.result == "failed" and report.reason.startswith("train: ")
    assert Registry(settings.models_dir).versions() == [champion]


def test_a_rerun_resumes_a_registered_version_and_then_is_up_to_date(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    champion = released_champion(settings, world.dataset, day_ms)
    land_day(settings, world, day_ms)
    owner = iter([True, False])  # the lock is lost after registering, before publishing
    first = NightlyJob(settings, world.dataset, control_for(settings),
                       still_owner=lambda: next(owner)).run(format_day(day_ms))
    assert first.result == "failed" and first.reason.startswith("publish: ")
    assert control_for(settings).pub.users.release().champion == champion
    second = NightlyJob(settings, world.dataset, control_for(settings)).run(format_day(day_ms))
    assert second.result == "released" and second.version == first.version
    assert "train" not in second.steps
    third = NightlyJob(settings, world.dataset, control_for(settings)).run(format_day(day_ms))
    assert third.result == "up_to_date" and third.champion == first.version


def test_pending_days_run_from_the_champion_to_yesterday(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData) -> None:
    settings = load_settings(nightly_env(tmp_path, redis_url, prefix))
    day_ms = day_ms_of(world)
    released_champion(settings, world.dataset, day_ms)  # trained through day_ms - 1 day
    registry = Registry(settings.models_dir)
    today = day_ms + 3 * DAY_MS + 7_200_000  # 02:00, three days on
    assert pending_days(registry, today, limit=5) == [format_day(day_ms + i * DAY_MS)
                                                      for i in range(3)]
    assert pending_days(registry, today, limit=2) == [format_day(day_ms),
                                                      format_day(day_ms + DAY_MS)]
    assert pending_days(registry, day_ms + 7_200_000, limit=5) == []


def test_cli_prints_the_report_and_exits_non_zero_with_the_reason(
        tmp_path: Path, redis_url: str, prefix: str, world: SyntheticData,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = nightly_env(tmp_path, redis_url, prefix)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(env)
    day_ms = day_ms_of(world)
    released_champion(settings, world.dataset, day_ms)
    day = format_day(day_ms)
    assert main(["nightly", "--dataset", "synthetic", "--day", day]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["result"] == "failed"
    assert f"recstream nightly: error: landed: {day} is not completely landed" in err
    land_day(settings, world, day_ms)
    assert main(["nightly", "--dataset", "synthetic", "--day", day]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["result"] == "released"
    assert f"[nightly {day}] train" in err
    textfile = (tmp_path / "metrics" / "nightly.prom").read_text()
    assert 'recstream_nightly_runs_total{result="released"} 1.0' in textfile
