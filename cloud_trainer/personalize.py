"""On-device personalisation, PyTorch reference: train only φ on a device's fresh window.

`train_phi` is the deterministic single-device reference that the ONNX Runtime backends are checked
against (same batches, same AdamW). `personalize_all` runs the same procedure for every device at
once: AdamW is per-coordinate, so full-batch AdamW on a (U, m) φ table whose row u only receives
gradient from device u's mean loss is exactly U independent device runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cloud_trainer.train import Batch, take, trainable_only
from dccl.protocol.manifest import check_steps_by_positives, step_budget


@dataclass
class DeviceTrainConfig:
    steps: int = 20  # AdamW steps on the device's local training samples (full batch)
    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    keep_if_worse: bool = True  # keep the starting φ when the local validation loss got worse
    # A device with no validation slice (too few fresh interactions to hold any out) has no evidence
    # that a trained φ is better than the one it started from: it keeps the starting φ. (On Amazon
    # Beauty most devices hold one fresh positive; trained blind they fell 0.012 gAUC below the model
    # they started from.)
    require_val: bool = True
    # A budget by the device's count of training positives, [[min_positives, steps], ...] (the first
    # at 0): a device trains the steps of the last entry at or below its count, and `steps` is then
    # unused. None: every device trains `steps`. Chosen per bracket on validation with
    # `tune_steps_by_positives` (experiment.tune); shipped as the manifest's optimizer.steps_by_positives.
    steps_by_positives: list[list[int]] | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"device.steps = {self.steps}: must be >= 0")
        if self.steps_by_positives is not None:
            self.steps_by_positives = check_steps_by_positives(self.steps_by_positives, "device.steps_by_positives")
        if not self.lr > 0:
            raise ValueError(f"device.lr = {self.lr}: must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def _adamw(phi: torch.Tensor, cfg: DeviceTrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([phi], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)


def train_phi(model, phi0: torch.Tensor, batches: list[Batch], cfg: DeviceTrainConfig) -> tuple[torch.Tensor, list[float]]:
    """One device: one AdamW step per batch in `batches` (in order). Returns the final φ (1, m) and
    the loss before each step. Only φ changes; the model's own parameters are untouched."""
    phi = phi0.detach().clone().reshape(1, -1).requires_grad_(True)
    opt = _adamw(phi, cfg)
    losses = []
    for b in batches:
        loss = F.binary_cross_entropy_with_logits(model(b["item"], b["hist"], b["profile"], phi=phi), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return phi.detach(), losses


def per_owner_loss(model, batch: Batch, phi_table: torch.Tensor, n_owners: int) -> torch.Tensor:
    """(U,) mean BCE of each owner's samples under its own φ (0 for owners without samples)."""
    out = model(batch["item"], batch["hist"], batch["profile"], phi=phi_table[batch["owner"]])
    per = F.binary_cross_entropy_with_logits(out, batch["label"], reduction="none")
    sums = torch.zeros(n_owners).index_add(0, batch["owner"], per)
    counts = torch.zeros(n_owners).index_add(0, batch["owner"], torch.ones_like(per))
    return sums / counts.clamp(min=1.0)


def personalize_all(model, phi0: torch.Tensor, train: Batch, val: Batch | None, cfg: DeviceTrainConfig,
                    chunk: int = 65536, on_step=None) -> tuple[torch.Tensor, dict]:
    """Every device trains its own φ (rows of phi0, (U, m)) on its own samples; returns (φ table, info).
    `on_step(step, phi)` (optional) sees the table after each step, e.g. to snapshot step budgets."""
    U = phi0.shape[0]
    phi = phi0.detach().clone().requires_grad_(True)
    opt = _adamw(phi, cfg)
    was_training = model.training
    model.eval()  # no dropout/batch-norm in the models; eval keeps it explicit
    n = int(train["item"].shape[0])
    counts = torch.zeros(U).index_add(0, train["owner"], torch.ones(n)).clamp(min=1.0)
    # Each device's budget (`step_budget`: one for all, or by its count of training positives). Row u
    # of the table follows device u's own trajectory, so a device that has spent its budget takes its
    # row as it stood then.
    positives = torch.zeros(U, dtype=torch.int64).index_add(0, train["owner"], (train["label"] > 0).long())
    budget = torch.as_tensor(step_budget(cfg.steps, cfg.steps_by_positives, positives.numpy()))
    phi_out = phi0.detach().clone()
    info: dict = {}

    def beyond(s: int) -> Batch:
        """The samples of the devices whose budget goes past step s: only they compute a loss in
        step s + 1. Row u's gradient is device u's alone, so leaving the others out changes no
        active device's step, and a long budget for a small bracket costs that bracket's samples."""
        keep = budget > s
        return train if bool(keep.all()) else take(train, keep[train["owner"]])

    part = beyond(0)
    with trainable_only(model):
        for step in range(1, int(budget.max()) + 1 if U else 0):
            opt.zero_grad(set_to_none=True)
            # The sum over devices of each device's mean loss: row u's gradient is device u's alone.
            for start in range(0, int(part["item"].shape[0]), chunk):
                per_owner_loss_sum(model, take(part, slice(start, start + chunk)), phi, counts).backward()
            opt.step()
            if on_step is not None:
                on_step(step, phi.detach())
            done = budget == step
            phi_out[done] = phi.detach()[done]
            if bool(done.any()):
                part = beyond(step)
        if val is not None and (cfg.keep_if_worse or cfg.require_val):
            has_val = torch.zeros(U, dtype=torch.bool)
            has_val[val["owner"]] = True
            keep = torch.zeros(U, dtype=torch.bool)
            if cfg.keep_if_worse:
                with torch.no_grad():
                    before = per_owner_loss(model, val, phi0, U)
                    after = per_owner_loss(model, val, phi_out, U)
                keep |= has_val & ~(after <= before)  # worse, or NaN: a diverged φ is never kept
            if cfg.require_val:
                keep |= ~has_val
                info["no_val"] = int((~has_val).sum())
            phi_out = torch.where(keep.unsqueeze(1), phi0, phi_out)
            info["kept_previous"] = int(keep.sum())
        diverged = ~torch.isfinite(phi_out).all(1)  # as the edge trainer: a non-finite φ is never kept
        if bool(diverged.any()):
            phi_out = torch.where(diverged.unsqueeze(1), phi0, phi_out)
            info["diverged"] = int(diverged.sum())
    model.train(was_training)
    return phi_out, info


def per_owner_loss_sum(model, part: Batch, phi: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Σ_u mean-loss_u restricted to the samples in `part` (counts: each owner's total samples)."""
    out = model(part["item"], part["hist"], part["profile"], phi=phi[part["owner"]])
    per = F.binary_cross_entropy_with_logits(out, part["label"], reduction="none")
    return (per / counts[part["owner"]]).sum()
