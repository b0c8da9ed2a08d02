"""A model version's moving parts together: model, vocabularies, encoders, frequency state.

Also turns events into encoded training examples for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from common.data.events import Events
from common.data.tables import FeatureTable
from common.infra.settings_groups import ModelSettings
from common.model.features import EncodedFeatures, FeatureEncoder
from common.model.freq import FrequencyEstimator, stable_hash
from common.model.history import HistoryBatch, example_histories
from common.model.prior import empty_popularity, observe_popularity
from common.model.towers import TwoTower, TwoTowerConfig
from common.model.vocab import Distinct, IdVocab


@dataclass
class ModelBundle:
    """Everything saved as one model version."""

    model: TwoTower
    user_vocab: IdVocab
    item_vocab: IdVocab
    user_encoder: FeatureEncoder
    item_encoder: FeatureEncoder
    freq: FrequencyEstimator
    item_counts: np.ndarray  # positives seen per item row; drives negative sampling
    # log2 of the decayed positives per item row (``common.model.prior``)
    item_pop: np.ndarray = field(default_factory=lambda: empty_popularity(1))

    @classmethod
    def create(cls, ms: ModelSettings, users: FeatureTable, items: FeatureTable,
               seed: int = 0) -> ModelBundle:
        """A fresh, untrained bundle whose encoders are fitted on the feature tables."""
        user_enc, item_enc = FeatureEncoder.fit(users), FeatureEncoder.fit(items)
        user_cat, user_multi = user_enc.cardinalities()
        item_cat, item_multi = item_enc.cardinalities()
        cfg = TwoTowerConfig(
            user_rows=1, item_rows=1, embedding_dim=ms.embedding_dim,
            feature_dim=ms.feature_dim, hidden_dims=ms.hidden_dims, output_dim=ms.output_dim,
            senet=ms.senet, temperature=ms.temperature, user_cat=user_cat,
            user_multi=user_multi, item_cat=item_cat, item_multi=item_multi,
            history_len=ms.history_len, history_pooling=ms.history_pooling,
            history_half_life_h=ms.history_half_life_h, history_input=ms.history_input,
            prior_beta=ms.prior_beta, prior_half_life_days=ms.prior_half_life_days)
        torch.manual_seed(seed)
        return cls(TwoTower(cfg), IdVocab(ms.min_count), IdVocab(ms.min_count), user_enc,
                   item_enc, FrequencyEstimator(ms.freq_hash_size, ms.freq_num_hashes,
                                                ms.freq_alpha), np.zeros(1))

    def observe(self, positives: Events, ids: BatchIds | None = None) -> None:
        """Grow vocabularies (frequency rule), ID tables and item counts for new positives."""
        ids = ids or BatchIds.of(positives)
        self.user_vocab.observe_distinct(ids.users)
        self.item_vocab.observe_distinct(ids.items)
        self.model.grow(len(self.user_vocab), len(self.item_vocab))
        if len(self.item_counts) < len(self.item_vocab):
            grown = np.zeros(len(self.item_vocab))
            grown[: len(self.item_counts)] = self.item_counts
            self.item_counts = grown
        if len(self.item_pop) < len(self.item_vocab):
            self.item_pop = np.r_[self.item_pop,
                                  empty_popularity(len(self.item_vocab) - len(self.item_pop))]
        rows = self.item_vocab.lookup(ids.items.values)
        np.add.at(self.item_counts, rows, ids.items.counts.astype(np.float64))
        observe_popularity(self.item_pop, ids.items.spread(rows), positives.ts_ms,
                           self.model.cfg.prior_half_life_days)


@dataclass(frozen=True)
class BatchIds:
    """The distinct user and item ids of a batch of events, found once."""

    users: Distinct
    items: Distinct

    @classmethod
    def of(cls, events: Events) -> BatchIds:
        return cls(Distinct.of(events.user_id), Distinct.of(events.item_id))


@dataclass
class Features:
    """Encoded side features of the users and items a job knows about."""

    users: EncodedFeatures
    items: EncodedFeatures

    @classmethod
    def build(cls, bundle: ModelBundle, users: FeatureTable, items: FeatureTable) -> Features:
        return cls(bundle.user_encoder.encode(users), bundle.item_encoder.encode(items))


@dataclass(frozen=True)
class Examples:
    """Encoded positive examples, one row per (user, item) pair."""

    user_rows: np.ndarray
    user_feat: np.ndarray
    item_rows: np.ndarray
    item_feat: np.ndarray
    item_keys: np.ndarray  # uint64 stable hashes of raw item ids (frequency estimator keys)
    ts_ms: np.ndarray
    history: HistoryBatch | None = None  # each user's positives strictly before the example

    def __len__(self) -> int:
        return len(self.user_rows)

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(self.user_rows[idx], self.user_feat[idx], self.item_rows[idx],
                        self.item_feat[idx], self.item_keys[idx], self.ts_ms[idx],
                        None if self.history is None else self.history.take(idx))


def encode_examples(bundle: ModelBundle, features: Features, positives: Events,
                    ids: BatchIds | None = None, context: Events | None = None) -> Examples:
    """Rows and feature rows for each positive event (vocabularies must have observed them).

    On a model with a history field each example also gets its user's positives strictly
    before it, from ``positives`` themselves and from ``context`` (earlier positives, e.g.
    the days before a nightly's day; only those older than every example are used).
    """
    ids = ids or BatchIds.of(positives)
    users, items = ids.users, ids.items
    history = None
    if bundle.model.cfg.history_len > 0:
        history = training_histories(bundle, positives, context)
    return Examples(
        user_rows=users.spread(bundle.user_vocab.lookup(users.values)),
        user_feat=users.spread(features.users.rows(users.values)),
        item_rows=items.spread(bundle.item_vocab.lookup(items.values)),
        item_feat=items.spread(features.items.rows(items.values)),
        item_keys=items.spread(stable_hash(items.values)),
        ts_ms=positives.ts_ms.copy(),
        history=history,
    )


def training_histories(bundle: ModelBundle, positives: Events,
                       context: Events | None = None) -> HistoryBatch:
    """Each positive's history (``example_histories``) over ``context`` + ``positives``."""
    if context is not None and len(positives):
        context = context.between(None, int(positives.ts_ms.min()))
    else:
        context = Events.empty()
    users = np.concatenate([context.user_id, positives.user_id])
    items = np.concatenate([context.item_id, positives.item_id])
    rows = Distinct.of(items)
    item_rows = rows.spread(bundle.item_vocab.lookup(rows.values)) if len(items) else \
        np.zeros(0, np.int64)
    ts = np.concatenate([context.ts_ms, positives.ts_ms])
    is_query = np.r_[np.zeros(len(context), bool), np.ones(len(positives), bool)]
    return example_histories(users, item_rows, ts, bundle.model.cfg.history_len, is_query)

