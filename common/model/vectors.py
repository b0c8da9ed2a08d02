"""Unit user and item vectors from a trained bundle (what is published and served).

Serving ranks by the plain cosine; the logQ correction is a training device only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from common.model.bundle import Features, ModelBundle
from common.model.history import HistoryBatch, UserHistories
from common.model.prior import popularity_prior
from common.model.towers import Tower, TwoTowerConfig
from common.model.vocab import COLD_ROW

_CHUNK = 65_536


@torch.no_grad()
def user_vectors(bundle: ModelBundle, features: Features, user_ids: Sequence[str],
                 history: HistoryBatch | None = None) -> torch.Tensor:
    """Unit user vectors ``[B, output_dim]``; unknown users get the cold row plus their
    side features, and (on a model with a history field) their recent positives."""
    rows = torch.from_numpy(bundle.user_vocab.lookup(user_ids))
    feat = torch.from_numpy(features.users.rows(user_ids))
    model = bundle.model
    if history is None or model.user.history is None:
        return encode_rows(model.user, rows, feat, features.users.gather)
    hist_rows, age_h, mask = history.tensors()
    cat, multi = features.users.gather(feat)
    if model.user.history_vectors:
        hist = (history_item_vectors(bundle, features, hist_rows), age_h, mask)
    else:
        hist = model.history(hist_rows, age_h, mask)
    return model.user.encode(rows, cat, multi, hist)


@torch.no_grad()
def history_item_vectors(bundle: ModelBundle, features: Features, rows: torch.Tensor
                         ) -> torch.Tensor:
    """Item vectors ``[B, N, out]`` of history item rows ``[B, N]`` (each distinct row once;
    the cold row, also the padding, gets the cold row with no features)."""
    uniq, inverse = torch.unique(rows, return_inverse=True)
    own = uniq[uniq != COLD_ROW]
    ids = bundle.item_vocab.ids_of(own.numpy())
    table = torch.zeros(len(uniq), bundle.model.item.mlp[-1].out_features)
    table[uniq != COLD_ROW] = item_vectors(bundle, features, ids)
    if bool((uniq == COLD_ROW).any()):
        table[uniq == COLD_ROW] = encode_rows(bundle.model.item, torch.zeros(1, dtype=torch.long),
                                          torch.zeros(1, dtype=torch.long),
                                          features.items.gather)
    return table[inverse]


def user_histories(bundle: ModelBundle, histories: UserHistories, user_ids: Sequence[str],
                   now_ms: int) -> HistoryBatch | None:
    """The model's history input for ``user_ids`` at ``now_ms`` (None on a model without
    a history field)."""
    n = bundle.model.cfg.history_len
    if n == 0:
        return None
    return histories.batch(user_ids, bundle.item_vocab.lookup, now_ms, max_len=n)


@torch.no_grad()
def item_vectors(bundle: ModelBundle, features: Features, item_ids: Sequence[str]) -> torch.Tensor:
    """Unit item vectors; unknown items get the cold row plus their side features."""
    rows = torch.from_numpy(bundle.item_vocab.lookup(item_ids))
    feat = torch.from_numpy(features.items.rows(item_ids))
    return encode_rows(bundle.model.item, rows, feat, features.items.gather)


def served_item_vectors(bundle: ModelBundle, features: Features, item_ids: Sequence[str],
                        now_ms: int) -> np.ndarray:
    """What the item index holds: unit item vectors, and on a model with a popularity
    prior (``prior_beta`` > 0) one more column, the prior at ``now_ms``
    (``common.model.prior``; items on the shared cold row count nothing)."""
    vecs = item_vectors(bundle, features, item_ids).numpy()
    if bundle.model.cfg.prior_beta <= 0:
        return vecs
    prior = item_prior(bundle, bundle.item_vocab.lookup(item_ids), now_ms)
    return np.hstack([vecs, prior[:, None]])


def item_prior(bundle: ModelBundle, rows: np.ndarray, now_ms: int) -> np.ndarray:
    """The popularity prior of item rows at ``now_ms`` (float32; the shared cold row
    counts nothing): the index's extra column, without ``beta``."""
    prior = popularity_prior(bundle.item_pop[rows], now_ms,
                             bundle.model.cfg.prior_half_life_days)
    prior[rows == COLD_ROW] = 0.0
    return prior.astype(np.float32)


def served_queries(cfg: TwoTowerConfig, user_vecs: np.ndarray) -> np.ndarray:
    """The index's queries for unit user vectors: with a prior, ``beta`` appended, so the
    inner product is cosine + beta * prior."""
    if cfg.prior_beta <= 0:
        return user_vecs
    beta = np.full((len(user_vecs), 1), cfg.prior_beta, dtype=np.float32)
    return np.hstack([np.asarray(user_vecs, dtype=np.float32), beta])


def encode_rows(tower: Tower, rows: torch.Tensor, feat: torch.Tensor,
                gather: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]
                ) -> torch.Tensor:
    """A tower's unit vectors of ID rows and their feature rows, in chunks."""
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
