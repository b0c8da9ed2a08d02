"""One gradient step on a model bundle, shared by the nightly (full) and the stream
(embedding-only) so both use the same loss and continue one frequency estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from common.infra.settings_groups import StreamSettings, TrainSettings
from common.model.bundle import Examples, Features, ModelBundle
from common.model.losses import inbatch_softmax_loss, pointwise_bce_loss
from common.model.towers import RowGrad
from common.model.vectors import encode_rows
from common.model.vocab import COLD_ROW

Mode = Literal["full", "embedding"]
_SAMPLER_REFRESH_STEPS = 100


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf or exceeded the configured ceiling; nothing was applied."""


@dataclass(frozen=True)
class StepResult:
    """What a step did: its loss and the ID rows it changed."""

    loss: float
    user_rows: np.ndarray
    item_rows: np.ndarray


class _Forward(NamedTuple):
    """Tower outputs of a batch and what its backward step needs."""

    u: torch.Tensor  # [B, out]
    v: torch.Tensor  # [B + n_neg, out]: targets, then negatives
    n_neg: int
    neg_logp: torch.Tensor | None
    u_grad: RowGrad
    i_grad: RowGrad | None  # None when the item side does not learn


class NegativeSampler:
    """Draws item rows with probability ∝ positives^0.75 (word2vec's smoothing)."""

    def __init__(self, counts: np.ndarray, generator: torch.Generator) -> None:
        weights = torch.from_numpy(np.power(counts, 0.75))
        weights[0] = 0.0  # the shared cold row is not an item
        total = float(weights.sum())
        if total <= 0:
            raise ValueError("no item has a positive yet: cannot sample negatives")
        self.prob = weights / total
        self.cdf = torch.cumsum(self.prob, 0)
        self.generator = generator

    def sample(self, n: int) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, dtype=self.cdf.dtype) * self.cdf[-1]
        return torch.searchsorted(self.cdf, u).clamp_(max=len(self.cdf) - 1)


class Trainer:
    """Applies steps to a bundle. ``full`` updates every parameter; ``embedding`` only
    the ID rows of the users and items in the batch (dense layers and side-feature
    embeddings stay bit-identical)."""

    def __init__(self, bundle: ModelBundle, features: Features, ts: TrainSettings,
                 mode: Mode = "full") -> None:
        self.bundle, self.features, self.ts, self.mode = bundle, features, ts, mode
        params = list(bundle.model.parameters())
        for p in params:
            p.requires_grad_(mode == "full")
        # fused: one kernel per parameter instead of a dozen small ops (same Adam update).
        self.opt = (torch.optim.Adam(params, lr=ts.lr_dense, weight_decay=ts.weight_decay,
                                     fused=True) if mode == "full" else None)
        self.generator = torch.Generator().manual_seed(ts.seed)
        self._sampler: NegativeSampler | None = None
        self._sampler_age = 0
        self._item_feat: tuple[int, torch.Tensor] | None = None
        self._frozen_items: torch.Tensor | None = None  # see _item_table

    def _negatives(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` sampled item rows and the log of their sampling probability."""
        self._sampler_age += 1
        if self._sampler is None or self._sampler_age >= _SAMPLER_REFRESH_STEPS \
                or len(self._sampler.cdf) != len(self.bundle.item_counts):
            self._sampler = NegativeSampler(self.bundle.item_counts, self.generator)
            self._sampler_age = 0
        rows = self._sampler.sample(n)
        return rows, torch.log(self._sampler.prob[rows].float().clamp_min(1e-12))

    def _item_feature_rows(self) -> torch.Tensor:
        """Item row → feature row, rebuilt when the vocabulary grows."""
        vocab = self.bundle.item_vocab
        if self._item_feat is None or self._item_feat[0] != len(vocab):
            feat = np.concatenate([[0], self.features.items.rows(vocab.ids)]).astype(np.int64)
            self._item_feat = (len(vocab), torch.from_numpy(feat))
        return self._item_feat[1]

    def _user_rows(self, ex: Examples) -> torch.Tensor:
        """The batch's user rows; in full training with ``user_id_dropout`` a share of them
        is swapped for the shared cold row, so the tower learns to serve users it has no
        row for (yet) from their features and history alone."""
        rows = torch.from_numpy(ex.user_rows)
        p = self.ts.user_id_dropout
        if self.mode != "full" or p <= 0:
            return rows
        drop = torch.rand(len(rows), generator=self.generator) < p
        return rows.masked_fill(drop, COLD_ROW)

    def _history_vectors(self, hist_rows: torch.Tensor, i_grad: RowGrad | None
                         ) -> torch.Tensor:
        """Item tower outputs ``[B, N, out]`` of history rows ``[B, N]``, each distinct item
        run once, from the gathered (trainable) ID rows so its gradient reaches them."""
        assert i_grad is not None
        uniq, inverse = torch.unique(hist_rows, return_inverse=True)
        emb = i_grad.leaf.index_select(0, torch.searchsorted(i_grad.rows, uniq))
        cat, multi = self.features.items.gather(self._item_feature_rows()[uniq])
        # index_select, not [inverse]: its backward (index_add) sums in a fixed order, while
        # advanced indexing's accumulates from threads in any order (bootstraps would differ).
        out = self.bundle.model.item(emb, cat, multi)
        return out.index_select(0, inverse.reshape(-1)).view(*inverse.shape, out.shape[1])

    def _items_frozen(self) -> bool:
        """Embedding-only steps with item rows at rate 0 (the stream's default): nothing on
        the item side learns, so it runs without autograd, histories from a table."""
        return self.mode == "embedding" and self.ts.item_lr_scale == 0

    @torch.no_grad()
    def _item_table(self) -> torch.Tensor:
        """Item tower outputs of every item row (row 0: the cold row, no features), for
        frozen items: computed once, extended as rows grow (their rows never change)."""
        # Rows of the vocabulary only: a table grown ahead of it holds rows no item has yet,
        # whose features are not known until one does.
        feat_of = self._item_feature_rows()
        n = len(feat_of)
        done = 0 if self._frozen_items is None else len(self._frozen_items)
        if done < n:
            rows = torch.arange(done, n)
            feat = feat_of[rows]
            feat[rows == COLD_ROW] = 0
            grown = encode_rows(self.bundle.model.item, rows, feat, self.features.items.gather)
            self._frozen_items = grown if self._frozen_items is None else \
                torch.cat([self._frozen_items, grown])
        assert self._frozen_items is not None
        return self._frozen_items

    def _targets_and_negatives(self, ex: Examples, n_neg: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Item rows and feature rows of the batch's targets, then ``n_neg`` sampled
        negatives, and the negatives' log sampling probability."""
        item_rows = torch.from_numpy(ex.item_rows)
        item_feat = torch.from_numpy(ex.item_feat)
        if not n_neg:
            return item_rows, item_feat, None
        neg_rows, neg_logp = self._negatives(n_neg)
        return (torch.cat([item_rows, neg_rows]),
                torch.cat([item_feat, self._item_feature_rows()[neg_rows]]), neg_logp)

    def _forward_frozen_items(self, ex: Examples) -> _Forward:
        """``_forward`` for frozen items: only the user rows carry a gradient."""
        model = self.bundle.model
        b = len(ex)
        item_rows, item_feat, neg_logp = self._targets_and_negatives(ex,
                                                                     self.ts.random_negatives)
        hist = None
        with torch.no_grad():
            v = model.item.encode(item_rows, *self.features.items.gather(item_feat))
            if ex.history is not None and model.user.history is not None:
                hist_rows, age_h, mask = ex.history.tensors()
                pooled_in = self._item_table()[hist_rows] if model.user.history_vectors \
                    else model.item.ids.weight[hist_rows]
                hist = (pooled_in, age_h, mask)
        u_emb, u_grad = model.user.ids.gather(self._user_rows(ex), trainable=True)
        u_cat, u_multi = self.features.users.gather(torch.from_numpy(ex.user_feat))
        assert u_grad is not None
        return _Forward(model.user(u_emb, u_cat, u_multi, hist), v,
                        len(item_rows) - b, neg_logp, u_grad, None)

    def _forward(self, ex: Examples) -> _Forward:
        """Both towers on a batch: targets first, then the sampled negatives."""
        if self._items_frozen() and self.ts.loss == "inbatch":
            return self._forward_frozen_items(ex)
        model, ts = self.bundle.model, self.ts
        b = len(ex)
        n_neg = ts.random_negatives if ts.loss == "inbatch" else ts.pointwise_negatives * b
        item_rows, item_feat, neg_logp = self._targets_and_negatives(ex, n_neg)
        n_items = len(item_rows)
        history = ex.history if model.user.history is not None else None
        if history is not None:
            # One gather for targets, negatives and history items: an item row read in
            # several roles gets one summed gradient and one Adagrad step.
            item_rows = torch.cat([item_rows, torch.from_numpy(history.rows).reshape(-1)])
        u_emb, u_grad = model.user.ids.gather(self._user_rows(ex), trainable=True)
        i_emb, i_grad = model.item.ids.gather(item_rows, trainable=True)
        u_cat, u_multi = self.features.users.gather(torch.from_numpy(ex.user_feat))
        i_cat, i_multi = self.features.items.gather(item_feat)
        hist = None
        if history is not None:
            hist_rows, age_h, mask = history.tensors()
            if model.user.history_vectors:
                hist = (self._history_vectors(hist_rows, i_grad), age_h, mask)
            else:
                hist = (i_emb[n_items:].view(b, -1, i_emb.shape[1]), age_h, mask)
        assert u_grad is not None and i_grad is not None
        return _Forward(model.user(u_emb, u_cat, u_multi, hist),
                        model.item(i_emb[:n_items], i_cat, i_multi), n_neg, neg_logp,
                        u_grad, i_grad)

    def step(self, ex: Examples) -> StepResult:
        """One update on a batch of positives; raises ``TrainingDivergedError`` on a bad loss."""
        model, ts = self.bundle.model, self.ts
        b = len(ex)
        u, v, n_neg, neg_logp, u_grad, i_grad = self._forward(ex)
        self.bundle.freq.update(ex.item_keys)
        if ts.loss == "inbatch":
            log_q = torch.from_numpy(np.log(self.bundle.freq.probability(ex.item_keys)))
            keys = torch.from_numpy(ex.item_keys.view(np.int64))
            neg_log_q = None if neg_logp is None else neg_logp + math.log(n_neg)
            loss = inbatch_softmax_loss(u, v[:b], keys, log_q.float(), model.temperature,
                                        ts.logq_strength, v[b:] if n_neg else None, neg_log_q)
        else:
            negs = v[b:].view(b, ts.pointwise_negatives, -1)
            loss = pointwise_bce_loss(u, v[:b], negs, model.temperature, model.bias)
        value = float(loss.detach())
        if not math.isfinite(value) or value > ts.max_loss:
            raise TrainingDivergedError(
                f"loss is {value} (ceiling RECSTREAM_TRAIN_MAX_LOSS={ts.max_loss}); "
                "no update was applied")
        loss.backward()
        if self.opt is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ts.max_grad_norm, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        # Item rows at rate 0 (the stream's default) are left alone, accumulators too: the
        # step then changes user rows only, and says so (no item rows in its result).
        updates = (u_grad.update(ts.lr_embedding),
                   i_grad.update(ts.lr_embedding * ts.item_lr_scale)
                   if ts.item_lr_scale > 0 and i_grad is not None else None)
        if not all(u is None or bool(torch.isfinite(u[1]).all()) for u in updates):
            # A finite loss can still step a row to inf/NaN: nothing of it is written.
            raise TrainingDivergedError("an ID-row update is not finite (learning rate "
                                        "too large?); no row was changed")
        u_grad.write(updates[0])
        if i_grad is not None:
            i_grad.write(updates[1])
        item_rows = i_grad.rows.numpy() if i_grad is not None and updates[1] is not None \
            else np.zeros(0, np.int64)
        return StepResult(value, u_grad.rows.numpy(), item_rows)

    def reseed(self, seed: int) -> None:
        """Restart the negative sampling from ``seed`` and the current counts: a step then
        draws the same negatives whatever ran before it (a step replayed after a crash
        repeats the lost one exactly)."""
        self.generator.manual_seed(seed)
        self._sampler = None


def stream_step_settings(ts: TrainSettings, st: StreamSettings) -> TrainSettings:
    """The training knobs with the stream's own batch size, ID-row learning rate,
    catalogue negatives and item-row rate (the freshness curve's sweep chose them).

    Steps of 128 cost more in overhead than in maths at 50k events/s, so the stream's are
    512; its learning rate (0.5) was chosen on the freshness curve's validation days.
    """
    return ts.model_copy(update={"batch_size": st.batch_size, "lr_embedding": st.lr_embedding,
                                 "random_negatives": st.random_negatives,
                                 "item_lr_scale": st.item_lr_scale})
