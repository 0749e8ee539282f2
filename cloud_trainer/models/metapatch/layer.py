"""MetaPatchLayer: wraps a base Linear and adds a residual bottleneck patch to its output.

    h = base(x);  h <- h + W_up · relu(W_down · h + b_down) + b_up
    [W_down, b_down, W_up, b_up] = reshape(Θ_l · φ)

Θ_l (``shared_theta``) is a frozen global shared parameter on a device; φ comes from the
owning MetaPatchModel at call time (one φ for all patches of a device, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn


class MetaPatchLayer(nn.Module):
    def __init__(self, base_layer: nn.Linear, phi_dim: int, bottleneck: int, full: bool, init_std: float):
        super().__init__()
        self.base_layer = base_layer
        d, r = base_layer.out_features, bottleneck
        self.d, self.r = d, r
        self.n_patch = r * d + r + d * r + d  # flattened [W_down, b_down, W_up, b_up]
        self.full = full
        if full:
            self.register_parameter("shared_theta", None)
        else:
            # (P_l, m). Θ·φ is computed as a 2-D matmul of φ (n, m) with Θᵀ; a 1-D φ would hit the
            # wrong ORT-training gradient of MatMul(2-D, 1-D) recorded in NOTES.md.
            self.shared_theta = nn.Parameter(torch.randn(self.n_patch, phi_dim) * init_std)
        self.phi_offset = 0  # full mode: where this layer's weights start inside φ
        self._phi: torch.Tensor | None = None

    def set_phi(self, phi: torch.Tensor | None) -> None:
        # A plain attribute, never registered: φ is owned by the MetaPatchModel (or passed in).
        object.__setattr__(self, "_phi", phi)

    def patch_weights(self, phi: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """φ (n, m) -> W_down (n, r, d), b_down (n, r), W_up (n, d, r), b_up (n, d); n = 1 or B."""
        if self.full:
            flat = phi[:, self.phi_offset : self.phi_offset + self.n_patch]  # (n, P_l)
        else:
            flat = torch.matmul(phi, self.shared_theta.t())  # (n, P_l)
        d, r = self.d, self.r
        w_down, b_down, w_up, b_up = torch.split(flat, [r * d, r, d * r, d], dim=-1)
        n = flat.shape[0]
        return w_down.reshape(n, r, d), b_down, w_up.reshape(n, d, r), b_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch(self.base_layer(x))

    def patch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual patch on the base layer's output ``h`` under the current φ (``h`` itself
        without one). The patch reads only ``h``, never the layer's input, which is why a device
        may cache ``h`` of its first patched layer (``MetaPatchModel.features``)."""
        phi = self._phi
        if phi is None:
            return h
        w_down, b_down, w_up, b_up = self.patch_weights(phi)
        lead = h.shape[:-1]
        if phi.shape[0] == 1:
            # One device: plain 2-D matmuls (the path exported to ONNX).
            h2 = h.reshape(-1, self.d)  # (N, d)
            z = torch.relu(torch.matmul(h2, w_down[0].t()) + b_down)  # (N, r)
            out = h2 + torch.matmul(z, w_up[0].t()) + b_up  # (N, d)
            return out.reshape(h.shape)
        # Many devices at once (cloud side): sample b uses its owner's patch.
        B = phi.shape[0]
        h3 = h.reshape(B, -1, self.d)  # (B, N, d); N = 1 or L
        z = torch.relu(torch.matmul(h3, w_down.transpose(1, 2)) + b_down.unsqueeze(1))  # (B, N, r)
        out = h3 + torch.matmul(z, w_up.transpose(1, 2)) + b_up.unsqueeze(1)  # (B, N, d)
        return out.reshape(*lead, self.d)
