"""kafka-python clients built from the settings: one place for security and timeouts.

Lag is ``highwater - position`` and offsets by time come from our own index, never
from ListOffsets (wrong on the embedded broker; see ARCHITECTURE, broker facts).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from prometheus_client import Gauge

from common.infra.broker import ensure_broker
from common.infra.settings import Settings
from common.infra.settings_groups import KafkaSettings


def bootstrap_servers(settings: Settings) -> str:
    """Configured bootstrap servers, else the home's embedded broker (started if needed)."""
    if settings.kafka.bootstrap:
        return settings.kafka.bootstrap
    return ensure_broker(settings.run_dir).bootstrap


def _common(ks: KafkaSettings, bootstrap: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {"bootstrap_servers": bootstrap.split(","),
                           "security_protocol": ks.security_protocol}
    if ks.security_protocol.startswith("SASL"):
        cfg.update(sasl_mechanism=ks.sasl_mechanism or "PLAIN",
                   sasl_plain_username=ks.sasl_username,
                   sasl_plain_password=ks.sasl_password.get_secret_value())
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):  # settings allow them with SSL
        if getattr(ks, name):
            cfg[name] = getattr(ks, name)
    return cfg


def make_producer(ks: KafkaSettings, bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A producer for events or dead letters (batched; acks from the leader)."""
    cfg = _common(ks, bootstrap)
    # acks=1 without idempotence: a retried send may duplicate an event, which the
    # lander drops by event_id and the trainer tolerates (at-least-once).
    cfg.update(acks=1, enable_idempotence=False, linger_ms=5, batch_size=256 * 1024,
               max_request_size=max(ks.max_message_bytes * 4, 1 << 20))
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def make_consumer(ks: KafkaSettings, bootstrap: str, group_id: str | None,
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits and the quick-join timeouts."""
    cfg = _common(ks, bootstrap)
    cfg.update(group_id=group_id, enable_auto_commit=False, auto_offset_reset="earliest",
               session_timeout_ms=ks.session_timeout_ms,
               heartbeat_interval_ms=ks.heartbeat_interval_ms,
               max_poll_interval_ms=ks.max_poll_interval_ms,
               max_poll_records=ks.max_poll_records,
               fetch_max_wait_ms=ks.fetch_max_wait_ms,
               fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    cfg.update(overrides)
    return KafkaConsumer(**cfg)


def ensure_topics(ks: KafkaSettings, bootstrap: str, names: list[str],
                  timeout_s: float = 30.0) -> None:
    """Create the topics (``ks.partitions`` each) unless they exist; retries while the
    broker starts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(**_common(ks, bootstrap))
            break
        except KafkaError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            # Another process may create it between list and create.
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(n, num_partitions=ks.partitions,
                                              replication_factor=1) for n in missing])
    finally:
        admin.close()


def record_lag(consumer: KafkaConsumer, gauge: Gauge) -> None:
    """Set ``gauge{partition}`` to highwater - position for each assigned partition (never
    from end_offsets(): ListOffsets is wrong on the embedded broker)."""
    for tp in consumer.assignment():
        high = consumer.highwater(tp)  # unknown until the first fetch response
        position = consumer.position(tp) if high is not None else None
        if position is not None:
            gauge.labels(str(tp.partition)).set(max(high - position, 0))
