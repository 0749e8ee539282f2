"""MoMoDistill: "model over models" in the cloud.

Step 1 (W_f): CE on the pooled data + λ · CE against the device models' probabilities f_n(x).
Step 2 (Θ, g): with W_f fixed, distil every device model f_n into the proxy
f̂_n = f(·; W_f, Θ, g(profile_n, sequence_n, φ_n)).
Batched: each sample gathers its owner's φ; there is no Python loop over devices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cloud_trainer.train import (Batch, bce, concat, device_balance, logits, minibatches, size, take, train_epoch,
                                 trainable_only)


STEP2_TARGETS = ("device", "delta")


@dataclass
class MoMoDistillConfig:
    lam: float = 1.0  # λ: weight of distillation from the device models in step 1
    step1_epochs: int = 2
    step1_lr: float = 1e-3
    step2_epochs: int = 1
    step2_lr: float = 1e-3
    label_weight: float = 0.5  # step 2: weight of the true labels beside the device models' soft labels
    # Unlabelled candidates per positive *per epoch* that the device models label for step 1: what a
    # device model knows about its user's taste beyond the logged interactions. Each epoch draws new
    # ones, so an epoch costs (rows + candidates) / rows of a plain one. 0 = the logged samples only.
    kd_extra: int = 0
    # How the device models share the distillation term: each row weighs rows_of_its_device^(-kd_balance)
    # (normalised to mean 1). 0: every row alike (the paper's Σ_n Σ_(x,y)∈D_n, dominated by active
    # devices); 1: every device model alike, however much data it holds ("model over models").
    kd_balance: float = 0.0
    # The same for step 2 (Θ and the encoder distilled from the device models): 0 every row alike,
    # 1 every device alike, so the few tail devices count as much as the active ones in Θ and g.
    step2_balance: float = 0.0
    # What step 2 distils. "device": each device model's own output f_n(x) (the paper). "delta": the new
    # cloud model's output plus what the device added to the model it trained on,
    # f(x; W_f) + (f_n(x) − f(x; W_f⁻)) in logits (W_f⁻: the cloud model before step 1) — the personal
    # part of f_n, moved onto the cloud model step 1 has just improved. With "device", step 2 also pulls
    # the patched model back towards the old cloud model wherever step 1 improved on it.
    step2_target: str = "device"
    batch_size: int = 512

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError(f"momodistill.lam = {self.lam}: must be >= 0")
        if self.kd_extra < 0:
            raise ValueError(f"momodistill.kd_extra = {self.kd_extra}: must be >= 0")
        if not 0 <= self.kd_balance <= 1:
            raise ValueError(f"momodistill.kd_balance = {self.kd_balance}: must be in [0, 1]")
        if not 0 <= self.step2_balance <= 1:
            raise ValueError(f"momodistill.step2_balance = {self.step2_balance}: must be in [0, 1]")
        if self.step2_target not in STEP2_TARGETS:
            raise ValueError(f"momodistill.step2_target = {self.step2_target!r}: must be one of {', '.join(STEP2_TARGETS)}")

    def to_dict(self) -> dict:
        return asdict(self)


def device_logits(model, data: Batch, phi_table: torch.Tensor) -> torch.Tensor:
    """Each sample scored by its owner's device model f_n (the uploaded φ_n on the current bundle)."""
    return logits(model, data, phi_table)


def candidates(data: Batch, n_items: int, per_positive: int, seed: int) -> Batch:
    """`per_positive` random catalogue items for each positive of `data`, as unlabelled rows of the
    same owner, history and profile; row j * P + i is the i-th positive's j-th candidate (P positives)."""
    pos = torch.nonzero(data["label"] > 0.5).squeeze(1).repeat(per_positive)
    gen = torch.Generator().manual_seed(seed)
    extra = take(data, pos)
    extra["item"] = torch.randint(1, n_items + 1, (len(pos),), generator=gen)
    extra["label"] = torch.zeros(len(pos))
    return extra


def step1(model, data: Batch, phi_table: torch.Tensor, cfg: MoMoDistillConfig, n_items: int,
          seed: int = 0, label_balance: float = 0.0) -> tuple[list[float], torch.Tensor]:
    """W_f learns from the pooled logged rows `data` (CE on labels + λ · CE on the device models'
    probabilities) and, with kd_extra, from fresh unlabelled candidates each epoch (device models only).
    The teachers are the device models as uploaded: the current model with each owner's φ, scored
    before W_f moves. `label_balance` weighs each row's label term by rows_of_its_device^(-balance)
    (`CloudConfig.update_balance`: the cloud update's own setting, shared with model-over-data, so the
    two differ by the distillation alone). Returns the mean loss per epoch and the teachers' logits
    on `data` (step 2's)."""
    n = size(data)
    teacher = device_logits(model, data, phi_table)
    k = cfg.kd_extra
    extra = candidates(data, n_items, k * cfg.step1_epochs, seed) if k > 0 else None
    extra_teacher = device_logits(model, extra, phi_table) if extra is not None else None
    opt = torch.optim.Adam(list(model.cloud_parameters().values()), lr=cfg.step1_lr)
    gen = torch.Generator().manual_seed(seed)
    label_weight = device_balance(data["owner"], label_balance) if label_balance > 0 else None
    model.train()
    history = []
    for e in range(cfg.step1_epochs):
        if extra is None:
            epoch_data, soft, hard, hard_weight = data, torch.sigmoid(teacher), None, label_weight
        else:
            block = slice(e * len(extra["item"]) // cfg.step1_epochs, (e + 1) * len(extra["item"]) // cfg.step1_epochs)
            mine = take(extra, block)
            epoch_data = concat([data, mine])
            soft = torch.sigmoid(torch.cat([teacher, extra_teacher[block]]))
            hard = torch.cat([torch.ones(n), torch.zeros(size(mine))])
            hard_weight = None if label_weight is None else torch.cat([label_weight, torch.ones(size(mine))])
        weight = device_balance(epoch_data["owner"], cfg.kd_balance) if cfg.kd_balance > 0 else None
        history.append(train_epoch(model, opt, epoch_data, cfg.batch_size, gen, soft=soft, lam=cfg.lam, hard_mask=hard,
                                   soft_weight=weight, hard_weight=hard_weight))
    return history, teacher


def step2(model, encoder, data: Batch, teacher: torch.Tensor, phi_table: torch.Tensor,
          user_profile: torch.Tensor, user_seq: torch.Tensor, cfg: MoMoDistillConfig, seed: int = 0,
          before: torch.Tensor | None = None) -> list[float]:
    """Θ and the encoder g learn, with W_f fixed, to reproduce the device models (`teacher`: their
    logits on `data`) through the proxy f(·; W_f, Θ, g(profile, sequence, φ_n)), beside the labels.
    With step2_target "delta", `before` holds the cloud model's logits on `data` (zero φ) from before
    step 1 moved W_f, and the target is the current cloud logit plus the device's own shift."""
    theta = list(model.shared_parameters().values())
    params = theta + list(encoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.step2_lr)
    gen = torch.Generator().manual_seed(seed)
    if cfg.step2_target == "delta":
        if before is None:
            raise ValueError("step2_target 'delta' needs the cloud model's logits from before step 1 (before=)")
        teacher = teacher - before + logits(model, data)  # zero φ: the patches add nothing, Θ plays no part
    soft = torch.sigmoid(teacher)
    weight = device_balance(data["owner"], cfg.step2_balance) if cfg.step2_balance > 0 else None
    history = []
    with trainable_only(model, theta):
        for _ in range(cfg.step2_epochs):
            total = 0.0
            for idx in minibatches(size(data), cfg.batch_size, gen):
                b = take(data, idx)
                o = b["owner"]
                phi = encoder(user_profile[o], user_seq[o], phi_table[o])  # (B, m)
                out = model(b["item"], b["hist"], b["profile"], phi=phi)
                if weight is None:
                    loss = bce(out, soft[idx]) + cfg.label_weight * bce(out, b["label"])
                else:
                    rows = (F.binary_cross_entropy_with_logits(out, soft[idx], reduction="none")
                            + cfg.label_weight * F.binary_cross_entropy_with_logits(out, b["label"], reduction="none"))
                    loss = (weight[idx] * rows).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            history.append(total / max(size(data), 1))
    return history
