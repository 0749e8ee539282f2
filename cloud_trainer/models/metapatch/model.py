"""MetaPatchModel: injects MetaPatchLayers into a base model (the PEFT-style 'model' role).

The device-trainable parameters are found structurally (names starting with PREFIX), never by
hand-written lists; ``patch_state_dict`` / ``load_patch_state_dict`` move only the small thing.

When every patch sits in the base model's head (``cacheable``), the model splits into
``features(item, hist, profile)`` (independent of φ: the trunk, the head up to the first patched
layer and that layer's base Linear) and ``head(features, phi) -> logit`` (the first patch and the
rest of the head), and ``head(features(...), phi) == forward(..., phi)``.
"""

from __future__ import annotations

import torch
from torch import nn

from cloud_trainer.models.metapatch.config import HEAD, PREFIX, MetaPatchConfig, features_cacheable
from cloud_trainer.models.metapatch.layer import MetaPatchLayer


class MetaPatchModel(nn.Module):
    def __init__(self, base: nn.Module, config: MetaPatchConfig):
        super().__init__()
        self.base = base
        self.config = config
        self.patch_layers: list[MetaPatchLayer] = []
        for name in config.target_modules:
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            target = getattr(parent, child, None) if not child.isdigit() else parent[int(child)]
            if not isinstance(target, nn.Linear):
                raise ValueError(f"metapatch.target_modules: '{name}' is not a Linear layer of the model")
            layer = MetaPatchLayer(target, config.phi_dim, config.bottleneck, config.full, config.theta_init_std)
            if child.isdigit():
                parent[int(child)] = layer
            else:
                setattr(parent, child, layer)
            layer.phi_offset = sum(pl.n_patch for pl in self.patch_layers)
            self.patch_layers.append(layer)
        dim = self.phi_dim
        # The metapatch φ of *this* device: (1, m). Zero = the unpatched cloud model.
        self.metapatch_phi = nn.Parameter(torch.zeros(1, dim))

    @property
    def phi_dim(self) -> int:
        if self.config.full:
            return sum(layer.n_patch for layer in self.patch_layers)
        return self.config.phi_dim

    def forward(self, item, hist, profile, phi: torch.Tensor | None = None) -> torch.Tensor:
        """phi: None = this model's own φ; (1, m) one device; (B, m) each sample's owner's φ."""
        phi = self.metapatch_phi if phi is None else phi
        for layer in self.patch_layers:
            layer.set_phi(phi)
        try:
            return self.base(item, hist, profile)
        finally:
            for layer in self.patch_layers:
                layer.set_phi(None)

    def forward_unpatched(self, item, hist, profile) -> torch.Tensor:
        return self.base(item, hist, profile)

    # -- the trunk / head split (frozen-backbone feature cache) ------------------------------
    @property
    def cacheable(self) -> bool:
        """Every patch is inside the base model's head: the trunk features do not depend on φ."""
        return features_cacheable(self.config, getattr(self.base, "HEAD", HEAD))

    @property
    def head_prefix(self) -> str:
        """State-dict prefix of everything ``head`` reads (the head module, its patches, Θ)."""
        return f"base.{getattr(self.base, 'HEAD', HEAD)}."

    def _cut(self) -> tuple[nn.Sequential, int] | None:
        """(head, i): the head as a Sequential and the index of its first patched layer. The
        trunk runs through that layer's *base* Linear: its output is what the patch reads
        (``MetaPatchLayer.patch``) and it does not depend on φ. None: the head is not a
        Sequential (or a patch sits outside it), so the cut stays at the head's input."""
        if not self.cacheable:
            return None
        head = self.base.get_submodule(getattr(self.base, "HEAD", HEAD))
        if not isinstance(head, nn.Sequential):
            return None
        for i, m in enumerate(head):
            if isinstance(m, MetaPatchLayer):
                return head, i
        return None

    @property
    def feature_dim(self) -> int:
        """F: width of the cached trunk features (the first patched layer's base output)."""
        cut = self._cut()
        return self.base.feature_dim if cut is None else cut[0][cut[1]].base_layer.out_features

    def features(self, item, hist, profile) -> torch.Tensor:
        """The trunk features (B, F): everything up to and including the base Linear of the first
        patched layer of the head. They do not depend on φ (only for a ``cacheable`` config)."""
        if not self.cacheable:
            raise ValueError(f"metapatch.target_modules {list(self.config.target_modules)}: a patch outside the "
                             "head makes the trunk features depend on φ; they cannot be computed without it")
        x = self.base.features(item, hist, profile)
        cut = self._cut()
        if cut is None:
            return x
        head, i = cut
        for m in head[:i]:
            x = m(x)
        return head[i].base_layer(x)

    def head(self, features: torch.Tensor, phi: torch.Tensor | None = None) -> torch.Tensor:
        """logit (B,) from the trunk features (B, F) with the head's patches under ``phi``
        (None = this model's own φ; (1, m) or (B, m) as in ``forward``)."""
        phi = self.metapatch_phi if phi is None else phi
        for layer in self.patch_layers:
            layer.set_phi(phi)
        try:
            cut = self._cut()
            if cut is None:
                return self.base.head(features)
            head, i = cut
            h = head[i].patch(features)
            for m in head[i + 1:]:
                h = m(h)
            return h.squeeze(-1)    # as the base model's head: the last Linear gives (B, 1)
        finally:
            for layer in self.patch_layers:
                layer.set_phi(None)

    # -- structural parameter groups -------------------------------------------------------
    def device_trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n.split(".")[-1].startswith(PREFIX)}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """Θ: the global shared parameters of all patches."""
        return {n: p for n, p in self.named_parameters() if n.endswith("shared_theta")}

    def cloud_parameters(self) -> dict[str, nn.Parameter]:
        """W_f: everything of the base model that is neither Θ nor φ."""
        skip = set(self.device_trainable()) | set(self.shared_parameters())
        return {n: p for n, p in self.named_parameters() if n not in skip}

    def mark_only_phi_trainable(self) -> None:
        trainable = set(self.device_trainable())
        for n, p in self.named_parameters():
            p.requires_grad_(n in trainable)

    def patch_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.device_trainable().items()}

    def load_patch_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.device_trainable()
        if set(state) != set(own):
            raise ValueError(f"patch state names {sorted(state)} != model's {sorted(own)}")
        with torch.no_grad():
            for n, t in state.items():
                if tuple(t.shape) != tuple(own[n].shape):
                    raise ValueError(f"patch state '{n}': shape {tuple(t.shape)} != {tuple(own[n].shape)}")
                own[n].copy_(t)


def get_metapatch_model(base: nn.Module, config: MetaPatchConfig) -> MetaPatchModel:
    return MetaPatchModel(base, config)
