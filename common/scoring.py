"""Vectors from a trained bundle, and a ``Scorer`` over a catalogue for evaluation.

Serving ranks by the plain cosine; the logQ correction is a training device only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.bundle import Features, ModelBundle, encode_examples
from common.dataset import Dataset
from common.events import Events
from common.model import Tower
from common.registry import Registry
from common.training import Trainer

_CHUNK = 65_536


@torch.no_grad()
def user_vectors(bundle: ModelBundle, features: Features, user_ids: Sequence[str]) -> torch.Tensor:
    """Unit user vectors; unknown users get the cold row plus their side features."""
    rows = torch.from_numpy(bundle.user_vocab.lookup(user_ids))
    feat = torch.from_numpy(features.users.rows(user_ids))
    return _encode(bundle.model.user, rows, feat, features.users.gather)


@torch.no_grad()
def item_vectors(bundle: ModelBundle, features: Features, item_ids: Sequence[str]) -> torch.Tensor:
    """Unit item vectors; unknown items get the cold row plus their side features."""
    rows = torch.from_numpy(bundle.item_vocab.lookup(item_ids))
    feat = torch.from_numpy(features.items.rows(item_ids))
    return _encode(bundle.model.item, rows, feat, features.items.gather)


def _encode(tower: Tower, rows: torch.Tensor, feat: torch.Tensor,
            gather: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
            ) -> torch.Tensor:
    parts = []
    for lo in range(0, len(rows), _CHUNK):
        cat, multi = gather(feat[lo: lo + _CHUNK])
        parts.append(tower.encode(rows[lo: lo + _CHUNK], cat, multi))
    if not parts:
        return torch.zeros(0, tower.mlp[-1].out_features)
    return torch.cat(parts)


class TwoTowerScorer:
    """Scores a fixed catalogue; with a trainer it also learns (prequential replay)."""

    def __init__(self, bundle: ModelBundle, features: Features, catalog: np.ndarray,
                 trainer: Trainer | None = None, rating_threshold: float = 4.0) -> None:
        self.bundle, self.features, self.trainer = bundle, features, trainer
        self.catalog = [str(c) for c in catalog]
        self.rating_threshold = rating_threshold
        self.bundle.model.eval()
        self._items = item_vectors(bundle, features, self.catalog)

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """Cosine of each user with every catalogue item, ``[n_users, n_catalog]``."""
        users = user_vectors(self.bundle, self.features, list(user_ids))
        return (users @ self._items.T).numpy()

    def learn(self, events: Events) -> None:
        """Embedding-only steps on the events' positives, in event-time order."""
        if self.trainer is None:
            raise RuntimeError("this scorer was built without a trainer; it cannot learn")
        positives = events.sorted_by_time().positives(self.rating_threshold)
        if len(positives) == 0:
            return
        self.bundle.observe(positives)
        examples = encode_examples(self.bundle, self.features, positives)
        size = self.trainer.ts.batch_size
        for lo in range(0, len(examples), size):
            idx = np.arange(lo, min(lo + size, len(examples)))
            if len(idx) >= 2:
                self.trainer.step(examples.take(idx))
        self._items = item_vectors(self.bundle, self.features, self.catalog)


class ChampionScorer:
    """Scores with the version the registry names champion at each call (its weights as
    trained, without the stream's updates): the nightly-only arm of the demo."""

    def __init__(self, registry: Registry, dataset: Dataset, catalog: np.ndarray) -> None:
        self.registry, self.dataset, self.catalog = registry, dataset, catalog
        self._scorer: tuple[str, TwoTowerScorer] | None = None

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        version = self.registry.resolve("champion")
        if self._scorer is None or self._scorer[0] != version:
            bundle, _ = self.registry.load(version)
            features = Features.build(bundle, self.dataset.users, self.dataset.items)
            self._scorer = (version, TwoTowerScorer(bundle, features, self.catalog))
        return self._scorer[1].score(user_ids)
