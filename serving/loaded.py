"""One model version as serving holds it: user tower, feature encoder, item index.

The pair (user namespace in Redis, item index) always comes from the same version:
a ``ServedVersion`` reads user vectors only from its own version's namespace and
searches only its own index, so a user vector and an index of different versions
are never combined. The same holds for the user tower's history input: history items
are read through this version's item vocabulary (``history_input=ids``) or taken from
this version's own index, deltas included (``history_input=vectors``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.model.features import FeatureEncoder
from common.model.history import HOUR_MS
from common.model.registry import Registry
from common.model.towers import History, TwoTower
from common.model.vectors import served_queries
from common.model.vocab import COLD_ROW, IdVocab
from publisher.index_store import IndexStore
from publisher.item_index import DoubleBufferedIndex
from publisher.redis_users import Recent, UserRows, UserStore, VersionMeta, VersionStateError


@dataclass
class ServedVersion:
    """Everything needed to answer for one version."""

    version: str
    model: TwoTower
    user_encoder: FeatureEncoder
    index: DoubleBufferedIndex
    redis_meta: VersionMeta
    popular: list[str]
    # history_input=ids: raw item id -> the version's item-ID row (None otherwise).
    item_vocab: IdVocab | None = None

    @property
    def history_len(self) -> int:
        """Positives the user tower reads (0: a model without a history field)."""
        return self.model.cfg.history_len if self.model.user.history is not None else 0

    def queries(self, rows: UserRows, recent: Sequence[Recent] | None, now_ms: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """Which users can be embedded (positions in ``rows``) and their unit vectors.

        The one rule for the recall API and ``ServedScorer``: a user with a published row
        is embedded from it, its features and (on a history model) ``recent``, its
        positives with ages measured at ``now_ms``. On a history model a user without a
        row whose history holds an item this version can read is embedded from the
        shared cold row, zero side features and that history. Anyone else is left out
        (the caller falls back). On a model without a history field ``recent`` is unused.
        """
        found = rows.found
        if self.history_len == 0 or recent is None:
            which = np.flatnonzero(found)
            if not len(which):
                return which, np.zeros((0, self.model.cfg.output_dim), np.float32)
            return which, self.user_vectors(rows.vectors[which], rows.features[which])
        emb, age_h, mask = self.history(recent, now_ms)
        which = np.flatnonzero(found | mask.numpy().any(axis=1))
        if not len(which):
            return which, np.zeros((0, self.model.cfg.output_dim), np.float32)
        own = found[which, None]
        cold = self.model.user.ids.weight[COLD_ROW].numpy()
        id_emb = np.where(own, rows.vectors[which], cold).astype(np.float32)
        features = np.where(own, rows.features[which], 0).astype(np.int32)
        pick = torch.from_numpy(which)
        return which, self.user_vectors(id_emb, features,
                                        (emb[pick], age_h[pick], mask[pick]))

    @torch.no_grad()
    def history(self, recent: Sequence[Recent], now_ms: int) -> History:
        """The user tower's history input for each user's ``recent`` positives (oldest
        first): the last ``history_len``, most recent last, aged against ``now_ms``.

        ``ids``: item-ID rows through this version's vocabulary; an item without a row
        of its own reads the cold row, as in training. ``vectors``: the item vectors this
        version's index holds now (the stream's deltas included); an item the index does
        not hold is padding, masked out.
        """
        n, b = self.history_len, len(recent)
        age_h = np.zeros((b, n), np.float32)
        users: list[int] = []
        slots: list[int] = []
        names: list[str] = []
        for u, (items, ts) in enumerate(recent):
            items, times = items[-n:], np.asarray(ts[-n:], np.int64)
            lo = n - len(items)
            age_h[u, lo:] = np.maximum(now_ms - times, 0) / HOUR_MS
            users += [u] * len(items)
            slots += range(lo, n)
            names += items
        mask = np.zeros((b, n), bool)
        if self.item_vocab is not None:
            rows = np.zeros((b, n), np.int64)
            rows[users, slots] = self.item_vocab.lookup(names)
            mask[users, slots] = True
            emb = self.model.item.ids.weight[torch.from_numpy(rows)]
        elif names:
            held, vectors = self.index.vectors(names)
            vectors = vectors[:, :self.model.cfg.output_dim]  # without the prior's column
            at = (np.asarray(users, np.int64)[held], np.asarray(slots, np.int64)[held])
            table = np.zeros((b, n, vectors.shape[1]), np.float32)
            table[at] = vectors[held]
            mask[at] = True
            emb = torch.from_numpy(table)
        else:
            emb = torch.zeros(b, n, self.model.cfg.output_dim)
        age = torch.from_numpy(age_h).masked_fill(torch.from_numpy(~mask), 0.0)
        return emb, age, torch.from_numpy(mask)

    def search(self, user_vecs: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The index's top ``k`` for unit user vectors (with the popularity prior's
        ``beta`` appended on a model that has one: cosine + beta * prior)."""
        return self.index.search(served_queries(self.model.cfg, user_vecs), k)

    @torch.no_grad()
    def user_vectors(self, id_emb: np.ndarray, features: np.ndarray,
                     history: History | None = None) -> np.ndarray:
        """Unit user vectors from ID embeddings, packed feature rows and (on a history
        model) the history input (``history``)."""
        cat, multi = self.user_encoder.unpack(features)
        return self.model.user(torch.from_numpy(id_emb), cat, multi, history).numpy()


def load_version(version: str, registry: Registry, indexes: IndexStore, users: UserStore,
                 popular_n: int) -> ServedVersion:
    """Load and verify a released version (weights checksummed, index checksummed)."""
    meta = users.meta(version)
    if meta is None:
        raise VersionStateError(f"version {version} has no user namespace in Redis")
    bundle, _ = registry.load(version)
    bundle.model.eval()
    item_index, seq = indexes.load(version)
    cfg = bundle.model.cfg
    by_ids = cfg.history_len > 0 and cfg.history_input == "ids"
    return ServedVersion(version, bundle.model, bundle.user_encoder,
                         DoubleBufferedIndex(item_index, seq), meta,
                         _popular(bundle.item_counts, bundle.item_vocab.ids, popular_n),
                         bundle.item_vocab if by_ids else None)


def _popular(item_counts: np.ndarray, item_ids: list[str], n: int) -> list[str]:
    """Items by positives seen (own rows only; row 0 is the shared cold row)."""
    counts = np.asarray(item_counts[1:len(item_ids) + 1], dtype=np.float64)
    order = np.argsort(-counts, kind="stable")[:n]
    return [item_ids[i] for i in order.tolist()]
