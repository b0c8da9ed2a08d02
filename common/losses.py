"""Training objectives for the two towers.

Positives only ever come from clicks (or good ratings); negatives are the other
items of the batch and, optionally, random items — never exposed-not-clicked.

>>> u = F.normalize(torch.randn(4, 8), dim=1)
>>> keys = torch.tensor([1, 2, 3, 1])
>>> loss = inbatch_softmax_loss(u, u, keys, torch.zeros(4), temperature=0.1)
>>> bool(loss < 1.0)  # each user's own vector is its best match
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inbatch_softmax_loss(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    item_keys: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    logq_strength: float = 1.0,
    neg_vecs: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax over in-batch items (and optional random negatives), logQ-corrected.

    ``log_q`` is the log of each in-batch item's expected count among the batch's
    candidates (from the streaming frequency estimator); ``neg_log_q`` the same for the
    random negatives (log of M × sampling probability). Subtracting it stops popular
    items from being punished just for showing up as negatives more often. Other rows
    holding the same item as the positive are masked: they are not negatives.
    """
    logits = user_vecs @ item_vecs.T / temperature - logq_strength * log_q.unsqueeze(0)
    same = item_keys.unsqueeze(0) == item_keys.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    if neg_vecs is not None and neg_log_q is not None:
        neg_logits = user_vecs @ neg_vecs.T / temperature - logq_strength * neg_log_q
        logits = torch.cat([logits, neg_logits], dim=1)
    target = torch.arange(len(user_vecs), device=logits.device)
    return F.cross_entropy(logits, target)


def pointwise_bce_loss(
    user_vecs: torch.Tensor,
    pos_vecs: torch.Tensor,
    neg_vecs: torch.Tensor,
    temperature: float,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Classic DSSM: binary cross-entropy, positives vs K random negatives per positive.

    ``neg_vecs`` is shaped ``[B, K, d]``.
    """
    pos = (user_vecs * pos_vecs).sum(dim=1) / temperature + bias
    neg = torch.einsum("bd,bkd->bk", user_vecs, neg_vecs) / temperature + bias
    loss_pos = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
    loss_neg = F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
    return loss_pos + loss_neg
