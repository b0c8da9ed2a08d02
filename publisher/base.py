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
    user_features: np.ndarray | None = None  # int32 [n_users, width]: packed feature rows
    seen: Interactions | None = None  # the step's positives, for seen-item filtering

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.user_vectors):
            raise ValueError("user_ids and user_vectors differ in length")
        if len(self.item_ids) != len(self.item_vectors):
            raise ValueError("item_ids and item_vectors differ in length")
        if self.user_features is not None and len(self.user_features) != len(self.user_ids):
            raise ValueError("user_ids and user_features differ in length")


@dataclass(frozen=True)
class Interactions:
    """(user, item, time) triples: what users have seen, for serving's filter."""

    user_ids: list[str]
    item_ids: list[str]
    ts_ms: list[int]


# Per user: item ids oldest first and their event times (ms): the last positives.
History = tuple[list[str], list[int]]


class Publisher(Protocol):
    """Where deltas go, and where users' histories (their recent positives) live."""

    def publish_delta(self, delta: Delta) -> None:
        """Make the delta durable and readable, or raise ``PublishError``."""
        ...

    def write_history(self, seen: Interactions) -> None:
        """Add positives to their users' histories at once (before any learning on them),
        or raise ``PublishError``. Idempotent: an (item, time) written twice is kept once,
        so a replayed step adds nothing."""
        ...

    def histories(self, user_ids: list[str], max_len: int,
                  before_ms: int | None = None) -> list[History]:
        """Each user's last ``max_len`` positives by time, those before ``before_ms`` if
        given (raises ``PublishError``)."""
        ...

    def rebased(self, version: str, offsets: dict[int, int]) -> None:
        """The stream has replayed everything after ``version``'s cutoff onto it, up to
        ``offsets``: the version may now be flipped to champion."""
        ...

    def ready(self, version: str) -> bool:
        """Whether ``version`` is published completely, so deltas may go into it."""
        ...

    def champion(self) -> str | None:
        """The version serving now (None when the publisher does not track releases)."""
        ...

    def withdrawn(self) -> set[str]:
        """Versions rolled back from: the stream must not rebase onto them."""
        ...
