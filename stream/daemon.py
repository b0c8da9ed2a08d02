"""``recstream stream``: the trainer consumer as a daemon (signals, metrics endpoint)."""

from __future__ import annotations

import gc
import logging

import torch

from common.data.dataset import Dataset
from common.infra.kafka_clients import bootstrap_servers, ensure_topics
from common.infra.settings import Settings
from common.infra.shutdown import StopFlag
from common.infra.telemetry import serve_metrics
from publisher.base import Publisher
from publisher.files import FilePublisher
from stream.consumer import TrainerConsumer
from stream.metrics import TrainerMetrics

log = logging.getLogger(__name__)


def make_publisher(settings: Settings) -> Publisher:
    """The publisher the settings name (Redis + FAISS by default)."""
    if settings.stream.publisher == "files":
        return FilePublisher(settings.home / "published")
    from publisher.redis_faiss import RedisFaissPublisher

    return RedisFaissPublisher.from_settings(settings)


def settle_heap() -> None:
    """Move what the process holds now (the data set's tables, the model, vocabularies
    of every id) out of the cyclic garbage collector's reach (``gc.freeze``). They live
    as long as the process, yet every full collection walked them all again: a step
    allocates hundreds of thousands of small objects (ids, histories), which triggers
    collections often. Measured with the stream bench (200k events, same machine, back to
    back): 41.6 against 37.0 us of trainer CPU per event. Garbage is collected first, so
    none is kept for good."""
    gc.collect()
    gc.freeze()


def run_trainer_daemon(settings: Settings, dataset: Dataset, max_steps: int | None = None,
                       stop: StopFlag | None = None) -> TrainerConsumer:
    """Run until SIGTERM/SIGINT (or ``max_steps``); checkpoint and close on the way out."""
    stop = StopFlag.for_daemon(stop)
    if settings.stream.threads:
        torch.set_num_threads(settings.stream.threads)
    bootstrap = bootstrap_servers(settings)
    ensure_topics(settings.kafka, bootstrap, [settings.kafka.topic, settings.kafka.dlq_topic])
    metrics = TrainerMetrics()
    with serve_metrics(metrics.registry, settings.stream.metrics_host,
                       settings.stream.trainer_metrics_port) as endpoint:
        trainer = TrainerConsumer.from_settings(settings, dataset, make_publisher(settings),
                                                bootstrap, metrics, stop)
        with trainer:
            settle_heap()
            endpoint.health = trainer.health
            log.info("stream trainer started", extra={
                "bootstrap": bootstrap, "version": trainer.learner.version,
                "step": trainer.step_no})
            trainer.run(max_steps)
    log.info("stream trainer stopped", extra={"reason": stop.reason or "max steps",
                                              "steps": trainer.step_no,
                                              "events": trainer.events_applied})
    return trainer
