"""A model version's moving parts together: model, vocabularies, encoders, frequency state.

Also turns events into encoded training examples for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.events import Events
from common.features import EncodedFeatures, FeatureEncoder, FeatureTable
from common.freq import FrequencyEstimator, stable_hash_many
from common.model import TwoTower, TwoTowerConfig
from common.settings import ModelSettings
from common.vocab import IdVocab, map_distinct


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
            user_multi=user_multi, item_cat=item_cat, item_multi=item_multi)
        torch.manual_seed(seed)
        return cls(TwoTower(cfg), IdVocab(ms.min_count), IdVocab(ms.min_count), user_enc,
                   item_enc, FrequencyEstimator(ms.freq_hash_size, ms.freq_num_hashes,
                                                ms.freq_alpha), np.zeros(1))

    def observe(self, positives: Events) -> None:
        """Grow vocabularies (frequency rule), ID tables and item counts for new positives."""
        self.user_vocab.observe(positives.user_id.tolist())
        self.item_vocab.observe(positives.item_id.tolist())
        self.model.grow(len(self.user_vocab), len(self.item_vocab))
        if len(self.item_counts) < len(self.item_vocab):
            grown = np.zeros(len(self.item_vocab))
            grown[: len(self.item_counts)] = self.item_counts
            self.item_counts = grown
        rows = self.item_vocab.lookup_many(positives.item_id)
        np.add.at(self.item_counts, rows, 1.0)


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

    def __len__(self) -> int:
        return len(self.user_rows)

    def take(self, idx: np.ndarray) -> Examples:
        return Examples(self.user_rows[idx], self.user_feat[idx], self.item_rows[idx],
                        self.item_feat[idx], self.item_keys[idx], self.ts_ms[idx])


def encode_examples(bundle: ModelBundle, features: Features, positives: Events) -> Examples:
    """Rows and feature rows for each positive event (vocabularies must have observed them)."""
    return Examples(
        user_rows=bundle.user_vocab.lookup_many(positives.user_id),
        user_feat=map_distinct(positives.user_id, features.users.rows),
        item_rows=bundle.item_vocab.lookup_many(positives.item_id),
        item_feat=map_distinct(positives.item_id, features.items.rows),
        item_keys=stable_hash_many(positives.item_id),
        ts_ms=positives.ts_ms.copy(),
    )

