"""A data set: interaction events plus user and item side-feature tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.events import Events
from common.features import FeatureTable


@dataclass(frozen=True)
class Dataset:
    """Everything a loader or generator returns; ``events`` sorted by time."""

    name: str
    events: Events
    users: FeatureTable
    items: FeatureTable

    def catalog(self) -> np.ndarray:
        """Every item id known to the data set: feature rows first, then event-only ids."""
        known = list(self.items.ids)
        seen = set(known)
        extra = sorted(set(self.events.item_id.tolist()) - seen)
        return np.asarray(known + extra, dtype=object)


class Scorer(Protocol):
    """Scores every item of a fixed catalogue for a batch of users (higher is better)."""

    def score(self, user_ids: Sequence[str]) -> np.ndarray:
        """Return float32 scores shaped ``[len(user_ids), len(catalog)]``."""
        ...


class OnlineScorer(Scorer, Protocol):
    """A scorer that also learns from events as they arrive (for prequential replay)."""

    def learn(self, events: Events) -> None:
        """Update the model with events (all of them later than anything learned so far)."""
        ...
