"""Embedding-only learning on a micro-batch of events: the stream's one verb, ``step``.

Dense layers and side-feature embeddings stay frozen; only the ID rows of the users
and items in the batch change (new ids enter the vocabulary under its frequency
rule). Same loss and frequency estimator as the nightly (``common.model.training``).
No Kafka or files here: the consumer feeds events in and publishes what comes out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from common.data.dataset import Dataset
from common.data.events import Events
from common.infra.settings import Settings
from common.infra.settings_groups import StreamSettings, TrainSettings
from common.model.bundle import BatchIds, Features, ModelBundle, encode_examples
from common.model.history import context_events
from common.model.replay import ReplayBuffer
from common.model.training import Trainer, TrainingDivergedError, stream_step_settings
from common.model.vectors import servable_items, served_item_vectors
from common.model.vocab import COLD_ROW
from publisher.base import Delta, History, Interactions, PublishError

log = logging.getLogger(__name__)
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
    item_vectors: np.ndarray  # what the index holds (served_item_vectors), float32
    diverged: bool = False  # a chunk's loss was NaN/inf or too large: the rest was skipped
    user_features: np.ndarray | None = None  # int32 packed feature rows of user_ids
    seen: Interactions | None = None  # positives the histories still need (none: written)

    def delta(self, version: str, offsets: dict[int, int], max_event_ts_ms: int,
              step: int) -> Delta:
        """What the publisher gets from this step."""
        return Delta(version, self.user_ids, self.user_vectors, self.item_ids,
                     self.item_vectors, offsets, max_event_ts_ms, step, self.user_features,
                     self.seen)


class HistorySource(Protocol):
    """Where the users' histories live (the publisher: Redis seen sets, or files)."""

    def write_history(self, seen: Interactions) -> None: ...

    def histories(self, user_ids: list[str], max_len: int,
                  before_ms: int | None = None) -> list[History]: ...


class StreamLearner:
    """A model version being nudged by the stream.

    Small steps stay sane: each chunk of new examples is topped up to ``min_batch`` with
    recent positives from a replay buffer (and the trainer adds catalogue negatives), so
    a window with three events of one user is not an in-batch softmax over three items.
    On a model with a history field, each example gets its user's positives strictly
    before it: those in the step, and before them the stored history (``histories``).
    """

    def __init__(self, bundle: ModelBundle, dataset: Dataset, ts: TrainSettings,
                 version: str, stream: StreamSettings | None = None,
                 histories: HistorySource | None = None) -> None:
        self.bundle, self.ts, self.version = bundle, ts, version
        st = stream or StreamSettings()
        self.min_batch, self.histories = st.min_batch, histories
        self.features = Features.build(bundle, dataset.users, dataset.items)
        self.trainer = Trainer(bundle, self.features, ts, mode="embedding")
        self.replay = ReplayBuffer(st.replay_size, ts.seed)
        bundle.model.eval()

    def step(self, events: Events, step_no: int) -> LearnOutput:
        """Embedding-only updates on the events' positives, in event-time order.

        ``step_no`` seeds the initialisation of rows that new ids grow into, the negatives
        and the replayed examples, so a step replayed after a crash (from a checkpoint,
        which holds the replay buffer) produces exactly what the lost one did.
        """
        seed = self.ts.seed * 1_000_003 + step_no
        torch.manual_seed(seed)
        self.trainer.reseed(seed)
        self.replay.reseed(seed)
        positives = events.sorted_by_time().positives(self.ts.rating_threshold)
        if len(positives) + len(self.replay) < 2:  # a softmax over one candidate: nothing
            return self._output(len(events), 0, float("nan"), _NO_ROWS, _NO_ROWS, False)
        remembered = self._remember(positives)
        ids = BatchIds.of(positives)
        was_cold = self.bundle.item_vocab.lookup(ids.items.values) == COLD_ROW
        self.bundle.observe(positives, ids)
        # Items that grew a row of their own now: their vector changed even if the step
        # leaves item rows alone (RECSTREAM_STREAM_ITEM_LR_SCALE=0), so it is published.
        rows = self.bundle.item_vocab.lookup(ids.items.values)
        grown = rows[was_cold]
        if self.bundle.model.cfg.prior_beta > 0:
            grown = rows  # their popularity moved: all of them are published
        examples = encode_examples(self.bundle, self.features, positives, ids,
                                   context=self._context(positives))
        users, items, losses = [_NO_ROWS], [grown], []
        diverged, applied = False, 0
        for idx in _chunks(len(examples), self.ts.batch_size):
            chunk = examples.take(idx)
            batch = self.replay.top_up(chunk, self.min_batch)
            if len(batch) >= 2:
                try:
                    result = self.trainer.step(batch)
                except TrainingDivergedError:
                    diverged = True  # this chunk changed nothing; the earlier ones did
                    break
                users.append(result.user_rows)
                items.append(result.item_rows)
                losses.append(result.loss)
            self.replay.add(chunk)
            applied += len(idx)
        out = self._output(len(events), applied, float(np.mean(losses)) if losses
                           else float("nan"), np.unique(np.concatenate(users)),
                           np.unique(np.concatenate(items)), diverged,
                           self._cold_items(positives.item_id[:applied]),
                           int(events.ts_ms.max()))
        if remembered:  # already in the histories: the delta need not write them again
            return out
        seen = Interactions(_strings(positives.user_id[:applied]),
                            _strings(positives.item_id[:applied]),
                            positives.ts_ms[:applied].tolist())
        return replace(out, seen=seen)

    def _remember(self, positives: Events) -> bool:
        """The positives into their users' histories before any learning, so the next
        answer of the recall API reads them (it runs the user tower on the history).
        False when they are not written: the step's delta then carries them, with the
        delta's retries."""
        if self.histories is None or len(positives) == 0:
            return False
        try:
            self.histories.write_history(Interactions(
                _strings(positives.user_id), _strings(positives.item_id),
                positives.ts_ms.tolist()))
        except PublishError as exc:
            log.warning("history write failed; the delta will carry it",
                        extra={"error": str(exc)})
            return False
        return True

    def _context(self, positives: Events) -> Events | None:
        """The stored histories of the step's users, older than the step's first positive
        (the step's own events, already stored, come from the step itself)."""
        n = self.bundle.model.cfg.history_len
        if n == 0 or self.histories is None or len(positives) == 0:
            return None
        users = np.unique(positives.user_id.astype(str))
        try:
            # Only what is older than the step: a replayed step (after a crash, for a
            # rebase) then reads what its first run read, later positives stored since.
            found = self.histories.histories(users.tolist(), n, int(positives.ts_ms.min()))
        except PublishError as exc:
            log.warning("histories unreadable; learning from the step's events alone",
                        extra={"error": str(exc)})
            return None
        return context_events(
            [user for user, (items, _) in zip(users, found, strict=True) for _ in items],
            [item for items, _ in found for item in items],
            [ts for _, stamps in found for ts in stamps])

    def _cold_items(self, item_ids: np.ndarray) -> list[str]:
        """The batch's items still on the shared cold row that have side features: their
        vector comes from those features, published now, so a new item is searchable
        after its first delta (one with neither waits for a row: ``servable_items``)."""
        distinct = np.unique(item_ids.astype(str))
        cold = distinct[self.bundle.item_vocab.lookup(distinct) == COLD_ROW]
        return servable_items(self.bundle, self.features, cold.tolist())

    def _output(self, n_events: int, n_examples: int, loss: float, user_rows: np.ndarray,
                item_rows: np.ndarray, diverged: bool,
                cold_items: list[str] | None = None, now_ms: int = 0) -> LearnOutput:
        # The shared cold row is not anyone's embedding: it is not published per id.
        user_rows, item_rows = user_rows[user_rows != COLD_ROW], item_rows[item_rows != COLD_ROW]
        user_ids = self.bundle.user_vocab.ids_of(user_rows)
        item_ids = self.bundle.item_vocab.ids_of(item_rows) + (cold_items or [])
        weight = self.bundle.model.user.ids.weight
        user_vecs = weight.index_select(0, torch.from_numpy(user_rows)).numpy()
        # The prior (if the model has one) as of the step's newest event: event time, so
        # a replayed step publishes what the first run did.
        item_vecs = served_item_vectors(self.bundle, self.features, item_ids, now_ms)
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
