"""The auxiliary encoder g(profile, behaviour sequence, φ_prev) -> metapatch φ (MoMoDistill step 2).

It gives a device its starting φ for a new bundle (from its previous φ) and a cold-start device a
personalised one (φ_prev = 0) from what it holds locally; exported to ONNX so that profile and
history never leave the board.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn


START_WARM = ("encoder", "previous", "zero")
START_COLD = ("encoder", "zero")


@dataclass
class EncoderConfig:
    n_items: int
    phi_dim: int
    profile_vocab: list[int] = field(default_factory=list)
    emb_dim: int = 16
    profile_dim: int = 8
    hidden: int = 64
    # What a device starts from on a new bundle (``PatchEncoder.start``), chosen by the cloud on
    # validation slices: the encoder's φ, the device's previous φ unchanged, or a zero φ (the cloud
    # model itself). "cold" applies to a device without a previous φ (all zeros).
    start_warm: Literal["encoder", "previous", "zero"] = "encoder"
    start_cold: Literal["encoder", "zero"] = "encoder"

    def __post_init__(self):
        if self.start_warm not in START_WARM:
            raise ValueError(f"encoder.start_warm = {self.start_warm!r}: must be one of {', '.join(START_WARM)}")
        if self.start_cold not in START_COLD:
            raise ValueError(f"encoder.start_cold = {self.start_cold!r}: must be one of {', '.join(START_COLD)}")

    def to_dict(self) -> dict:
        return asdict(self)


class PatchEncoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.emb_dim, padding_idx=0)
        self.profile_emb = nn.ModuleList(nn.Embedding(v, config.profile_dim) for v in config.profile_vocab)
        in_dim = config.emb_dim + config.profile_dim * len(config.profile_vocab) + config.phi_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, config.phi_dim))
        nn.init.normal_(self.item_emb.weight, std=0.05)
        # Start near "φ_prev passes through, nothing else": a fresh encoder is harmless.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, profile: torch.Tensor, hist: torch.Tensor, phi_prev: torch.Tensor) -> torch.Tensor:
        # profile (B, P), hist (B, L), phi_prev (B, m) -> φ (B, m)
        mask = (hist > 0).to(torch.float32).unsqueeze(-1)
        seq = (self.item_emb(hist) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, E)
        parts = [seq] + [emb(profile[:, j]) for j, emb in enumerate(self.profile_emb)] + [phi_prev]
        return phi_prev + self.mlp(torch.cat(parts, dim=-1))

    def start(self, profile: torch.Tensor, hist: torch.Tensor, phi_prev: torch.Tensor) -> torch.Tensor:
        """A device's starting φ on a new bundle under the configured policy (what ``encoder.onnx``
        computes; ``forward`` is the raw g that training updates). A device whose φ_prev is all
        zeros has none yet: the "cold" policy applies to it."""
        c = self.config
        g = self(profile, hist, phi_prev)
        if c.start_warm == "encoder" and c.start_cold == "encoder":
            return g
        zero = torch.zeros_like(phi_prev)
        warm = {"encoder": g, "previous": phi_prev, "zero": zero}[c.start_warm]
        cold = g if c.start_cold == "encoder" else zero
        # Sum of |φ_prev| rather than all(): plain ReduceSum / Equal / Where in the exported graph.
        is_cold = phi_prev.abs().sum(dim=-1, keepdim=True) == 0
        return torch.where(is_cold, cold, warm)
