"""Fetching and decoding in a process of its own, so the trainer's GIL is for learning.

kafka-python parses records in Python, and decoding them is Python too: in one process
they took half the interpreter from the learner. The trainer's group consumer stays in
the trainer (membership, rebalances, commits) with every partition paused; this child
reads the partitions the trainer assigns it with a group-less consumer, from the
positions the trainer gives, decodes each poll straight into columns, and sends the
chunks back tagged with the assignment's generation, so that the trainer drops what
was read for an assignment it has since left. Rejects travel with their record bytes:
the trainer dead-letters them before it commits the offsets that cover them.

A pipe the trainer stops reading is the back-pressure: the child blocks in ``send``.
The child ignores SIGINT/SIGTERM (the trainer decides when to stop) and exits when the
trainer closes the pipes or dies.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import signal
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from kafka import TopicPartition

from common.data.events import Events
from common.data.wire_batch import decode_batch
from common.infra.kafka_clients import make_consumer
from common.infra.settings_groups import KafkaSettings

_START_TIMEOUT_S = 60.0


class FetchError(RuntimeError):
    """The fetch process died; the trainer cannot read on."""


@dataclass(frozen=True)
class Reject:
    """An invalid record, with what its dead letter needs."""

    index: int  # in its chunk
    key: bytes | None
    value: bytes | None
    reason: str


@dataclass(frozen=True)
class Fetched:
    """One partition's records of one poll, decoded."""

    generation: int
    partition: int
    offsets: np.ndarray  # int64 per record
    record_ts_ms: np.ndarray  # int64 per record
    valid: np.ndarray  # bool per record
    events: Events  # per valid record
    rejects: list[Reject]
    highwater: int | None  # the partition's end as of this fetch


class Fetcher:
    """The trainer's handle on its fetch process."""

    def __init__(self, ks: KafkaSettings, bootstrap: str, topic: str, max_bytes: int) -> None:
        ctx = mp.get_context("spawn")  # no forked copy of the trainer's threads and model
        self._control, child_control = ctx.Pipe()
        self._data, child_data = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_run, name="trainer-fetch", daemon=True,
                                   args=(ks, bootstrap, topic, max_bytes, child_control,
                                         child_data))
        self.process.start()
        # The child ignores SIGTERM, which is how multiprocessing ends daemonic children
        # at exit: kill it first if the trainer exits without closing this handle.
        atexit.register(self._kill_if_alive)
        child_control.close()
        child_data.close()
        if not self._control.poll(_START_TIMEOUT_S):
            self.close()
            raise FetchError("the fetch process did not start")
        self._control.recv()

    def assign(self, generation: int, positions: dict[int, int]) -> None:
        """Read these partitions from these offsets (nothing, if empty) from now on."""
        self._control.send((generation, positions))

    def receive(self, timeout_s: float) -> Fetched | None:
        """The next chunk, waiting up to ``timeout_s``; None if none came."""
        try:
            if not self._data.poll(timeout_s):
                return None
            fetched: Fetched = self._data.recv()
        except (EOFError, OSError) as exc:
            raise FetchError(f"the fetch process died (exit code {self.process.exitcode})"
                             ) from exc
        return fetched

    def _kill_if_alive(self) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already gone
            self._control.send(None)
        self._data.close()  # unblocks a child waiting to send
        self._control.close()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM (terminate) by design
            self.process.join(timeout=5)


def _run(ks: KafkaSettings, bootstrap: str, topic: str, max_bytes: int, control: Connection,
         data: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    consumer = make_consumer(ks, bootstrap, None)
    try:
        control.send("ready")
        generation, assigned = -1, False
        while True:
            while control.poll(0 if assigned else 0.2):
                message = control.recv()
                if message is None:
                    return
                generation, positions = message
                _assign(consumer, topic, positions)
                assigned = bool(positions)
            if assigned:
                for tp, records in consumer.poll(timeout_ms=100).items():
                    data.send(_decode(generation, tp.partition, records, max_bytes,
                                      consumer.highwater(tp)))
    except (EOFError, OSError):
        return  # the trainer closed the pipes or died
    finally:
        consumer.close()


def _assign(consumer: Any, topic: str, positions: dict[int, int]) -> None:
    tps = [TopicPartition(topic, p) for p in sorted(positions)]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, positions[tp.partition])


def _decode(generation: int, partition: int, records: list[Any], max_bytes: int,
            highwater: int | None) -> Fetched:
    batch = decode_batch([r.value for r in records], max_bytes)
    rejects = [Reject(n, records[n].key, records[n].value, reason)
               for n, reason in batch.rejects]
    return Fetched(generation, partition, np.array([r.offset for r in records], np.int64),
                   np.array([r.timestamp for r in records], np.int64), batch.valid,
                   batch.events, rejects, highwater)
