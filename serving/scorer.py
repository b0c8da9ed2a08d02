"""Scores from what serving serves, for prequential evaluation of the live system.

``ServedScorer`` ranks the catalogue for each user the way the recall API does, through
the same ``ServedVersion.queries``: the released version's user row in Redis (with the
stream's updates), on a history model the user's positives in Redis aged against
``now_ms``, its user tower and its item index (with the stream's deltas). Users with
neither a published row nor a usable history are scored by the version's registry
model (the API would answer them with popular items, which would measure the fallback
instead of the model). Items missing from the index score -inf: the API could not
return them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.data.dataset import Dataset
from common.evaluation.two_tower import TwoTowerScorer
from common.model.bundle import Features
from serving.recall import NotReadyError, RecallService


class ServedScorer:
    """A ``Scorer`` over a fixed catalogue that reads the served state on every call.

    ``now_ms`` is the clock history ages are measured against (a replay sets it to event
    time before scoring each window); ``None`` uses the service's clock.
    """

    def __init__(self, service: RecallService, dataset: Dataset, catalog: np.ndarray) -> None:
        self.service, self.dataset = service, dataset
        self.catalog = np.asarray(catalog, dtype=object)
        self._column = {str(c): i for i, c in enumerate(self.catalog)}
        self._registry_scorers: dict[str, TwoTowerScorer] = {}
        self.now_ms: int | None = None

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """``[len(user_ids), len(catalog)]`` inner products under the served state."""
        self.service.refresh()
        served = self.service.current
        if served is None:
            raise NotReadyError("no model version is released yet")
        users = [str(u) for u in user_ids]
        rows = self.service.users.read(served.version, users, served.redis_meta)
        recent = None
        if served.history_len > 0:
            recent = self.service.users.histories(users, served.history_len)
        now = self.service.clock() if self.now_ms is None else self.now_ms
        which, queries = served.queries(rows, recent, now)
        out = np.full((len(users), len(self.catalog)), -np.inf, dtype=np.float32)
        if len(which):
            for r, hits in zip(which, served.search(queries, len(served.index)),
                               strict=True):
                cols = [self._column.get(name, -1) for name, _ in hits]
                scores = np.fromiter((s for _, s in hits), np.float32, len(hits))
                keep = np.asarray(cols) >= 0
                out[r, np.asarray(cols)[keep]] = scores[keep]
        missing = np.setdiff1d(np.arange(len(users)), which)
        if len(missing):
            scorer = self._registry_scorer(served.version)
            out[missing] = scorer.score([users[i] for i in missing])
        return out

    def _registry_scorer(self, version: str) -> TwoTowerScorer:
        if version not in self._registry_scorers:
            bundle, _ = self.service.registry.load(version)
            self._registry_scorers = {version: TwoTowerScorer(
                bundle, Features.build(bundle, self.dataset.users, self.dataset.items),
                self.catalog)}
        return self._registry_scorers[version]
