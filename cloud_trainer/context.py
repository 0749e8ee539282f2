"""Everything one seed of an experiment shares across strategies: the split, the per-round tensors and
evaluation sets, and the pretrained starting point (cloud W_f, meta-trained Θ and encoder g)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cloud_trainer.checkpoint import build_model
from cloud_trainer.config import ExperimentConfig
from cloud_trainer.data import build_ctr_samples, build_eval_set, make_split
from cloud_trainer.data.dataset import RecDataset
from cloud_trainer.models.din import DINConfig
from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.patch_generator import meta_train
from cloud_trainer.train import Batch, fit_cloud, make_batch, reproducible


def sequence_at(ds: RecDataset, end: np.ndarray, L: int) -> torch.Tensor:
    """(U, L) the last L items of each user before position end[u], right-aligned, 0-padded."""
    out = np.zeros((ds.n_users, L), np.int64)
    for u, seq in enumerate(ds.sequences):
        part = seq[max(0, int(end[u]) - L) : int(end[u])]
        if len(part):
            out[u, L - len(part) :] = part
    return torch.from_numpy(out)


def to_batch(samples, profile) -> Batch:
    return make_batch(samples.user, samples.item, samples.hist, samples.label, profile)


@dataclass
class RoundData:
    fresh: Batch  # the whole fresh window: what reaches the cloud this round
    fresh_train: Batch  # on-device training samples (fresh minus the validation slice)
    val: Batch  # on-device validation slice (CTR samples)
    future: object  # EvalSet on the future window (every strategy, same negatives)
    val_eval: object  # EvalSet on the validation slice (for choices made on validation only)
    seq: torch.Tensor  # (U, L) each device's history at the end of its fresh window (encoder input)
    val_seq: torch.Tensor  # (U, L) its history before the validation slice (for choices made on it)
    train_count: torch.Tensor  # (U,) on-device training samples per device (FedAvg weights)
    # A device that keeps the round-0 bundle (device-only strategies) trains on every interaction since
    # it, as its agent does: every fresh window so far minus the newest val_frac (`split.since_round0`).
    # Round 0: fresh_train and val themselves.
    kept_train: Batch
    kept_val: Batch


@dataclass
class SeedContext:
    ds: RecDataset
    cfg: ExperimentConfig
    seed: int
    split: object
    profile: torch.Tensor  # (U, P)
    rounds: list[RoundData]
    model: torch.nn.Module  # pretrained W_f + meta-trained Θ (never modified: strategies copy it)
    encoder: PatchEncoder
    timings: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    # For choosing how Θ and g are meta-trained and sized (`tune_meta_episodes`, `tune_phi_dim`):
    # meta_train's inputs, the model and encoder as they stood before it (W_f pretrained, Θ and g
    # initialised) and `patch_generator(mp)`, which initialises them for other patches exactly as this
    # seed would have. None otherwise.
    meta_inputs: dict | None = None

    def fresh_copy(self):
        return copy.deepcopy(self.model), copy.deepcopy(self.encoder)

    @property
    def n_users(self) -> int:
        return self.ds.n_users


def build_context(ds: RecDataset, cfg: ExperimentConfig, seed: int, progress=None, tunes: bool = True) -> SeedContext:
    """Seed `seed`'s starting point: its split and samples, W_f pretrained and Θ and g meta-trained.
    `tunes`: whether this seed will make round-0 choices (`experiment.tune`); only then does it keep
    what choosing `meta.episodes` or `metapatch.phi_dim` needs (`meta_inputs`)."""
    reproducible()      # the same command trains the same models (train.reproducible)
    torch.manual_seed(seed)
    d = cfg.data
    t0 = time.perf_counter()
    split = make_split(ds, rounds=cfg.rounds, fresh_frac=d.fresh_frac, future_frac=d.future_frac,
                       val_frac=d.val_frac, cold_frac=d.cold_frac, seed=seed)
    profile = torch.from_numpy(np.asarray(ds.profile, dtype=np.int64).reshape(ds.n_users, -1))
    rounds = []
    for r in range(cfg.rounds):
        w = split.round(r)

        def ctr(which: str, s: int):
            return to_batch(build_ctr_samples(ds, w, which, neg=d.neg, max_len=d.max_len, seed=s), ds.profile)

        ft = ctr("fresh_train", 1000 * seed + 10 * r + 1)
        val = ctr("val", 1000 * seed + 10 * r + 3)
        kept_train, kept_val = ft, val
        if r > 0:
            kw = split.since_round0(r)
            kept_train = to_batch(build_ctr_samples(ds, kw, "fresh_train", neg=d.neg, max_len=d.max_len,
                                                    seed=1000 * seed + 10 * r + 4), ds.profile)
            kept_val = to_batch(build_ctr_samples(ds, kw, "val", neg=d.neg, max_len=d.max_len,
                                                  seed=1000 * seed + 10 * r + 5), ds.profile)
        rounds.append(RoundData(
            fresh=ctr("fresh", 1000 * seed + 10 * r + 2),
            fresh_train=ft,
            val=val,
            future=build_eval_set(ds, w, "future", n_neg=d.eval_negatives, max_len=d.max_len, seed=seed),
            val_eval=build_eval_set(ds, w, "val", n_neg=d.eval_negatives, max_len=d.max_len, seed=seed + 7),
            seq=sequence_at(ds, w.future[:, 0], d.max_len),
            val_seq=sequence_at(ds, w.val[:, 0], d.max_len),
            train_count=torch.zeros(ds.n_users).index_add(0, ft["owner"], torch.ones(len(ft["owner"]))),
            kept_train=kept_train, kept_val=kept_val,
        ))
    w0 = split.round(0)
    # The cloud history of round 0 as its per-user older (support) and newer (query) parts: the query imitates "fresh data after the bundle", the support "data before it".
    c = w0.cloud
    q = np.where(c[:, 1] > 1, np.maximum(1, np.round(0.3 * c[:, 1])).astype(np.int64), 0)
    sup_w = replace(w0, cloud=np.stack([c[:, 0], c[:, 1] - q], 1))
    qry_w = replace(w0, cloud=np.stack([c[:, 1] - q, c[:, 1]], 1))
    support = to_batch(build_ctr_samples(ds, sup_w, "cloud", neg=d.neg, max_len=d.max_len, seed=1000 * seed + 6), ds.profile)
    query = to_batch(build_ctr_samples(ds, qry_w, "cloud", neg=d.neg, max_len=d.max_len, seed=1000 * seed + 7), ds.profile)
    support_seq = sequence_at(ds, c[:, 1] - q, d.max_len)
    timings = {"data": time.perf_counter() - t0}

    cc = cfg.cloud
    din_cfg = DINConfig(n_items=ds.n_items, n_attrs=ds.n_attrs, profile_vocab=list(ds.profile_vocab),
                        max_len=d.max_len, emb_dim=cc.emb_dim, attn_hidden=cc.attn_hidden,
                        mlp_hidden=tuple(cc.mlp_hidden))
    rng_state = torch.get_rng_state()  # what a patch generator of another φ size starts from (tune_phi_dim)

    def patch_generator(mp: MetaPatchConfig):
        """W_f (initialised), Θ and g for patches `mp`, drawn from the same RNG state whatever `mp`. This is
        the first bundle: g starts the devices (none has a φ yet) by `cfg.start.first`."""
        torch.set_rng_state(rng_state)
        model = build_model(din_cfg, mp, torch.from_numpy(np.asarray(ds.item_attrs)))
        encoder = PatchEncoder(EncoderConfig(n_items=ds.n_items, phi_dim=model.phi_dim,
                                             profile_vocab=list(ds.profile_vocab), emb_dim=cc.emb_dim,
                                             start_warm=cfg.start.warm, start_cold=cfg.start.first))
        return model, encoder

    model, encoder = patch_generator(cfg.metapatch)
    # W_f first learns the older part of the cloud history only, so that meta-training sees newer
    # interactions the cloud model has not fitted yet — exactly the device's situation. (Meta-training
    # on data W_f already memorised gives Θ nothing to learn: φ stays inert, as NOTES.md records.)
    # Then W_f catches up on the newer part, so the cloud model has seen the whole cloud history.
    history = {}
    t0 = time.perf_counter()
    cloud_params = list(model.cloud_parameters().values())
    history["pretrain"] = fit_cloud(model, support, cloud_params, cc.pretrain_epochs, cc.lr, cc.batch_size,
                                    seed=seed, progress=progress)
    timings["pretrain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta_inputs = None
    if not cfg.metapatch.full:
        ft0 = rounds[0].fresh_train  # episodes="device": supports sized as the devices' fresh windows
        positives = np.bincount(ft0["owner"].numpy(), weights=(ft0["label"].numpy() > 0), minlength=ds.n_users)
        if tunes and cfg.tune and (len(cfg.tune_meta_episodes) > 1 or len(cfg.tune_phi_dim) > 1):
            meta_inputs = {"support": support, "query": query, "user_profile": profile, "user_seq": support_seq,
                           "seed": seed, "support_positives": positives, "before": copy.deepcopy((model, encoder)),
                           "patch_generator": patch_generator}
        history["meta_train"] = meta_train(model, encoder, support, query, profile, support_seq, cfg.meta,
                                           seed=seed, progress=progress, support_positives=positives)
    timings["meta_train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    history["catch_up"] = fit_cloud(model, query, cloud_params, cc.update_epochs, cc.lr, cc.batch_size,
                                    seed=seed + 1, progress=progress)
    timings["catch_up"] = time.perf_counter() - t0
    return SeedContext(ds=ds, cfg=cfg, seed=seed, split=split, profile=profile, rounds=rounds, model=model,
                       encoder=encoder, timings=timings, history=history, meta_inputs=meta_inputs)
