"""``recstream stream``: the trainer consumer as a daemon (signals, metrics endpoint)."""

from __future__ import annotations

import logging

import torch
from prometheus_client import start_http_server

from common.dataset import Dataset
from common.kafka_clients import bootstrap_servers, ensure_topics
from common.settings import Settings
from common.shutdown import StopFlag
from publisher.files import FilePublisher
from stream.consumer import TrainerConsumer
from stream.metrics import TrainerMetrics

log = logging.getLogger(__name__)


def run_trainer_daemon(settings: Settings, dataset: Dataset, max_steps: int | None = None,
                       stop: StopFlag | None = None) -> TrainerConsumer:
    """Run until SIGTERM/SIGINT (or ``max_steps``); checkpoint and close on the way out."""
    if stop is None:
        stop = StopFlag()
        stop.install_signal_handlers()
    if settings.stream.threads:
        torch.set_num_threads(settings.stream.threads)
    bootstrap = bootstrap_servers(settings)
    ensure_topics(settings.kafka, bootstrap, [settings.kafka.topic, settings.kafka.dlq_topic])
    metrics = TrainerMetrics()
    port = settings.stream.trainer_metrics_port
    if port:
        start_http_server(port, addr=settings.stream.metrics_host, registry=metrics.registry)
    trainer = TrainerConsumer(settings, dataset, FilePublisher(settings.home / "published"),
                              bootstrap, metrics, stop)
    log.info("stream trainer started", extra={"bootstrap": bootstrap, "version":
                                              trainer.learner.version, "step": trainer.step_no})
    trainer.run(max_steps)
    log.info("stream trainer stopped", extra={"reason": stop.reason or "max steps",
                                              "steps": trainer.step_no,
                                              "events": trainer.events_applied})
    return trainer
