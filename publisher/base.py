"""The publisher interface the stream (and later the nightly) writes through.

A ``Delta`` carries the touched users' ID embeddings and the touched items' tower
vectors of one model version, plus the Kafka offsets of the events it includes.
Implementations (files now; Redis and FAISS in the publisher issue) must make a
delta durable, or raise, before ``publish_delta`` returns: the stream commits its
offsets only after that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class PublishError(RuntimeError):
    """A delta could not be made durable; the caller must not commit its offsets."""


@dataclass(frozen=True)
class Delta:
    """Vectors changed by one stream step, tagged with what produced them."""

    version: str
    user_ids: list[str]
    user_vectors: np.ndarray  # float32 [n_users, embedding_dim]: raw ID embeddings
    item_ids: list[str]
    item_vectors: np.ndarray  # float32 [n_items, output_dim]: item tower outputs
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    max_event_ts_ms: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.user_vectors):
            raise ValueError("user_ids and user_vectors differ in length")
        if len(self.item_ids) != len(self.item_vectors):
            raise ValueError("item_ids and item_vectors differ in length")


class Publisher(Protocol):
    """Where deltas go."""

    def publish_delta(self, delta: Delta) -> None:
        """Make the delta durable and readable, or raise ``PublishError``."""
        ...

    def rebased(self, version: str, offsets: dict[int, int]) -> None:
        """The stream has replayed everything after ``version``'s cutoff onto it, up to
        ``offsets``: the version may now be flipped to champion."""
        ...
