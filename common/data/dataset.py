"""A data set: interaction events plus user and item side-feature tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.events import Events
from common.data.tables import FeatureTable


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
