"""Embedding-only learning on a micro-batch of events: the stream's one verb, ``step``.

Dense layers and side-feature embeddings stay frozen; only the ID rows of the users
and items in the batch change (new ids enter the vocabulary under its frequency
rule). Same loss and frequency estimator as the nightly (``common.model.training``).
No Kafka or files here: the consumer feeds events in and publishes what comes out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from common.data.dataset import Dataset
from common.data.events import Events
from common.infra.settings import Settings
from common.infra.settings_groups import TrainSettings
from common.model.bundle import BatchIds, Features, ModelBundle, encode_examples
from common.model.training import Trainer, TrainingDivergedError, stream_step_settings
from common.model.vectors import item_vectors, servable_items
from common.model.vocab import COLD_ROW
from publisher.base import Delta, Interactions

_NO_ROWS = np.zeros(0, np.int64)


@dataclass(frozen=True)
class LearnOutput:
    """What one step changed: the touched ids and their new vectors."""

    n_events: int
    n_examples: int
    loss: float
    user_ids: list[str]
    user_vectors: np.ndarray  # raw ID embeddings, float32
    item_ids: list[str]
    item_vectors: np.ndarray  # item tower outputs, float32
    diverged: bool = False  # a chunk's loss was NaN/inf or too large: the rest was skipped
    user_features: np.ndarray | None = None  # int32 packed feature rows of user_ids
    seen: Interactions | None = None  # the positives learned from

    def delta(self, version: str, offsets: dict[int, int], max_event_ts_ms: int,
              step: int) -> Delta:
        """What the publisher gets from this step."""
        return Delta(version, self.user_ids, self.user_vectors, self.item_ids,
                     self.item_vectors, offsets, max_event_ts_ms, step, self.user_features,
                     self.seen)


class StreamLearner:
    """A model version being nudged by the stream."""

    def __init__(self, bundle: ModelBundle, dataset: Dataset, ts: TrainSettings,
                 version: str) -> None:
        self.bundle, self.ts, self.version = bundle, ts, version
        self.features = Features.build(bundle, dataset.users, dataset.items)
        self.trainer = Trainer(bundle, self.features, ts, mode="embedding")
        bundle.model.eval()

    def step(self, events: Events, step_no: int) -> LearnOutput:
        """Embedding-only updates on the events' positives, in event-time order.

        ``step_no`` seeds the initialisation of rows that new ids grow into, so a step
        replayed after a crash produces exactly what the lost one did.
        """
        torch.manual_seed(self.ts.seed * 1_000_003 + step_no)
        positives = events.sorted_by_time().positives(self.ts.rating_threshold)
        if len(positives) < 2:  # an in-batch softmax over one candidate teaches nothing
            return self._output(len(events), 0, float("nan"), _NO_ROWS, _NO_ROWS, False)
        ids = BatchIds.of(positives)
        self.bundle.observe(positives, ids)
        examples = encode_examples(self.bundle, self.features, positives, ids)
        users, items, losses = [_NO_ROWS], [_NO_ROWS], []
        diverged, applied = False, 0
        for idx in _chunks(len(examples), self.ts.batch_size):
            try:
                result = self.trainer.step(examples.take(idx))
            except TrainingDivergedError:
                diverged = True  # this chunk changed nothing; the earlier ones did
                break
            users.append(result.user_rows)
            items.append(result.item_rows)
            losses.append(result.loss)
            applied += len(idx)
        out = self._output(len(events), applied, float(np.mean(losses)) if losses
                           else float("nan"), np.unique(np.concatenate(users)),
                           np.unique(np.concatenate(items)), diverged,
                           self._cold_items(positives.item_id[:applied]))
        seen = Interactions(_strings(positives.user_id[:applied]),
                            _strings(positives.item_id[:applied]),
                            positives.ts_ms[:applied].tolist())
        return replace(out, seen=seen)

    def _cold_items(self, item_ids: np.ndarray) -> list[str]:
        """The batch's items still on the shared cold row that have side features: their
        vector comes from those features, published now, so a new item is searchable
        after its first delta (one with neither waits for a row: ``servable_items``)."""
        distinct = np.unique(item_ids.astype(str))
        cold = distinct[self.bundle.item_vocab.lookup(distinct) == COLD_ROW]
        return servable_items(self.bundle, self.features, cold.tolist())

    def _output(self, n_events: int, n_examples: int, loss: float, user_rows: np.ndarray,
                item_rows: np.ndarray, diverged: bool,
                cold_items: list[str] | None = None) -> LearnOutput:
        # The shared cold row is not anyone's embedding: it is not published per id.
        user_rows, item_rows = user_rows[user_rows != COLD_ROW], item_rows[item_rows != COLD_ROW]
        user_ids = self.bundle.user_vocab.ids_of(user_rows)
        item_ids = self.bundle.item_vocab.ids_of(item_rows) + (cold_items or [])
        weight = self.bundle.model.user.ids.weight
        user_vecs = weight.index_select(0, torch.from_numpy(user_rows)).numpy()
        item_vecs = item_vectors(self.bundle, self.features, item_ids).numpy()
        return LearnOutput(n_events, n_examples, loss, user_ids, user_vecs, item_ids,
                           item_vecs, diverged, self.features.users.packed(user_ids))


def stream_train_settings(settings: Settings) -> TrainSettings:
    """The stream daemon's training knobs (``common.model.training.stream_step_settings``)."""
    return stream_step_settings(settings.train, settings.stream)


def _chunks(n: int, size: int) -> list[np.ndarray]:
    """Consecutive index ranges of ``size``; a last chunk of one joins the one before."""
    bounds = list(range(0, n, size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        bounds.pop(-2)
    return [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _strings(column: np.ndarray) -> list[str]:
    """A column of ids as a list of str (ids from the wire already are)."""
    values = column.tolist()
    return values if set(map(type, values)) <= {str} else column.astype(str).tolist()
