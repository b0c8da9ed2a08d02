"""Helpers for stream tests: settings against the test broker, a champion, producing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kafka import KafkaProducer

from batch.jobs import bootstrap_job
from common.data.dataset import Dataset
from common.data.events import Events
from common.data.wire import encode_event
from common.infra.kafka_clients import ensure_topics
from common.infra.settings import Settings, load_settings

SMALL_MODEL = {"RECSTREAM_MODEL_EMBEDDING_DIM": "16", "RECSTREAM_MODEL_FEATURE_DIM": "8",
               "RECSTREAM_MODEL_HIDDEN_DIMS": "32", "RECSTREAM_MODEL_OUTPUT_DIM": "16",
               "RECSTREAM_MODEL_FREQ_HASH_SIZE": "65536"}


def stream_env(home: Path, bootstrap: str, topic: str, **extra: str) -> dict[str, str]:
    """Environment for a stream daemon (or ``load_settings``) in a test."""
    return {"RECSTREAM_HOME": str(home), "RECSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            "RECSTREAM_KAFKA_TOPIC": topic, "RECSTREAM_KAFKA_DLQ_TOPIC": f"{topic}.dlq",
            # A group per test: members of an earlier test must not slow this one's join.
            "RECSTREAM_STREAM_TRAINER_GROUP": f"{topic}-trainer",
            "RECSTREAM_STREAM_LANDER_GROUP": f"{topic}-lander",
            "RECSTREAM_STREAM_TRAINER_METRICS_PORT": "0",
            "RECSTREAM_STREAM_LANDER_METRICS_PORT": "0",
            "RECSTREAM_TRAIN_BATCH_SIZE": "128", "RECSTREAM_TRAIN_THREADS": "1",
            # The Redis/FAISS publisher's tests say so; the others publish to files.
            "RECSTREAM_STREAM_PUBLISHER": "files",
            **SMALL_MODEL, **extra}


def stream_settings(home: Path, bootstrap: str, topic: str, **extra: str) -> Settings:
    settings = load_settings(stream_env(home, bootstrap, topic, **extra))
    ensure_topics(settings.kafka, bootstrap, [topic, f"{topic}.dlq"])
    return settings


def bootstrap_champion(settings: Settings, dataset: Dataset, end_ms: int,
                       epochs: int = 1) -> str:
    """Train and promote a first model on the events before ``end_ms``."""
    return bootstrap_job(settings, dataset, None, end_ms, epochs=epochs, promote=True).version


def produce(bootstrap: str, topic: str, events: Events, raw: list[bytes] | None = None) -> int:
    """Send events (wire JSON, key = user id), then any raw records; returns records sent."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    try:
        for rec in events.to_records():
            producer.send(topic, key=rec["user_id"].encode(), value=encode_event(rec))
        for value in raw or []:
            producer.send(topic, key=b"poison", value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()
    return len(events) + len(raw or [])


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str,
             interval_s: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
