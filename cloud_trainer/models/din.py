"""The base cloud recommender f(x; W_f): DIN-style target attention over the behaviour sequence.

Inputs (names shared with the ONNX models): item [B], hist [B, L], profile [B, P]. Output: logit [B].
Item attributes (genres, brand, category) are catalogue knowledge, so they live in a buffer here
rather than in every sample.

The model is a trunk and a head: ``features(item, hist, profile) -> x [B, F]`` (item table lookup,
target attention, profile embeddings, concatenated) and ``head(x) -> logit`` (the prediction MLP,
the submodule named ``HEAD``); ``forward = head ∘ features``. When a device's patches sit only in
the head, a device computes x once per sample and trains on it (``MetaPatchModel.cacheable``).
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
    """DIN activation unit: weight each history item k by an MLP of [k, q, k-q, k*q].

    The first layer of that MLP is linear, so it is computed as W_k·k + W_q·q + W_kq·(k*q) (k-q folds
    into the first two): the query term once per sample instead of once per history position, and
    no (B, L, 4D) concatenation — the same function class at a fraction of the cost.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.key = nn.Linear(dim, hidden)
        self.query = nn.Linear(dim, hidden, bias=False)
        self.cross = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # query (B, D), keys (B, L, D), mask (B, L) float 1 = real item
        h = torch.relu(self.key(keys) + self.query(query).unsqueeze(1) + self.cross(keys * query.unsqueeze(1)))
        scores = self.out(h).squeeze(-1)  # (B, L)
        # Masked softmax that yields exactly zero weights (not NaN) for an empty history.
        scores = scores.masked_fill(mask == 0, -1e9)
        weights = torch.softmax(scores, dim=-1) * mask  # (B, L)
        return torch.matmul(weights.unsqueeze(1), keys).squeeze(1)  # (B, D)


class DIN(nn.Module):
    HEAD = "mlp"  # the submodule that maps the trunk features x to the logit

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

    def item_table(self) -> torch.Tensor:
        """(n_items + 1, 2*emb_dim): each item's embedding beside its mean attribute embedding.

        Built once per forward for the whole catalogue: far cheaper than gathering B·L·A attribute
        embeddings, and row 0 (padding) stays zero.
        """
        amask = (self.item_attrs > 0).to(torch.float32).unsqueeze(-1)  # (I+1, A, 1)
        attr = (self.attr_emb(self.item_attrs) * amask).sum(1) / amask.sum(1).clamp(min=1.0)  # (I+1, d)
        return torch.cat([self.item_emb.weight, attr], dim=-1)

    @property
    def feature_dim(self) -> int:
        """F: width of the trunk features x (the MLP's input)."""
        return 3 * 2 * self.config.emb_dim + self.config.profile_dim * len(self.config.profile_vocab)

    def features(self, item: torch.Tensor, hist: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        """The trunk: x (B, F) = [target ; interest ; target * interest ; profile embeddings]."""
        table = self.item_table()
        target = table[item]  # (B, D)
        keys = table[hist]  # (B, L, D)
        mask = (hist > 0).to(torch.float32)
        interest = self.attention(target, keys, mask)  # (B, D)
        parts = [target, interest, target * interest]
        parts += [emb(profile[:, j]) for j, emb in enumerate(self.profile_emb)]
        return torch.cat(parts, dim=-1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The prediction MLP: x (B, F) -> logit (B,)."""
        return self.mlp(x).squeeze(-1)

    def forward(self, item: torch.Tensor, hist: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(item, hist, profile))  # (B,)
