"""The two-tower model as a ``Scorer`` over a catalogue, for offline and prequential evaluation.

It ranks by the plain cosine of ``common.model.vectors``, as serving does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.data.dataset import Dataset
from common.data.events import DAY_MS, Events, parse_day
from common.model.bundle import Features, ModelBundle, encode_examples
from common.model.history import UserHistories, context_events
from common.model.registry import Registry
from common.model.replay import ReplayBuffer
from common.model.training import Trainer
from common.model.vectors import item_prior, item_vectors, user_histories, user_vectors


class TwoTowerScorer:
    """Scores a fixed catalogue; with a trainer it also learns (prequential replay).

    On a model with a history field the scorer keeps each user's recent positives
    (``histories``, seeded from ``seen``'s positives); ``observe`` appends to them and
    ``now_ms`` is the clock their ages are measured against.
    """

    def __init__(self, bundle: ModelBundle, features: Features, catalog: np.ndarray,
                 trainer: Trainer | None = None, rating_threshold: float = 4.0,
                 seen: Events | None = None, replay: ReplayBuffer | None = None,
                 min_batch: int = 2) -> None:
        self.bundle, self.features, self.trainer = bundle, features, trainer
        self.replay, self.min_batch = replay, min_batch
        self.catalog = [str(c) for c in catalog]
        self.rating_threshold = rating_threshold
        self.bundle.model.eval()
        self.histories = UserHistories(max(1, bundle.model.cfg.history_len))
        self.now_ms = 0
        if seen is not None:
            self.observe(seen)
        self._items = item_vectors(bundle, features, self.catalog)
        self._rows = bundle.item_vocab.lookup(self.catalog)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """Cosine of each user with every catalogue item, ``[n_users, n_catalog]``."""
        users = list(user_ids)
        history = user_histories(self.bundle, self.histories, users, self.now_ms)
        vecs = user_vectors(self.bundle, self.features, users, history)
        scores = (vecs @ self._items.T).numpy()
        beta = self.bundle.model.cfg.prior_beta
        if beta > 0:  # as the served index scores: cosine + beta * prior
            scores += np.float32(beta) * item_prior(self.bundle, self._rows, self.now_ms)
        return scores

    def observe(self, events: Events) -> None:
        """Append the events' positives to the users' histories (no learning)."""
        positives = events.sorted_by_time().positives(self.rating_threshold)
        self.histories.append(positives.user_id, positives.item_id, positives.ts_ms)
        if len(positives):
            self.now_ms = max(self.now_ms, int(positives.ts_ms.max()) + 1)

    def refresh_items(self) -> None:
        """Re-embed the catalogue after the item side changed (e.g. a nightly)."""
        self._items = item_vectors(self.bundle, self.features, self.catalog)
        self._rows = self.bundle.item_vocab.lookup(self.catalog)

    def learn(self, events: Events) -> None:
        """Embedding-only steps on the events' positives, in event-time order (each
        example's history from ``histories`` as they were before these events)."""
        if self.trainer is None:
            raise RuntimeError("this scorer was built without a trainer; it cannot learn")
        positives = events.sorted_by_time().positives(self.rating_threshold)
        if len(positives) == 0:
            return
        self.bundle.observe(positives)
        examples = encode_examples(self.bundle, self.features, positives,
                                   context=self._context(positives))
        size = self.trainer.ts.batch_size
        for lo in range(0, len(examples), size):
            batch = examples.take(np.arange(lo, min(lo + size, len(examples))))
            if self.replay is not None:
                new, batch = batch, self.replay.top_up(batch, self.min_batch)
                self.replay.add(new)
            if len(batch) >= 2:
                self.trainer.step(batch)
        self.refresh_items()

    def _context(self, positives: Events) -> Events | None:
        if self.bundle.model.cfg.history_len == 0:
            return None
        return context_events(*self.histories.context(positives.user_id,
                                                      int(positives.ts_ms.min())))


class ChampionScorer:
    """Scores with the version the registry names champion at each call, its weights as
    trained, without the stream's updates, and its users' histories as of that nightly:
    the nightly-only arm of the demo.

    The histories hold the positives through the end of the last day the champion's
    training data covers (a nightly's ``day``; a bootstrap's ``cutoff_ms``): what a
    nightly that read the landed day could have written, nothing after. ``now_ms`` is
    the clock their ages are measured against (the demo sets it to each window's start);
    ``None`` leaves it at the newest history event.
    """

    def __init__(self, registry: Registry, dataset: Dataset, catalog: np.ndarray,
                 rating_threshold: float = 4.0) -> None:
        self.registry, self.dataset, self.catalog = registry, dataset, catalog
        self.rating_threshold = rating_threshold
        self.now_ms: int | None = None
        self._scorer: tuple[str, TwoTowerScorer] | None = None

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        version = self.registry.resolve("champion")
        if self._scorer is None or self._scorer[0] != version:
            bundle, meta = self.registry.load(version)
            features = Features.build(bundle, self.dataset.users, self.dataset.items)
            seen = self.dataset.events.between(None, histories_end_ms(meta))
            self._scorer = (version, TwoTowerScorer(bundle, features, self.catalog,
                                                    rating_threshold=self.rating_threshold,
                                                    seen=seen))
        scorer = self._scorer[1]
        if self.now_ms is not None:
            scorer.now_ms = self.now_ms
        return scorer.score(user_ids)


def histories_end_ms(meta: dict[str, Any]) -> int:
    """Where a version's users' histories end: after the last day its training data
    covers (a nightly trains on its day less a held-out tail, but it read all of it).

    >>> histories_end_ms({"cutoff_ms": 5_000, "day": "1970-01-02"})
    172800000
    >>> histories_end_ms({"cutoff_ms": 5_000})
    5000
    """
    day = meta.get("day")
    return parse_day(day) + DAY_MS if day else int(meta["cutoff_ms"])
