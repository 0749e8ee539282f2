"""The base cloud recommender f(x; W_f): DIN-style target attention over the behaviour sequence.

Inputs (names shared with the ONNX models): item [B], hist [B, L], profile [B, P]. Output: logit [B].
Item attributes (genres, brand, category) are catalogue knowledge, so they live in a buffer here
rather than in every sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class DINConfig:
    n_items: int
    n_attrs: int
    profile_vocab: list[int] = field(default_factory=list)
    max_len: int = 20  # L: behaviour-sequence length
    emb_dim: int = 16  # per part: an item is [item_emb ; mean attr_emb] -> 2*emb_dim
    profile_dim: int = 8
    attn_hidden: int = 32
    mlp_hidden: tuple[int, ...] = (64, 32)

    def to_dict(self) -> dict:
        return asdict(self)


class TargetAttention(nn.Module):
    """DIN activation unit: weight each history item by an MLP of [k, q, k-q, k*q]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # query (B, D), keys (B, L, D), mask (B, L) float 1 = real item
        q = query.unsqueeze(1).expand_as(keys)
        scores = self.mlp(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)  # (B, L)
        # Masked softmax that yields exactly zero weights (not NaN) for an empty history.
        scores = scores.masked_fill(mask == 0, -1e9)
        weights = torch.softmax(scores, dim=-1) * mask  # (B, L)
        return torch.matmul(weights.unsqueeze(1), keys).squeeze(1)  # (B, D)


class DIN(nn.Module):
    def __init__(self, config: DINConfig, item_attrs: torch.Tensor):
        super().__init__()
        self.config = config
        d = config.emb_dim
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.attr_emb = nn.Embedding(max(config.n_attrs, 1), d, padding_idx=0)
        self.profile_emb = nn.ModuleList(
            nn.Embedding(v, config.profile_dim) for v in config.profile_vocab
        )
        self.register_buffer("item_attrs", item_attrs.long(), persistent=True)
        item_dim = 2 * d
        self.attention = TargetAttention(item_dim, config.attn_hidden)
        in_dim = 3 * item_dim + config.profile_dim * len(config.profile_vocab)
        layers: list[nn.Module] = []
        for h in config.mlp_hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.normal_(self.attr_emb.weight, std=0.05)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.attr_emb.weight[0].zero_()

    def embed_items(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) item ids -> (..., 2*emb_dim): the item embedding and its mean attribute embedding."""
        attrs = self.item_attrs[ids]  # (..., A)
        amask = (attrs > 0).to(torch.float32).unsqueeze(-1)
        attr = (self.attr_emb(attrs) * amask).sum(-2) / amask.sum(-2).clamp(min=1.0)
        return torch.cat([self.item_emb(ids), attr], dim=-1)

    def forward(self, item: torch.Tensor, hist: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        target = self.embed_items(item)  # (B, D)
        keys = self.embed_items(hist)  # (B, L, D)
        mask = (hist > 0).to(torch.float32)
        interest = self.attention(target, keys, mask)  # (B, D)
        parts = [target, interest, target * interest]
        parts += [emb(profile[:, j]) for j, emb in enumerate(self.profile_emb)]
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)  # (B,)
