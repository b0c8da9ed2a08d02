"""What a started trainer holds, opened together and released together.

``TrainerConsumer.start`` opens them, ``close`` releases them in the reverse order,
each part even when one before it raised: a failed last checkpoint save (raised by the
writer's close) must still leave the fetch process killed and the lock released, or
the exit blocks and the next trainer on this home is refused. When opening fails
half-way, what was opened is released the same way.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer

from common.infra.kafka_clients import make_consumer, make_producer
from common.infra.settings_groups import KafkaSettings, StreamSettings
from stream.checkpoint import CheckpointWriter
from stream.feed import Feed
from stream.fetcher import Fetcher
from stream.intake import Intake
from stream.lock import exclusive_lock
from stream.metrics import TrainerMetrics


@dataclass
class Clients:
    """The lock on the checkpoint directory, the group consumer (its partitions stay
    paused), the dead-letter producer, the learner thread, the checkpoint writer and
    the fetch process."""

    consumer: KafkaConsumer
    intake: Intake
    learner_thread: ThreadPoolExecutor
    writer: CheckpointWriter
    feed: Feed
    _opened: ExitStack  # closes them, last opened first

    @classmethod
    def open(cls, kafka: KafkaSettings, bootstrap: str, stream: StreamSettings,
             ckpt_dir: Path, metrics: TrainerMetrics) -> Clients:
        """Take the lock (``TrainerLockedError`` if another trainer holds it), then open
        the rest."""
        with ExitStack() as opened:
            opened.callback(exclusive_lock(ckpt_dir).close)
            writer = CheckpointWriter(ckpt_dir, stream.checkpoints_kept,
                                      lambda: metrics.last_checkpoint.set(time.time()))
            opened.callback(writer.close)  # raises a failed last save
            learner_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner")
            opened.callback(learner_thread.shutdown, wait=True)
            feed = Feed(Fetcher(kafka, bootstrap, kafka.topic, kafka.max_message_bytes))
            opened.callback(feed.close)  # a fetch process left running would block the exit
            consumer = make_consumer(kafka, bootstrap, stream.trainer_group)
            opened.callback(consumer.close, autocommit=False)
            intake = Intake(make_producer(kafka, bootstrap), kafka.topic, kafka.dlq_topic,
                            kafka.max_message_bytes, metrics)
            opened.callback(intake.close)
            return cls(consumer, intake, learner_thread, writer, feed, opened.pop_all())

    def close(self) -> None:
        """Release everything (idempotent); the last error raised, if any, is raised."""
        self._opened.close()
