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

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Below this a positive's softmax probability is too close to float32's smallest normals
# for -log p to be exact; such rows take their loss from a log-sum-exp.
_TINY_PROB = 1e-20


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

    Per user ``i`` the loss is ``-log softmax(cos(u_i, v_j) / temperature - logq_strength
    * log_q_j)_i`` over the candidates ``j``, averaged over users. It is computed by one
    fused function: a logits matrix is built once (a GEMM with the correction as its bias),
    duplicates are masked sparsely, and the gradient is taken straight from the softmax.
    """
    cands = item_vecs
    bias = -logq_strength * log_q
    if neg_vecs is not None and neg_log_q is not None:
        cands = torch.cat([item_vecs, neg_vecs])
        bias = torch.cat([bias, -logq_strength * neg_log_q])
    mask = _duplicate_pairs(item_keys)
    return _SampledSoftmax.apply(user_vecs, cands, bias.to(user_vecs.dtype),
                                 1.0 / temperature, mask)


def _duplicate_pairs(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row, column) of every off-diagonal pair of positions holding the same key.

    Only positions whose key repeats are compared, so a batch with few repeats costs
    little instead of a dense [B, B] comparison.
    """
    sorted_keys, order = torch.sort(keys)
    repeats = sorted_keys[1:] == sorted_keys[:-1]
    if not bool(repeats.any()):
        return None
    in_group = torch.zeros(len(keys), dtype=torch.bool, device=keys.device)
    in_group[1:] |= repeats
    in_group[:-1] |= repeats
    pos = order[in_group]
    same = keys[pos].unsqueeze(0) == keys[pos].unsqueeze(1)
    same.fill_diagonal_(False)
    rows, cols = same.nonzero(as_tuple=True)
    return pos[rows], pos[cols]


class _SampledSoftmax(torch.autograd.Function):
    """Mean over users of ``-log softmax(logits)_ii``, ``logits = u c^T / T + bias`` with the
    masked pairs at -inf. Saves only the softmax; the backward reuses it in place."""

    @staticmethod
    def forward(ctx: Any, users: torch.Tensor, cands: torch.Tensor, bias: torch.Tensor,
                inv_temp: float, mask: tuple[torch.Tensor, torch.Tensor] | None
                ) -> torch.Tensor:
        logits = torch.addmm(bias, users, cands.t(), alpha=inv_temp)
        if mask is not None:
            logits.index_put_(mask, logits.new_tensor(float("-inf")))
        probs = torch.softmax(logits, dim=1)
        p_pos = probs.diagonal()
        row_loss = -torch.log(p_pos)
        # -log p loses precision (or overflows) once p nears float32's smallest normals:
        # take those rows from a log-sum-exp of their logits instead.
        tiny = p_pos < _TINY_PROB
        if bool(tiny.any()):
            row_loss[tiny] = torch.logsumexp(logits[tiny], dim=1) - logits.diagonal()[tiny]
        ctx.save_for_backward(users, cands)
        ctx.probs, ctx.inv_temp = probs, inv_temp
        return row_loss.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        users, cands = ctx.saved_tensors
        probs = ctx.probs
        if probs is None:
            raise RuntimeError("inbatch_softmax_loss supports a single backward pass")
        ctx.probs = None
        # d loss / d logits = (softmax - onehot) / B, built in the saved buffer.
        probs.diagonal().sub_(1.0)
        scale = grad / len(users)
        grad_users = grad_cands = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_users = torch.mm(probs, cands).mul_(scale * ctx.inv_temp)
        if ctx.needs_input_grad[1]:
            grad_cands = torch.mm(probs.t(), users).mul_(scale * ctx.inv_temp)
        if ctx.needs_input_grad[2]:
            grad_bias = probs.sum(dim=0).mul_(scale)
        return grad_users, grad_cands, grad_bias, None, None


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
