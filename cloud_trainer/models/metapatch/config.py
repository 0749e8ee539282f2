"""MetaPatch configuration (the PEFT-style 'config' role)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PREFIX = "metapatch_"  # every device-trainable parameter's name starts with this
HEAD = "mlp"  # the base model's prediction head (``DIN.HEAD``): it alone reads the trunk features


@dataclass
class MetaPatchConfig:
    # Linear layers of the base model (dotted names) whose outputs get a residual bottleneck patch.
    # Defaults: both hidden layers of the prediction MLP (how this user's interest maps to a click).
    # "attention.key" patches the attention unit (which history items matter) at ~1.5x the cost.
    target_modules: tuple[str, ...] = ("mlp.0", "mlp.2")
    phi_dim: int = 64  # m: size of the per-device metapatch φ (the only thing a device trains)
    bottleneck: int = 4  # r: rank of each patch's down/up projections
    # full=True is the "per-user full patch" baseline: θ_l is trained directly per device (Θ = I,
    # φ = all patch weights), i.e. no meta decomposition.
    full: bool = False
    theta_init_std: float = 0.02

    def __post_init__(self):
        if self.phi_dim < 1 or self.phi_dim > 4096:
            raise ValueError(f"metapatch.phi_dim = {self.phi_dim}: must be in 1..4096")
        if self.bottleneck < 1:
            raise ValueError(f"metapatch.bottleneck = {self.bottleneck}: must be >= 1")
        if not self.target_modules:
            raise ValueError("metapatch.target_modules is empty: name at least one Linear layer")
        self.target_modules = tuple(self.target_modules)

    def to_dict(self) -> dict:
        return asdict(self)


def features_cacheable(config: MetaPatchConfig, head: str = HEAD) -> bool:
    """True when every patch sits inside the base model's ``head`` module: then nothing before the
    head depends on φ, so a device may compute the trunk features x once per sample and train φ on
    x alone (forward, backward and AdamW of the head only). A patch elsewhere (e.g.
    ``attention.key``) makes the trunk depend on φ: such a bundle keeps the raw-input train graphs."""
    return all(name == head or name.startswith(head + ".") for name in config.target_modules)
