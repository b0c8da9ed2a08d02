"""Unit user and item vectors from a trained bundle (what is published and served).

Serving ranks by the plain cosine; the logQ correction is a training device only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from common.model.bundle import Features, ModelBundle
from common.model.towers import Tower
from common.model.vocab import COLD_ROW

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


def servable_items(bundle: ModelBundle, features: Features,
                   item_ids: Sequence[str]) -> list[str]:
    """The ids, in order, that have a vector of their own: an ID row or side features.

    An item with neither would get the shared cold row's vector, the same for every such
    item, which says nothing about it: it is not served until it earns a row. An item
    with features but no row (new, or below the vocabulary's frequency rule) is served
    from its features at once.

    >>> from common.data.tables import FeatureTable, FieldSpec
    >>> from common.infra.settings_groups import ModelSettings
    >>> items = FeatureTable.build(["i1", "i2"], (FieldSpec("genre", "categorical"),),
    ...                            {"genre": ["a", "b"]})
    >>> bundle = ModelBundle.create(ModelSettings(min_count=1), FeatureTable.empty(), items)
    >>> bundle.item_vocab.observe(["i3"])
    1
    >>> servable_items(bundle, Features.build(bundle, FeatureTable.empty(), items),
    ...                ["i1", "i3", "i4"])
    ['i1', 'i3']
    """
    has_row = bundle.item_vocab.lookup(item_ids) != COLD_ROW
    has_features = features.items.rows(item_ids) != 0
    return [str(i) for i, keep in zip(item_ids, has_row | has_features, strict=True) if keep]
