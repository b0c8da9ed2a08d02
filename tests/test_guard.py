"""Guard after promotion: the new champion is scored against the previous version on the
first streamed positives after the promotion, and rolled back when it does worse —
against a real broker, a real Redis and real FAISS indexes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from publishing import control_for, publish_env
from streaming import SMALL_MODEL, produce

from batch.guard import GuardMetrics, PromotionGuard, stream_end_offsets
from batch.jobs import bootstrap_job, nightly_job
from common.data.events import DAY_MS, Events, format_day
from common.data.synthetic import SyntheticConfig, SyntheticData, generate
from common.infra.kafka_clients import ensure_topics
from common.infra.settings import Settings, load_settings
from common.model.registry import Registry
from common.model.towers import TwoTower
from publisher.control import ReleaseControl

DAY_INDEX = 3
GUARD_EVENTS = 1000


@dataclass(frozen=True)
class Models:
    """A registry holding a bootstrap (``previous``), a good nightly on top of it and a
    broken one (weights re-initialised, as a run gone wrong would leave them)."""

    root: Path
    previous: str
    good: str
    broken: str


@pytest.fixture(scope="module")
def world() -> SyntheticData:
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def models(world: SyntheticData, tmp_path_factory: pytest.TempPathFactory) -> Models:
    home = tmp_path_factory.mktemp("guard-models")
    settings = load_settings({"RECSTREAM_HOME": str(home), "RECSTREAM_TRAIN_BATCH_SIZE": "128",
                              "RECSTREAM_TRAIN_THREADS": "1", **SMALL_MODEL})
    day_ms = day_ms_of(world)
    previous = bootstrap_job(settings, world.dataset, None, day_ms, epochs=1,
                             promote=True).version
    good = nightly_job(settings, world.dataset, day_ms).version
    registry = Registry(settings.models_dir)
    bundle, _ = registry.load(previous)
    torch.manual_seed(1)
    bundle.model.load_weights(TwoTower(bundle.model.current_config()).state_dict())
    broken = registry.register(bundle, kind="nightly", cutoff_ms=day_ms + DAY_MS,
                               parent=previous, metrics={}, config_hash=settings.model_hash(),
                               extra={"dataset": world.dataset.name,
                                      "day": format_day(day_ms)})
    return Models(settings.models_dir, previous, good, broken)


def day_ms_of(world: SyntheticData) -> int:
    return int(world.day_start_ms[DAY_INDEX])


def guard_settings(tmp_path: Path, models: Models, redis_url: str, prefix: str,
                   kafka_bootstrap: str, topic: str, **extra: str) -> Settings:
    """Settings against the test broker and Redis, over a copy of the trained models."""
    shutil.copytree(models.root, tmp_path / "models")
    settings = load_settings(publish_env(tmp_path, redis_url, prefix, **{
        "RECSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap, "RECSTREAM_KAFKA_TOPIC": topic,
        "RECSTREAM_NIGHTLY_GUARD_EVENTS": str(GUARD_EVENTS),
        "RECSTREAM_NIGHTLY_GUARD_TIMEOUT_S": "60", **extra}))
    ensure_topics(settings.kafka, kafka_bootstrap, [topic])
    return settings


def guard_for(settings: Settings, world: SyntheticData, control: ReleaseControl,
              registry: CollectorRegistry) -> PromotionGuard:
    """The guard over the test broker, its figures on ``registry``."""
    return PromotionGuard(settings.nightly, settings.eval, settings.train, settings.kafka,
                          settings.kafka.bootstrap, world.dataset, control,
                          GuardMetrics(registry))


def promoted(settings: Settings, world: SyntheticData, previous: str,
             new: str) -> ReleaseControl:
    """Release ``previous``, then promote ``new`` over it (forced: no offline metrics)."""
    control = control_for(settings)
    for version in (previous, new):
        control.publish(version, world.dataset)
    control.promote(previous)
    control.promote(new, force=True)
    return control


def next_day(world: SyntheticData, n: int) -> Events:
    """The first ``n`` events of the day after the nightly's day."""
    start = day_ms_of(world) + DAY_MS
    return world.dataset.events.between(start, start + DAY_MS).take(np.arange(n))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_better_champion_is_kept(
        tmp_path: Path, redis_url: str, prefix: str, kafka_bootstrap: str, topic: str,
        world: SyntheticData, models: Models) -> None:
    settings = guard_settings(tmp_path, models, redis_url, prefix, kafka_bootstrap, topic)
    control = promoted(settings, world, models.previous, models.good)
    start = stream_end_offsets(settings.kafka, settings.kafka.bootstrap)
    produce(kafka_bootstrap, topic, next_day(world, 2 * GUARD_EVENTS))
    registry = CollectorRegistry()
    result = guard_for(settings, world, control, registry).check(
        models.good, models.previous, start)
    assert result.decision == "keep", result.reason
    assert result.events == GUARD_EVENTS and 0 < result.scored <= GUARD_EVENTS
    assert result.k == 50 and result.champion_recall >= result.previous_recall - 0.02
    release = control.pub.users.release()
    assert (release.champion, release.previous) == (models.good, models.previous)
    assert sample(registry, "recstream_auto_rollbacks_total") == 0
    assert sample(registry, "recstream_guard_checks_total", decision="keep") == 1
    assert sample(registry, "recstream_guard_recall", model="champion") == \
        result.champion_recall


def test_a_broken_champion_is_rolled_back_and_withdrawn(
        tmp_path: Path, redis_url: str, prefix: str, kafka_bootstrap: str, topic: str,
        world: SyntheticData, models: Models) -> None:
    settings = guard_settings(tmp_path, models, redis_url, prefix, kafka_bootstrap, topic)
    control = promoted(settings, world, models.previous, models.broken)
    start = stream_end_offsets(settings.kafka, settings.kafka.bootstrap)
    produce(kafka_bootstrap, topic, next_day(world, 2 * GUARD_EVENTS))
    registry = CollectorRegistry()
    result = guard_for(settings, world, control, registry).check(
        models.broken, models.previous, start)
    assert result.decision == "rollback", result.reason
    assert result.champion_recall < result.previous_recall - 0.02
    assert f"rolled back to {models.previous}" in result.reason
    assert control.pub.users.release().champion == models.previous
    assert models.broken in control.pub.users.withdrawn()
    assert control.registry.aliases()["champion"] == models.previous
    assert sample(registry, "recstream_auto_rollbacks_total") == 1
    assert sample(registry, "recstream_guard_checks_total", decision="rollback") == 1
    assert sample(registry, "recstream_guard_recall", model="previous") == \
        result.previous_recall


def test_a_release_changed_meanwhile_is_left_alone(
        tmp_path: Path, redis_url: str, prefix: str, kafka_bootstrap: str, topic: str,
        world: SyntheticData, models: Models) -> None:
    settings = guard_settings(tmp_path, models, redis_url, prefix, kafka_bootstrap, topic)
    control = promoted(settings, world, models.previous, models.broken)
    start = stream_end_offsets(settings.kafka, settings.kafka.bootstrap)
    # An operator promotes another version before the guard has its events.
    control.publish(models.good, world.dataset)
    before = control.promote(models.good, force=True)
    produce(kafka_bootstrap, topic, next_day(world, 2 * GUARD_EVENTS))
    registry = CollectorRegistry()
    result = guard_for(settings, world, control, registry).check(
        models.broken, models.previous, start)
    assert result.decision == "undecided"
    assert "release changed meanwhile" in result.reason
    assert result.champion_recall < result.previous_recall - 0.02  # it would have
    assert control.pub.users.release() == before
    assert models.good not in control.pub.users.withdrawn()
    assert sample(registry, "recstream_auto_rollbacks_total") == 0
    assert sample(registry, "recstream_guard_checks_total", decision="undecided") == 1


def test_too_few_events_before_the_timeout_decide_nothing(
        tmp_path: Path, redis_url: str, prefix: str, kafka_bootstrap: str, topic: str,
        world: SyntheticData, models: Models) -> None:
    settings = guard_settings(tmp_path, models, redis_url, prefix, kafka_bootstrap, topic,
                              RECSTREAM_NIGHTLY_GUARD_TIMEOUT_S="3")
    control = promoted(settings, world, models.previous, models.broken)
    # Events from before the promotion are not the guard's: it starts at the ends.
    produce(kafka_bootstrap, topic, world.dataset.events.take(np.arange(300)))
    start = stream_end_offsets(settings.kafka, settings.kafka.bootstrap)
    assert sum(start.values()) == 300
    produce(kafka_bootstrap, topic, next_day(world, 50))
    before = control.pub.users.release()
    registry = CollectorRegistry()
    result = guard_for(settings, world, control, registry).check(
        models.broken, models.previous, start)
    assert result.decision == "undecided" and result.events == 50
    assert f"only 50 of {GUARD_EVENTS} positives" in result.reason
    assert control.pub.users.release() == before
    assert sample(registry, "recstream_auto_rollbacks_total") == 0
    assert sample(registry, "recstream_guard_checks_total", decision="undecided") == 1
