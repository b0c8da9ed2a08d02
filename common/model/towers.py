"""The two-tower retrieval model (DSSM in recommendation form). No I/O here.

Each tower: ID embedding (row-sparse, updated row by row) + side-feature
embeddings (categorical/bucket fields through one offset table, multi-valued
fields through EmbeddingBag) → optional SENet field re-weighting → MLP →
L2-normalised vector. A score is ``cos(u, i) / temperature``.

>>> cfg = TwoTowerConfig(user_rows=5, item_rows=7, embedding_dim=8, feature_dim=4,
...                      hidden_dims=(16,), output_dim=8, user_cat=[3], item_multi=[6])
>>> m = TwoTower(cfg)
>>> u = m.user.encode(torch.tensor([1, 2]), torch.tensor([[1], [2]]), [])
>>> u.shape, bool(torch.allclose(u.norm(dim=1), torch.ones(2)))
(torch.Size([2, 8]), True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ADAGRAD_INIT = 0.1
# (item embeddings [B, N, D], age in hours [B, N], mask [B, N]) of users' recent positives.
History = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TwoTowerConfig:
    """Shapes that define a model; saved with every version to rebuild it."""

    user_rows: int
    item_rows: int
    embedding_dim: int = 32
    feature_dim: int = 16
    hidden_dims: tuple[int, ...] = (64,)
    output_dim: int = 32
    senet: bool = False
    temperature: float = 0.05
    user_cat: list[int] = field(default_factory=list)
    user_multi: list[int] = field(default_factory=list)
    item_cat: list[int] = field(default_factory=list)
    item_multi: list[int] = field(default_factory=list)
    # The user's last positives pooled over item-ID rows (0 = no history field: the
    # layout of versions saved before histories existed).
    history_len: int = 0
    history_pooling: str = "decay"  # "decay" (time-decayed mean) or "attention"
    history_half_life_h: float = 24.0
    # "ids": pooled item-ID rows enter the MLP as one more field; "vectors": pooled item
    # tower outputs are added to the user vector (a learned-weight item-to-item term).
    history_input: str = "ids"
    # Weight of the decayed-popularity prior in served scores (0 = none: the item vectors
    # have output_dim dimensions), and its counts' half-life (``common.model.prior``).
    prior_beta: float = 0.0
    prior_half_life_days: float = 30.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TwoTowerConfig:
        # Versions saved before a field existed load with its default.
        return cls(**{**d, "hidden_dims": tuple(d["hidden_dims"])})


class RowSparseEmbedding(nn.Module):
    """An ID table whose updates touch only the rows of a batch (row-wise Adagrad).

    The table is a buffer, not a parameter: dense optimisers never see it, so an
    embedding-only step provably leaves every dense parameter untouched.
    """

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.05) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(num_rows, dim) * init_std)
        self.register_buffer("accum", torch.full((num_rows,), ADAGRAD_INIT))

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_rows: int) -> None:
        """Make room for at least ``num_rows`` rows (doubling, so growth is amortised)."""
        if num_rows > self.num_rows:
            self.resize(max(num_rows, 2 * self.num_rows))

    def resize(self, num_rows: int, init_std: float = 0.05) -> None:
        """Grow to exactly ``num_rows`` rows; existing rows and their state are kept."""
        new_rows = num_rows - self.num_rows
        if new_rows < 0:
            raise ValueError(f"cannot shrink an ID table from {self.num_rows} to {num_rows}")
        dim = self.weight.shape[1]
        self.weight = torch.cat([self.weight, torch.randn(new_rows, dim) * init_std])
        self.accum = torch.cat([self.accum, torch.full((new_rows,), ADAGRAD_INIT)])

    def gather(self, rows: torch.Tensor, trainable: bool) -> tuple[torch.Tensor, RowGrad | None]:
        """Embeddings of ``rows``; when trainable, also a handle to apply their gradient."""
        if not trainable:
            return self.weight[rows], None
        # index_select, not advanced indexing: the same values from a much cheaper kernel
        # (on the backward too: an index_add instead of a sorting index_put).
        uniq, inverse = torch.unique(rows, return_inverse=True)
        leaf = self.weight.index_select(0, uniq).requires_grad_(True)
        emb = leaf.index_select(0, inverse.reshape(-1))
        return emb.view(*inverse.shape, leaf.shape[1]), RowGrad(self, uniq, leaf)

    @torch.no_grad()
    def row_update(self, rows: torch.Tensor, grad: torch.Tensor, lr: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise Adagrad on ``rows`` (distinct): their new accumulators and weights,
        not yet written (``write_rows``)."""
        acc = self.accum.index_select(0, rows) + grad.pow(2).mean(dim=1)
        step = lr * grad / acc.sqrt().unsqueeze(1)
        return acc, self.weight.index_select(0, rows) - step

    @torch.no_grad()
    def write_rows(self, rows: torch.Tensor, acc: torch.Tensor, weight: torch.Tensor) -> None:
        self.accum.index_copy_(0, rows, acc)
        self.weight.index_copy_(0, rows, weight)


@dataclass
class RowGrad:
    """Pending sparse update: distinct rows and the leaf tensor holding their gradient."""

    table: RowSparseEmbedding
    rows: torch.Tensor
    leaf: torch.Tensor

    def update(self, lr: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows' new accumulators and weights (None without a gradient)."""
        if self.leaf.grad is None:
            return None
        return self.table.row_update(self.rows, self.leaf.grad, lr)

    def write(self, update: tuple[torch.Tensor, torch.Tensor] | None) -> int:
        """Write an ``update``; returns the number of rows touched."""
        if update is None:
            return 0
        self.table.write_rows(self.rows, *update)
        return len(self.rows)


class SENet(nn.Module):
    """Squeeze-and-excitation over fields: learns a weight per field per example."""

    def __init__(self, num_fields: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(1, num_fields // reduction)
        self.excite = nn.Sequential(nn.Linear(num_fields, hidden), nn.ReLU(),
                                    nn.Linear(hidden, num_fields), nn.Sigmoid())

    def forward(self, fields: list[torch.Tensor]) -> list[torch.Tensor]:
        squeezed = torch.stack([f.mean(dim=1) for f in fields], dim=1)
        weights = self.excite(squeezed) * 2.0  # centred on 1 so the block starts neutral
        return [f * weights[:, j : j + 1] for j, f in enumerate(fields)]


class HistoryPool(nn.Module):
    """Pools a user's recent item embeddings ``[B, N, D]`` into one ``[B, D]`` field.

    ``decay``: a mean weighted by 0.5^(age / half-life), so what the user did a minute
    ago counts most. ``attention``: softmax of a learned query against each item plus a
    learned penalty on log(1 + age in hours). Padded positions weigh nothing; an empty
    history pools to zeros (the tower then leans on the ID row and features).
    """

    def __init__(self, cfg: TwoTowerConfig, dim: int) -> None:
        super().__init__()
        if cfg.history_pooling not in ("decay", "attention"):
            raise ValueError(f"history_pooling must be 'decay' or 'attention', "
                             f"got {cfg.history_pooling!r}")
        self.mode, self.half_life_h = cfg.history_pooling, cfg.history_half_life_h
        if self.mode == "attention":
            self.query = nn.Parameter(torch.zeros(dim))
            self.age_weight = nn.Parameter(torch.ones(()))

    def forward(self, emb: torch.Tensor, age_h: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        if self.mode == "decay":
            logits = age_h * (-math.log(2.0) / self.half_life_h)
        else:
            logits = emb @ self.query / math.sqrt(emb.shape[-1]) \
                - F.softplus(self.age_weight) * torch.log1p(age_h)
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # all-padded rows: 0
        return torch.einsum("bn,bnd->bd", weights, emb)


class Tower(nn.Module):
    """One side of the model: ID embedding + side features (+ pooled history) → unit vector."""

    def __init__(self, rows: int, cat: list[int], multi: list[int], cfg: TwoTowerConfig,
                 history: bool = False) -> None:
        super().__init__()
        if cfg.history_input not in ("ids", "vectors"):
            raise ValueError(f"history_input must be 'ids' or 'vectors', "
                             f"got {cfg.history_input!r}")
        self.history: HistoryPool | None = None
        self.history_field = self.history_vectors = False
        if history and cfg.history_len > 0:
            self.history_vectors = cfg.history_input == "vectors"
            self.history_field = not self.history_vectors
            self.history = HistoryPool(cfg, cfg.output_dim if self.history_vectors
                                       else cfg.embedding_dim)
        if self.history_vectors:
            self.history_weight = nn.Parameter(torch.ones(()))
        self.ids = RowSparseEmbedding(rows, cfg.embedding_dim)
        self.cat_table = nn.Embedding(max(1, sum(cat)), cfg.feature_dim)
        offsets = torch.tensor([0] + cat[:-1], dtype=torch.long).cumsum(0) if cat else \
            torch.zeros(0, dtype=torch.long)
        self.register_buffer("cat_offsets", offsets, persistent=False)
        self.bags = nn.ModuleList(
            nn.EmbeddingBag(n, cfg.feature_dim, mode="mean", padding_idx=0) for n in multi)
        num_fields = 1 + len(cat) + len(multi) + self.history_field
        self.senet = SENet(num_fields) if cfg.senet and num_fields > 1 else None
        width = cfg.embedding_dim * (1 + self.history_field) \
            + cfg.feature_dim * (len(cat) + len(multi))
        layers: list[nn.Module] = []
        for h in cfg.hidden_dims:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, cfg.output_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, id_emb: torch.Tensor, cat: torch.Tensor, multi: list[torch.Tensor],
                history: History | None = None) -> torch.Tensor:
        """Unit vectors ``[B, output_dim]`` from gathered ID embeddings ``[B, D]``, encoded
        features and, on a tower with a history field, the history (``History``)."""
        fields = [id_emb]
        pooled = None if history is None or self.history is None else self.history(*history)
        if self.history_field:
            fields.append(id_emb.new_zeros(id_emb.shape) if pooled is None else pooled)
        if cat.shape[1]:
            fields += list(self.cat_table(cat + self.cat_offsets).unbind(dim=1))
        fields += [bag(m) for bag, m in zip(self.bags, multi, strict=True)]
        if self.senet is not None:
            fields = self.senet(fields)
        out = F.normalize(self.mlp(torch.cat(fields, dim=1)), dim=1)
        if self.history_vectors and pooled is not None:
            # cos(u, i) then holds a weighted sum of cos(recent item, i): item-to-item
            # in the learned space, on top of what the ID row and features say.
            out = F.normalize(out + self.history_weight * pooled, dim=1)
        return out

    def encode(self, rows: torch.Tensor, cat: torch.Tensor, multi: list[torch.Tensor],
               history: History | None = None) -> torch.Tensor:
        """Inference: unit vectors for ID rows and their encoded features."""
        return self(self.ids.weight[rows], cat, multi, history)



class TwoTower(nn.Module):
    """User and item towers; score = cosine / temperature."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user = Tower(cfg.user_rows, cfg.user_cat, cfg.user_multi, cfg, history=True)
        self.item = Tower(cfg.item_rows, cfg.item_cat, cfg.item_multi, cfg)
        self.temperature = cfg.temperature
        # Logit offset for the pointwise (BCE) objective; unused by the softmax one.
        self.bias = nn.Parameter(torch.zeros(()))

    def history(self, rows: torch.Tensor, age_h: torch.Tensor, mask: torch.Tensor) -> History:
        """Inference input of the user tower's history field from item rows ``[B, N]``."""
        return self.item.ids.weight[rows], age_h, mask

    def grow(self, user_rows: int, item_rows: int) -> None:
        """Enlarge the ID tables for vocabularies that grew; existing rows are kept."""
        self.user.ids.grow(user_rows)
        self.item.ids.grow(item_rows)

    def current_config(self) -> TwoTowerConfig:
        """The config describing the model as it is now (tables may have grown)."""
        d = self.cfg.to_dict()
        d.update(user_rows=self.user.ids.num_rows, item_rows=self.item.ids.num_rows)
        return TwoTowerConfig.from_dict(d)

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict, resizing the ID tables to the saved sizes first."""
        self.user.ids.resize(state["user.ids.weight"].shape[0])
        self.item.ids.resize(state["item.ids.weight"].shape[0])
        self.load_state_dict(state)
