"""Training the patch generator (Θ and the encoder g) so that a few device steps on φ help a user.

With an untrained Θ, φ has no leverage and on-device training is inert (NOTES.md). Here Θ and g are
trained first-order-meta-learning style on the cloud history: for a batch of users, each user's φ
starts at g(profile, sequence, 0), takes `inner_steps` AdamW steps on the user's older (support)
samples (`MetaTrainConfig.episodes`: a random draw from them, or the newest few, as a device
holds them) — exactly what the device will do — and the loss of the adapted φ on the user's newer (query)
samples trains Θ and g (first-order: the inner steps are not differentiated through). A second term,
the query loss at the encoder's φ without adaptation, trains g for cold-start devices. W_f is frozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from cloud_trainer.personalize import per_owner_loss, per_owner_loss_sum
from cloud_trainer.train import Batch, take, trainable_only


@dataclass
class MetaTrainConfig:
    epochs: int = 4
    user_batch: int = 64
    inner_steps: int = 5
    inner_lr: float = 0.1  # the device's AdamW learning rate (DCCL's experiment default)
    outer_lr: float = 3e-3
    max_samples_per_user: int = 50  # support / query samples drawn per user per step (cost bound)
    cold_weight: float = 0.5  # weight of the un-adapted (cold-start) query loss
    encoder_from_cloud: bool = False  # start the encoder's item / profile embeddings from the cloud model's
    # What an episode's support is. "sampled": up to `max_samples_per_user` rows drawn at random from
    # the user's whole older history. "device": what a device trains on — the user's *newest* support
    # rows, as many positives (with their negatives) as a device holds in its fresh window, the count
    # drawn per user and epoch from the fleet's round-0 fresh windows (`support_positives`).
    episodes: Literal["sampled", "device"] = "sampled"

    def to_dict(self) -> dict:
        return asdict(self)


def _by_owner(batch: Batch, n_users: int) -> list[np.ndarray]:
    owner = batch["owner"].numpy()
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_users + 1))
    return [order[bounds[u] : bounds[u + 1]] for u in range(n_users)]


def _gather(groups: list[np.ndarray], users: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for u in users:
        idx = groups[u]
        if len(idx) > cap:
            idx = rng.choice(idx, size=cap, replace=False)
        parts.append(idx)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _newest(groups: list[np.ndarray], is_pos: np.ndarray, users: np.ndarray, positives: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Each user's newest rows holding k positives and the negatives that follow them (a user's rows
    are in time order, each positive before its negatives), k drawn from `positives` per user."""
    parts = []
    for u, k in zip(users, rng.choice(positives, size=len(users))):
        idx = groups[u]
        pos_rows = np.flatnonzero(is_pos[idx])
        if len(pos_rows):
            parts.append(idx[pos_rows[-min(int(k), len(pos_rows))]:])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _local(batch: Batch, users: np.ndarray, n_users: int) -> Batch:
    remap = torch.full((n_users,), -1, dtype=torch.long)
    remap[torch.from_numpy(users)] = torch.arange(len(users))
    out = dict(batch)
    out["owner"] = remap[batch["owner"]]
    return out


def init_encoder_from_cloud(encoder, model) -> list[str]:
    """Copy the cloud model's item and profile embeddings into the encoder where the shapes agree.

    The encoder otherwise learns its embeddings from scratch in a few meta-training epochs; the
    cloud model's were trained on every user's cloud history. Returns the names of the copied
    encoder tensors (a shape mismatch — a different ``emb_dim`` — leaves that table as it was).
    """
    base = getattr(model, "base", model)
    pairs = [("item_emb.weight", getattr(base, "item_emb", None))]
    pairs += [(f"profile_emb.{j}.weight", emb) for j, emb in enumerate(getattr(base, "profile_emb", []))]
    own = dict(encoder.named_parameters())
    copied = []
    with torch.no_grad():
        for name, src in pairs:
            if src is not None and name in own and own[name].shape == src.weight.shape:
                own[name].copy_(src.weight)
                copied.append(name)
    return copied


def meta_train(model, encoder, support: Batch, query: Batch, user_profile: torch.Tensor, user_seq: torch.Tensor,
               cfg: MetaTrainConfig, seed: int = 0, progress=None,
               support_positives: np.ndarray | None = None) -> list[float]:
    """Train Θ (model.shared_parameters) and the encoder; returns the mean query loss per epoch.

    `support_positives`: the training-positive counts of the devices' fresh windows, from which
    `episodes="device"` draws each support's size."""
    n_users = user_profile.shape[0]
    if cfg.encoder_from_cloud:
        init_encoder_from_cloud(encoder, model)
    rng = np.random.default_rng(seed)
    sup_groups, qry_groups = _by_owner(support, n_users), _by_owner(query, n_users)
    if cfg.episodes == "device":
        positives = np.asarray(support_positives if support_positives is not None else [], dtype=np.int64)
        positives = positives[positives > 0]
        if not len(positives):
            raise ValueError("meta.episodes='device' needs the devices' fresh-window positive counts")
        is_pos = support["label"].numpy() > 0
    users_all = np.array([u for u in range(n_users) if len(sup_groups[u]) and len(qry_groups[u])])
    theta = list(model.shared_parameters().values())
    params = theta + list(encoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.outer_lr)
    history = []
    model.train()
    with trainable_only(model, theta):
        for _ in range(cfg.epochs):
            rng.shuffle(users_all)
            losses = []
            for start in range(0, len(users_all), cfg.user_batch):
                users = users_all[start : start + cfg.user_batch]
                ub = len(users)
                rows = (_newest(sup_groups, is_pos, users, positives, rng) if cfg.episodes == "device"
                        else _gather(sup_groups, users, cfg.max_samples_per_user, rng))
                sup = _local(take(support, torch.from_numpy(rows)), users, n_users)
                qry = _local(take(query, torch.from_numpy(_gather(qry_groups, users, cfg.max_samples_per_user, rng))), users, n_users)
                uidx = torch.from_numpy(users)
                phi0 = encoder(user_profile[uidx], user_seq[uidx], torch.zeros(ub, model.phi_dim))  # (Ub, m)
                phi = phi0.detach().clone().requires_grad_(True)
                inner = torch.optim.AdamW([phi], lr=cfg.inner_lr, weight_decay=0.0)
                counts = torch.zeros(ub).index_add(0, sup["owner"], torch.ones(len(sup["owner"])))
                for _ in range(cfg.inner_steps):
                    (grad,) = torch.autograd.grad(per_owner_loss_sum(model, sup, phi, counts.clamp(min=1.0)), phi)
                    phi.grad = grad
                    inner.step()
                adapted = phi0 + (phi.detach() - phi0.detach())  # first-order: gradient to g via phi0
                loss = per_owner_loss(model, qry, adapted, ub).mean()
                if cfg.cold_weight > 0:
                    loss = loss + cfg.cold_weight * per_owner_loss(model, qry, phi0, ub).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            history.append(float(np.mean(losses)) if losses else float("nan"))
            if progress is not None:
                progress.update(1)
    return history


def encode_phi(encoder, user_profile: torch.Tensor, user_seq: torch.Tensor, phi_prev: torch.Tensor) -> torch.Tensor:
    """Each device's starting φ as the bundle's encoder gives it (``PatchEncoder.start``: the
    shipped start policy included)."""
    with torch.no_grad():
        return encoder.start(user_profile, user_seq, phi_prev)
