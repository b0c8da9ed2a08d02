"""The stream trainer publishing to Redis and FAISS: Redis outages, rebase before the
champion flip, and rollback while streaming (real broker, real Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from publishing import (
    control_for,
    exact_answer,
    published_item_vectors,
    released_champion,
    service_for,
)
from streaming import produce, stream_settings, wait_for
from test_stream_trainer import Running, _committed, _day

from batch.jobs import nightly_job
from common.data.synthetic import SyntheticConfig, SyntheticData, generate
from common.infra.settings import Settings
from publisher.redis_faiss import RedisFaissPublisher
from serving.watcher import ReleaseWatcher
from stream.consumer import TrainerConsumer

WORLD = SyntheticConfig(n_users=300, n_items=150, n_clusters=5, n_days=5, events_per_day=1500,
                        seed=4)


@pytest.fixture(scope="module")
def world() -> SyntheticData:
    return generate(WORLD)


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, topic: str, redis_url: str, prefix: str,
             world: SyntheticData) -> Settings:
    s = stream_settings(tmp_path, kafka_bootstrap, topic,
                        RECSTREAM_STREAM_PUBLISHER="redis", RECSTREAM_REDIS_URL=redis_url,
                        RECSTREAM_REDIS_PREFIX=prefix, RECSTREAM_REDIS_SOCKET_TIMEOUT_S="1",
                        RECSTREAM_STREAM_UPDATE_INTERVAL_S="0.5",
                        RECSTREAM_STREAM_MAX_BATCH_EVENTS="400",
                        RECSTREAM_STREAM_REBASE_CHECK_S="0.2",
                        RECSTREAM_SERVING_VERSION_POLL_S="0.2")
    released_champion(s, world.dataset, int(world.day_start_ms[2]))
    return s


@pytest.fixture
def running(settings: Settings, world: SyntheticData) -> Iterator[TrainerConsumer]:
    with Running(settings, world, RedisFaissPublisher.from_settings(settings)) as trainer:
        yield trainer


def _published_rows_match(settings: Settings, trainer: TrainerConsumer, users: list[str]
                          ) -> bool:
    """Redis holds, for ``users``, exactly the trainer's current ID rows in its version."""
    pub = RedisFaissPublisher.from_settings(settings)
    bundle = trainer.learner.bundle
    users = [u for u in users if u in bundle.user_vocab]
    rows = pub.users.read(trainer.learner.version, users)
    want = bundle.model.user.ids.weight[bundle.user_vocab.lookup(users)].numpy()
    return bool(rows.found.all()) and np.array_equal(rows.vectors, want)


def test_redis_down_during_a_delta_publish_commits_nothing_and_loses_nothing(
        settings: Settings, world: SyntheticData, redis_server: Any,
        running: TrainerConsumer) -> None:
    if redis_server.embedded is None:
        pytest.skip("stopping and restarting Redis needs the embedded server")
    first, second = _day(world, 2).take(np.arange(300)), _day(world, 2).take(np.arange(300, 600))
    produce(settings.kafka.bootstrap, settings.kafka.topic, first)
    wait_for(lambda: running.events_applied >= 300, 60, "the first events to be published")
    committed = _committed(settings, settings.kafka.partitions)
    assert sum(o or 0 for o in committed.values()) == 300
    redis_server.stop()
    try:
        produce(settings.kafka.bootstrap, settings.kafka.topic, second)
        wait_for(lambda: running.metrics.publish_failures._value.get() >= 2, 60,
                 "publishes to fail while Redis is down")
        assert _committed(settings, settings.kafka.partitions) == committed
        assert running.events_applied == 300
    finally:
        redis_server.start()
    wait_for(lambda: running.events_applied >= 600, 60, "the retried publish to go through")
    wait_for(lambda: sum(o or 0 for o in _committed(settings, settings.kafka.partitions)
                         .values()) == 600, 30, "the offsets to be committed")
    assert _published_rows_match(settings, running, second.user_id.tolist())


def test_a_nightly_is_flipped_only_after_the_stream_rebased_onto_it(
        settings: Settings, world: SyntheticData, running: TrainerConsumer) -> None:
    champion = running.learner.version
    day2 = _day(world, 2)
    produce(settings.kafka.bootstrap, settings.kafka.topic, day2.take(np.arange(500)))
    wait_for(lambda: running.events_applied >= 500, 60, "day 2 to be streamed")
    nightly = nightly_job(settings, world.dataset, int(world.day_start_ms[2]) - 86_400_000
                          ).version
    control = control_for(settings)
    control.publish(nightly, world.dataset)
    release = control.promote_when_rebased(nightly, timeout_s=60, poll_s=0.1, force=True)
    assert release.champion == nightly and release.previous == champion
    assert running.learner.version == nightly
    assert control.pub.users.rebased(nightly) is not None
    # The streamed day-2 users are in the new version's namespace as the trainer has them.
    assert _published_rows_match(settings, running, day2.user_id[:500].tolist())


def test_rollback_while_streaming_serves_the_previous_version_within_a_second(
        settings: Settings, world: SyntheticData, running: TrainerConsumer) -> None:
    old = running.learner.version
    control = control_for(settings)
    nightly = nightly_job(settings, world.dataset, int(world.day_start_ms[1])).version
    control.publish(nightly, world.dataset)
    control.promote_when_rebased(nightly, timeout_s=60, poll_s=0.1, force=True)
    service = service_for(settings)
    with ReleaseWatcher(service, settings.serving.version_poll_s):
        wait_for(lambda: service.current is not None and service.current.version == nightly,
                 10, "serving to load the nightly")
        day3 = _day(world, 3)
        produce(settings.kafka.bootstrap, settings.kafka.topic, day3.take(np.arange(300)))
        wait_for(lambda: running.events_applied >= 300, 60, "events on the nightly")
        control.rollback()
        t0 = time.monotonic()
        wait_for(lambda: service.current.version == old, 5, "serving to roll back",
                 interval_s=0.01)
        assert time.monotonic() - t0 < 1.0
        wait_for(lambda: running.learner.version == old, 30, "the trainer to follow")
        produce(settings.kafka.bootstrap, settings.kafka.topic, day3.take(np.arange(300, 600)))
        wait_for(lambda: running.events_applied >= 600, 60, "events after the rollback")
        users = day3.user_id[300:600].tolist()
        assert _published_rows_match(settings, running, users)
        user = next(u for u in users if u in running.learner.bundle.user_vocab)
        answer = service.recall(user, 10)
        assert answer.version == old and answer.fallback is None
        emb = running.learner.bundle.model.user.ids.weight[
            running.learner.bundle.user_vocab.lookup([user])].numpy()
        assert len(answer.items) == 10
        assert [i for i, _ in answer.items] == exact_answer(
            settings, world.dataset, old, user, 10, set(service.users.seen(user)), emb,
            dict(zip(*published_item_vectors(settings, old), strict=True)))
