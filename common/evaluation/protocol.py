"""What evaluation asks of a model: scores over a fixed catalogue, and optionally learning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from common.data.events import Events


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
