"""One model version as serving holds it: user tower, feature encoder, item index.

The pair (user namespace in Redis, item index) always comes from the same version:
a ``ServedVersion`` reads user vectors only from its own version's namespace and
searches only its own index, so a user vector and an index of different versions
are never combined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.model.features import FeatureEncoder
from common.model.registry import Registry
from common.model.towers import TwoTower
from publisher.index_store import IndexStore
from publisher.item_index import DoubleBufferedIndex
from publisher.redis_users import UserStore, VersionMeta, VersionStateError


@dataclass
class ServedVersion:
    """Everything needed to answer for one version."""

    version: str
    model: TwoTower
    user_encoder: FeatureEncoder
    index: DoubleBufferedIndex
    redis_meta: VersionMeta
    popular: list[str]

    @torch.no_grad()
    def user_vectors(self, id_emb: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Unit user vectors from ID embeddings and packed feature rows."""
        cat, multi = self.user_encoder.unpack(features)
        return self.model.user(torch.from_numpy(id_emb), cat, multi).numpy()


def load_version(version: str, registry: Registry, indexes: IndexStore, users: UserStore,
                 popular_n: int) -> ServedVersion:
    """Load and verify a released version (weights checksummed, index checksummed)."""
    meta = users.meta(version)
    if meta is None:
        raise VersionStateError(f"version {version} has no user namespace in Redis")
    bundle, _ = registry.load(version)
    bundle.model.eval()
    item_index, seq = indexes.load(version)
    return ServedVersion(version, bundle.model, bundle.user_encoder,
                         DoubleBufferedIndex(item_index, seq), meta,
                         _popular(bundle.item_counts, bundle.item_vocab.ids, popular_n))


def _popular(item_counts: np.ndarray, item_ids: list[str], n: int) -> list[str]:
    """Items by positives seen (own rows only; row 0 is the shared cold row)."""
    counts = np.asarray(item_counts[1:len(item_ids) + 1], dtype=np.float64)
    order = np.argsort(-counts, kind="stable")[:n]
    return [item_ids[i] for i in order.tolist()]
