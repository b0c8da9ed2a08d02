"""The trainer consumer against a real broker: what a step may change, dead letters,
the commit-after-publish rule, restarts from checkpoints and the rebase."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition
from streaming import bootstrap_champion, produce, stream_settings, wait_for

import stream.consumer as consumer_module
from batch.jobs import nightly_job
from common.data.events import Events
from common.data.synthetic import SyntheticConfig, SyntheticData, generate
from common.infra.settings import Settings, load_settings
from common.infra.shutdown import StopFlag
from common.model.registry import Registry, VersionNotFoundError
from publisher.base import Delta, PublishError
from publisher.files import FilePublisher
from stream.checkpoint import load_checkpoint
from stream.consumer import TrainerConsumer
from stream.lock import TrainerLockedError, exclusive_lock

WORLD = SyntheticConfig(n_users=300, n_items=150, n_clusters=5, n_days=4, events_per_day=1500,
                        seed=3)


@pytest.fixture(scope="module")
def world() -> SyntheticData:
    return generate(WORLD)


def _day(world: SyntheticData, d: int) -> Events:
    starts = world.day_start_ms
    return world.dataset.events.between(int(starts[d]), int(starts[d]) + 86_400_000)


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, topic: str, world: SyntheticData
             ) -> Settings:
    s = stream_settings(tmp_path, kafka_bootstrap, topic,
                        RECSTREAM_STREAM_UPDATE_INTERVAL_S="0.5",
                        RECSTREAM_STREAM_MAX_BATCH_EVENTS="400",
                        RECSTREAM_STREAM_REBASE_CHECK_S="0.2")
    bootstrap_champion(s, world.dataset, int(world.day_start_ms[2]))
    return s


class Running:
    """A trainer consumer on a thread, stopped (gracefully) on exit."""

    def __init__(self, settings: Settings, world: SyntheticData, publisher: object) -> None:
        self.stop = StopFlag()
        self.trainer = TrainerConsumer.from_settings(
            settings, world.dataset, publisher,  # type: ignore[arg-type]
            settings.kafka.bootstrap, stop=self.stop)
        self.thread = threading.Thread(target=self.trainer.run, daemon=True)

    def __enter__(self) -> TrainerConsumer:
        self.trainer.start()
        self.thread.start()
        return self.trainer

    def __exit__(self, *exc: object) -> None:
        self.stop.set("test over")
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the trainer did not shut down"


def _applied(trainer: TrainerConsumer, n: int) -> bool:
    return trainer.events_applied >= n


def _committed(settings: Settings, partitions: int) -> dict[int, int | None]:
    probe = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap,
                          group_id=settings.stream.trainer_group, enable_auto_commit=False)
    try:
        return {p: probe.committed(TopicPartition(settings.kafka.topic, p))
                for p in range(partitions)}
    finally:
        probe.close()


def test_a_step_changes_only_touched_id_rows(settings: Settings, world: SyntheticData) -> None:
    events = _day(world, 2).take(np.arange(300))
    publisher = FilePublisher(settings.home / "published")
    before = {k: v.clone() for k, v in Registry(settings.models_dir).load("champion")[0]
              .model.state_dict().items()}
    produce(settings.kafka.bootstrap, settings.kafka.topic, events)
    with Running(settings, world, publisher) as trainer:
        wait_for(lambda: _applied(trainer, len(events)), 60, "the events to be applied")
    after = trainer.learner.bundle.model.state_dict()
    for name, tensor in before.items():
        if ".ids." not in name:
            assert torch.equal(tensor, after[name]), f"dense {name} changed"
    bundle = trainer.learner.bundle
    for side, ids in (("user", events.user_id), ("item", events.item_id)):
        vocab = getattr(bundle, f"{side}_vocab")
        touched = set(vocab.lookup_many(ids).tolist()) | {0}
        old, new = before[f"{side}.ids.weight"], after[f"{side}.ids.weight"]
        changed = set(torch.nonzero((old != new[: len(old)]).any(dim=1)).flatten().tolist())
        if side == "item":  # the stream's default steps user rows only (item_lr_scale 0)
            assert settings.stream.item_lr_scale == 0 and not changed, changed
            continue
        assert changed, f"no {side} row was updated"
        assert changed <= touched, f"{side} rows outside the batch changed"
    published = publisher.read(trainer.learner.version)
    assert set(published.users) == set(events.user_id) & set(bundle.user_vocab.ids)
    row = bundle.user_vocab.lookup([events.user_id[0]])
    np.testing.assert_array_equal(published.users[events.user_id[0]],
                                  after["user.ids.weight"][row[0]].numpy())


POISON = {
    b"{not json": "not JSON",
    b'{"event_id": "p1", "user_id": 7, "item_id": "i1", "event_type": "click", '
    b'"ts_ms": 1700000000000}': "user_id must be a string",
    b'{"event_id": "p2", "user_id": "u1", "item_id": "i1", "event_type": "purchase!", '
    b'"ts_ms": 1700000000000}': "unknown event_type",
    b'{"event_id": "p3", "item_id": "i1", "event_type": "click", "ts_ms": 1700000000000}':
        "missing field: user_id",
    b'{"event_id": "p4", "user_id": "u1", "item_id": "i1", "event_type": "click", '
    b'"ts_ms": "yesterday"}': "ts_ms must be an integer",
    b'{"event_id": "p5", "user_id": "u1", "item_id": "' + b"x" * 70_000 + b'", '
    b'"event_type": "click", "ts_ms": 1700000000000}': "exceeds the 65536-byte limit",
}


def test_poison_events_are_dead_lettered_with_reasons(settings: Settings,
                                                      world: SyntheticData) -> None:
    good = _day(world, 2).take(np.arange(200))
    produce(settings.kafka.bootstrap, settings.kafka.topic, good, raw=list(POISON))
    produce(settings.kafka.bootstrap, settings.kafka.topic, _day(world, 2).take(
        np.arange(200, 400)))
    with Running(settings, world, FilePublisher(settings.home / "published")) as trainer:
        wait_for(lambda: _applied(trainer, 400), 60, "the good events to be applied")
    assert trainer.events_applied == 400
    assert trainer.intake.dead_letters == len(POISON)
    dlq = KafkaConsumer(settings.kafka.dlq_topic, bootstrap_servers=settings.kafka.bootstrap,
                        auto_offset_reset="earliest", consumer_timeout_ms=10_000)
    letters = [dict(r.headers) for r in dlq]
    dlq.close()
    reasons = sorted(h["reason"].decode() for h in letters)
    assert len(reasons) == len(POISON)
    for expected in POISON.values():
        assert any(expected in r for r in reasons), f"no dead letter says {expected!r}"
    assert all(h["source.topic"].decode() == settings.kafka.topic for h in letters)


class FailingPublisher(FilePublisher):
    """Fails every publish until told to recover, counting the attempts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.healthy = threading.Event()
        self.attempts = 0

    def publish_delta(self, delta: Delta) -> None:
        self.attempts += 1
        if not self.healthy.is_set():
            raise PublishError("injected: store unavailable")
        super().publish_delta(delta)


def test_offsets_wait_for_a_successful_publish(settings: Settings, world: SyntheticData,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    events = _day(world, 2).take(np.arange(300))
    produce(settings.kafka.bootstrap, settings.kafka.topic, events)
    publisher = FailingPublisher(settings.home / "published")
    with Running(settings, world, publisher) as trainer:
        wait_for(lambda: publisher.attempts >= 3, 60, "three failed publishes")
        assert set(_committed(settings, settings.kafka.partitions).values()) == {None}
        assert trainer.events_applied == 0
        assert trainer.health() is None  # failing for seconds, not yet a minute
        monkeypatch.setattr(consumer_module, "_PUBLISH_FAILING_S", 0.0)
        reason = trainer.health()
        assert reason is not None and "publishing has failed" in reason \
            and "injected: store unavailable" in reason
        publisher.healthy.set()
        wait_for(lambda: _applied(trainer, len(events)), 60, "the retried publish")
        assert trainer.health() is None
    committed = _committed(settings, settings.kafka.partitions)
    published = publisher.read(trainer.learner.version).offsets
    assert sum(o or 0 for o in committed.values()) == len(events)
    assert all((committed[p] or 0) <= published.get(p, 0) for p in committed)


def test_stop_during_failed_publish_commits_and_checkpoints_nothing(
        settings: Settings, world: SyntheticData) -> None:
    events = _day(world, 2).take(np.arange(300))
    produce(settings.kafka.bootstrap, settings.kafka.topic, events)
    publisher = FailingPublisher(settings.home / "published")
    with Running(settings, world, publisher):
        wait_for(lambda: publisher.attempts >= 2, 60, "failed publishes")
    saved = load_checkpoint(settings.checkpoints_dir / "trainer")
    # Only the starting point (recorded before anything could be committed) is saved.
    assert saved is None or (saved[0].step == 0 and saved[0].events_applied == 0)
    assert set(_committed(settings, settings.kafka.partitions).values()) == {None}
    with Running(settings, world, FilePublisher(settings.home / "published")) as trainer:
        wait_for(lambda: _applied(trainer, len(events)), 60, "the replayed events")
    assert trainer.events_applied == len(events)


def test_restart_resumes_from_the_checkpoint(settings: Settings, world: SyntheticData) -> None:
    first, second = _day(world, 2).take(np.arange(400)), _day(world, 2).take(np.arange(400, 800))
    produce(settings.kafka.bootstrap, settings.kafka.topic, first)
    publisher = FilePublisher(settings.home / "published")
    with Running(settings, world, publisher) as trainer:
        wait_for(lambda: _applied(trainer, 400), 60, "the first events")
    saved = load_checkpoint(settings.checkpoints_dir / "trainer")
    assert saved is not None and sum(saved[0].offsets.values()) == 400
    produce(settings.kafka.bootstrap, settings.kafka.topic, second)
    with Running(settings, world, publisher) as trainer:
        assert trainer.events_applied == 400  # restored, not started over
        wait_for(lambda: _applied(trainer, 800), 60, "the second events")
    assert trainer.events_applied == 800
    assert len(trainer.learner.bundle.user_vocab) > 1


def test_rebase_replays_events_after_the_cutoff_onto_the_new_version(
        settings: Settings, world: SyntheticData) -> None:
    day2, day3 = _day(world, 2), _day(world, 3).take(np.arange(600))
    produce(settings.kafka.bootstrap, settings.kafka.topic, day2)
    produce(settings.kafka.bootstrap, settings.kafka.topic, day3)
    publisher = FilePublisher(settings.home / "published")
    with Running(settings, world, publisher) as trainer:
        base = trainer.learner.version
        wait_for(lambda: _applied(trainer, len(day2) + len(day3)), 90, "days 2 and 3")
        nightly = nightly_job(settings, world.dataset, int(world.day_start_ms[2]))
        wait_for(lambda: publisher.is_rebased(nightly.version), 90, "the rebase")
        assert trainer.learner.version == nightly.version
    replayed = publisher.read(nightly.version)
    # Everything after the cutoff (day 3) was carried over; day 2 is in the nightly itself.
    day3_users = set(day3.user_id) & set(trainer.learner.bundle.user_vocab.ids)
    assert day3_users <= set(replayed.users)
    assert not set(day2.user_id) - set(day3.user_id) & set(replayed.users)
    assert trainer.metrics.rebases._value.get() == 1
    assert base != nightly.version


def test_a_second_trainer_on_the_same_home_is_refused(settings: Settings,
                                                      world: SyntheticData) -> None:
    publisher = FilePublisher(settings.home / "published")
    with Running(settings, world, publisher), pytest.raises(TrainerLockedError, match="pid"):
        TrainerConsumer.from_settings(settings, world.dataset, publisher,
                                      settings.kafka.bootstrap).start()


def test_constructing_a_trainer_opens_nothing(tmp_path: Path, world: SyntheticData) -> None:
    settings = load_settings({"RECSTREAM_HOME": str(tmp_path / "home"),
                              "RECSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:9"})  # nothing listens
    trainer = TrainerConsumer.from_settings(settings, world.dataset,
                                            FilePublisher(tmp_path / "published"),
                                            settings.kafka.bootstrap)
    assert not (tmp_path / "home").exists() and not multiprocessing.active_children()
    trainer.close()  # nothing to release
    with pytest.raises(RuntimeError, match="start"):
        trainer.run()


def test_a_start_that_fails_releases_what_it_opened(tmp_path: Path, kafka_bootstrap: str,
                                                    topic: str, world: SyntheticData) -> None:
    settings = stream_settings(tmp_path, kafka_bootstrap, topic)  # no champion to start from
    trainer = TrainerConsumer.from_settings(settings, world.dataset,
                                            FilePublisher(tmp_path / "published"),
                                            kafka_bootstrap)
    with pytest.raises(VersionNotFoundError):
        trainer.start()
    assert not multiprocessing.active_children()  # the fetch process is gone
    exclusive_lock(settings.checkpoints_dir / "trainer").close()  # and the lock is free


def test_a_rebalance_checkpoints_and_loses_or_repeats_nothing(
        settings: Settings, world: SyntheticData) -> None:
    first, second = _day(world, 2).take(np.arange(400)), _day(world, 2).take(np.arange(400, 800))
    produce(settings.kafka.bootstrap, settings.kafka.topic, first)
    with Running(settings, world, FilePublisher(settings.home / "published")) as trainer:
        wait_for(lambda: _applied(trainer, 400), 60, "the first events")
        produce(settings.kafka.bootstrap, settings.kafka.topic, second)
        # A second member joins the group: the trainer's partitions are revoked.
        intruder = KafkaConsumer(settings.kafka.topic, bootstrap_servers=settings.kafka.bootstrap,
                                 group_id=settings.stream.trainer_group,
                                 enable_auto_commit=False, session_timeout_ms=6000,
                                 heartbeat_interval_ms=1000)
        try:
            wait_for(lambda: bool(intruder.poll(200) or intruder.assignment()), 60,
                     "the intruder to get partitions")
            assert load_checkpoint(settings.checkpoints_dir / "trainer") is not None
        finally:
            intruder.close(autocommit=False)
        wait_for(lambda: _applied(trainer, 800), 90, "every event after the rebalance")
        assert trainer.events_applied == 800
    assert sum(trainer.offsets.values()) == 800


class BrokenPublisher(FilePublisher):
    """Raises an unexpected error (not a PublishError) on the second publish."""

    def publish_delta(self, delta: Delta) -> None:
        if delta.step >= 2:
            raise RuntimeError("injected: a bug in the store client")
        super().publish_delta(delta)


def test_an_unexpected_error_mid_step_saves_nothing_unpublished(
        settings: Settings, world: SyntheticData) -> None:
    produce(settings.kafka.bootstrap, settings.kafka.topic, _day(world, 2).take(np.arange(800)))
    trainer = TrainerConsumer.from_settings(settings, world.dataset,
                                            BrokenPublisher(settings.home / "p"),
                                            settings.kafka.bootstrap)
    trainer.start()
    with pytest.raises(RuntimeError, match="injected"):
        trainer.run()
    saved = load_checkpoint(settings.checkpoints_dir / "trainer")
    assert saved is not None and saved[0].step <= 1  # never the step that was not published
    # The lock was released: a new trainer can take over and finish the job.
    with Running(settings, world, FilePublisher(settings.home / "p")) as again:
        wait_for(lambda: _applied(again, 800), 60, "the replayed events")


def test_a_diverging_step_changes_nothing_and_the_stream_moves_on(
        tmp_path: Path, kafka_bootstrap: str, topic: str, world: SyntheticData) -> None:
    settings = stream_settings(tmp_path, kafka_bootstrap, topic,
                               RECSTREAM_STREAM_UPDATE_INTERVAL_S="0.5",
                               RECSTREAM_TRAIN_MAX_LOSS="1e-9")  # every loss "diverges"
    bootstrap_champion(settings.with_overrides(train={"max_loss": 1e4}), world.dataset,
                       int(world.day_start_ms[2]))
    before = Registry(settings.models_dir).load("champion")[0].model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    produce(kafka_bootstrap, topic, _day(world, 2).take(np.arange(300)))
    with Running(settings, world, FilePublisher(tmp_path / "published")) as trainer:
        wait_for(lambda: _applied(trainer, 300), 60, "the events to be processed")
    assert trainer.metrics.diverged._value.get() >= 1
    after = trainer.learner.bundle.model.state_dict()
    for name, tensor in before.items():  # new ids may have grown rows; old rows are as were
        now = after[name] if tensor.dim() == 0 else after[name][: len(tensor)]
        assert torch.equal(tensor, now), f"{name} changed"
    assert sum(v or 0 for v in _committed(settings, settings.kafka.partitions).values()) == 300


def test_a_crash_right_after_a_rebase_rebases_again_on_restart(
        settings: Settings, world: SyntheticData) -> None:
    day2, day3 = _day(world, 2).take(np.arange(600)), _day(world, 3).take(np.arange(400))
    produce(settings.kafka.bootstrap, settings.kafka.topic, day2)
    produce(settings.kafka.bootstrap, settings.kafka.topic, day3)
    publisher = FilePublisher(settings.home / "published")
    with Running(settings, world, publisher) as trainer:
        wait_for(lambda: _applied(trainer, 1000), 90, "days 2 and 3")
        before_rebase = sorted((settings.checkpoints_dir / "trainer").glob("ckpt-*"))[-1]
        saved_state = (before_rebase / "state.json").read_text()
        nightly = nightly_job(settings, world.dataset, int(world.day_start_ms[2]))
        wait_for(lambda: trainer.learner.version == nightly.version, 90, "the rebase")
    # The crash: the rebase's checkpoint never made it; only the one before is on disk.
    for d in (settings.checkpoints_dir / "trainer").glob("ckpt-*"):
        if (d / "state.json").read_text() != saved_state:
            shutil.rmtree(d)
    (settings.home / "published" / nightly.version / "rebased.json").unlink()
    with Running(settings, world, publisher) as again:
        wait_for(lambda: publisher.is_rebased(nightly.version), 90, "the rebase after restart")
        wait_for(lambda: _applied(again, 1000), 90, "the rest of the events, onto the new one")
        assert again.learner.version == nightly.version
    assert again.events_applied == 1000 and sum(again.offsets.values()) == 1000
