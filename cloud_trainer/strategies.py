"""The cloud's update rules as strategy objects; the experiment is a loop over them.

Every strategy starts from the same pretrained point of a seed (SeedContext) and, each round, reports
the models it produces through `report(key, scorer)`, where it is evaluated at once on the round's
future window. Keys are the rows of the results table:

  stale            cloud  the round-0 cloud model, never updated
  model-over-data  cloud  the fresh windows reach the cloud; it trains on them (CE), same epochs as step 1
  full-patch       device per-user full patch fine-tuning (no meta decomposition) on the fresh window
  metapatch        device MetaPatch: φ from the encoder, trained on-device; the cloud never changes
  bundle-in        cloud  DCCL: the bundle the devices hold at the start of the round (its cloud model, zero φ)
  dccl-upload      device DCCL: the device models they upload — that bundle with φ trained on the round's
                          fresh data, which the bundle has not seen
  momodistill      cloud  the cloud model after MoMoDistill step 1 (model over models) of the round
  dccl-start       device the new bundle with each device's starting φ (the start policy), no device steps
  dccl             device DCCL devices: that start φ personalised on-device on the new bundle (on the same
                          fresh data the new bundle has already been trained on)
  fedavg-patches   cloud  the cloud model patched with the sample-weighted mean of all devices' φ
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from cloud_trainer import personalize as reference
from cloud_trainer.checkpoint import build_model
from cloud_trainer.config import momodistill_setting
from cloud_trainer.context import SeedContext
from cloud_trainer.evaluate import choose_within_noise, mean_scores, per_user, score_eval_set
from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.momodistill import step1, step2
from cloud_trainer.patch_generator import encode_phi
from cloud_trainer.personalize import DeviceTrainConfig, personalize_all
from cloud_trainer.train import fit_cloud, logits, make_batch

Report = Callable[[str, Callable], None]
# Whose model each reported key is: the cloud's (zero φ) or the devices' (each with its own φ).
KIND = {"stale": "cloud", "model-over-data": "cloud", "full-patch": "device", "metapatch": "device",
        "bundle-in": "cloud", "dccl-upload": "device", "momodistill": "cloud", "dccl-start": "device",
        "dccl": "device", "fedavg-patches": "cloud"}


def cloud_scorer(model, profile: np.ndarray):
    def score(user, item, hist):
        b = make_batch(user, item, hist, np.zeros(len(item), np.float32), profile)
        return logits(model, b).numpy()
    return score


def device_scorer(model, profile: np.ndarray, phi_table: torch.Tensor):
    def score(user, item, hist):
        b = make_batch(user, item, hist, np.zeros(len(item), np.float32), profile)
        return logits(model, b, phi_table).numpy()
    return score


class Strategy:
    name = "strategy"
    keys: tuple[str, ...] = ()

    def setup(self, ctx: SeedContext) -> None:
        self.model, self.encoder = ctx.fresh_copy()

    def run_round(self, ctx: SeedContext, r: int, report: Report) -> None:
        raise NotImplementedError


class StaleCloud(Strategy):
    name, keys = "stale", ("stale",)

    def run_round(self, ctx, r, report):
        report("stale", cloud_scorer(self.model, ctx.ds.profile))


class ModelOverData(Strategy):
    name, keys = "model-over-data", ("model-over-data",)

    def setup(self, ctx):
        super().setup(ctx)
        self.choices: dict[str, dict] = {}  # str(round) -> the update balance chosen in it (update_balance_each_round)

    def run_round(self, ctx, r, report):
        c = ctx.cfg.cloud
        balance = round_update_balance(ctx, self.model, r, self.choices)
        fit_cloud(self.model, ctx.rounds[r].fresh, list(self.model.cloud_parameters().values()),
                  c.update_epochs, c.lr, c.batch_size, seed=ctx.seed * 100 + r, balance=balance)
        report("model-over-data", cloud_scorer(self.model, ctx.ds.profile))


def choose_update_balance(ctx: SeedContext, model, r: int, values: list[float], seed: int) -> dict:
    """Choose how the fresh rows share the cloud update's label term (`CloudConfig.update_balance`) for
    round r on its validation slices: model-over-data's update replayed on a copy of `model` for each
    value, on the fresh windows minus the slices, each copy scored on the slices (one-SE rule; the first
    listed wins near-ties). Judged without the device models, so MoMoDistill's own choices — made after
    this, with the chosen balance — still compare distillation with the labels on equal terms.
    Returns {"chosen": float, "val_gauc": {value: mean gAUC}}."""
    c, scores = ctx.cfg.cloud, {}
    evaluate_val = validation_gauc(ctx, r)
    for v in dict.fromkeys(float(v) for v in values):
        replay = copy.deepcopy(model)
        fit_cloud(replay, ctx.rounds[r].fresh_train, list(replay.cloud_parameters().values()), c.update_epochs, c.lr,
                  c.batch_size, seed=seed, balance=v)
        scores[f"{v:g}"] = evaluate_val(cloud_scorer(replay, ctx.ds.profile))
    return {"chosen": float(choose_within_noise(scores)), "val_gauc": mean_scores(scores)}


def round_update_balance(ctx: SeedContext, model, r: int, choices: dict[str, dict]) -> float:
    """The update balance of round r for a cloud model `model` (model-over-data's or DCCL's own): round
    0 uses `cloud.update_balance` (tuning's choice); with `update_balance_each_round`, every later
    round chooses anew from `model` on its own validation slices (`choose_update_balance`), recorded
    in `choices[str(r)]["update_balance"]` — a balance that suits one update need not suit the next,
    which starts from a model already weighted towards the tail."""
    cfg = ctx.cfg
    if r >= 1 and cfg.tune and cfg.update_balance_each_round and len(cfg.tune_update_balance) > 1:
        choice = choose_update_balance(ctx, model, r, cfg.tune_update_balance, seed=ctx.seed * 100 + r)
        choices.setdefault(str(r), {})["update_balance"] = choice
        return choice["chosen"]
    return cfg.cloud.update_balance


class FullPatch(Strategy):
    """Per-user full patch: the same patch layers, but each device trains all patch weights directly."""

    name, keys = "full-patch", ("full-patch",)

    def setup(self, ctx):
        mp = MetaPatchConfig(**{**ctx.cfg.metapatch.to_dict(), "full": True})
        base = ctx.model.base
        self.model = build_model(base.config, mp, base.item_attrs)
        state = {k: v for k, v in ctx.model.state_dict().items() if not k.endswith("shared_theta") and "metapatch_" not in k}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and all("metapatch_" in k for k in missing), (missing, unexpected)
        self.phi = torch.zeros(ctx.n_users, self.model.phi_dim)

    def run_round(self, ctx, r, report):
        rd = ctx.rounds[r]
        # Device only, like MetaPatch below: every interaction since the bundle it keeps.
        self.phi, _ = personalize_all(self.model, self.phi, rd.kept_train, rd.kept_val, ctx.cfg.full_patch_device)
        report("full-patch", device_scorer(self.model, ctx.ds.profile, self.phi))


def start_phi(encoder, ctx: SeedContext, r: int, phi_prev: torch.Tensor) -> torch.Tensor:
    """Each device's starting φ for this round's bundle: g(profile, local history, previous φ)."""
    return encode_phi(encoder, ctx.profile, ctx.rounds[r].seq, phi_prev)


def ship_as_new_bundle(encoder, start) -> None:
    """After MoMoDistill step 2 the encoder is a new bundle's: devices start on it by the policy chosen
    for new bundles (`cfg.start.warm` / `.cold`), no longer by the first bundle's (`cfg.start.first`,
    which `build_context` gives the encoder before any MoMoDistill)."""
    encoder.config.start_warm, encoder.config.start_cold = start.warm, start.cold


def blind_start_phi(encoder, ctx: SeedContext, r: int, phi_prev: torch.Tensor) -> torch.Tensor:
    """`start_phi` for choices judged on round r's validation slices: the encoder reads each device's
    history *before* its slice (`RoundData.val_seq`). A device's history at the end of its fresh window
    ends with the slice's items — the very positives those choices are scored on."""
    return encode_phi(encoder, ctx.profile, ctx.rounds[r].val_seq, phi_prev)


class MetaPatch(Strategy):
    name, keys = "metapatch", ("metapatch",)

    def setup(self, ctx):
        super().setup(ctx)
        self.phi = torch.zeros(ctx.n_users, self.model.phi_dim)

    def run_round(self, ctx, r, report):
        rd = ctx.rounds[r]
        # Device only: the bundle never changes, so only round 0 starts from the encoder (a cold φ);
        # later rounds continue from each device's own φ, as a board's agent does on the bundle it
        # holds (it re-encodes only when its bundle changes). The start policy chosen for DCCL's new
        # bundles does not apply here: with φ_prev ≠ 0 it would run the encoder's φ_prev path, which
        # only MoMoDistill's step 2 trains — meta-training feeds it zeros, so here it is random init.
        # And, as that agent does, it trains on every interaction since the bundle (its manifest's
        # `local_data.since` stays put): round r's samples are all fresh windows so far, the newest
        # val_frac held out (`RoundData.kept_train`; DCCL's devices get a new bundle, and with it a new
        # `since`, every round).
        phi0 = start_phi(self.encoder, ctx, r, self.phi) if r == 0 else self.phi
        self.phi, _ = personalize_all(self.model, phi0, rd.kept_train, rd.kept_val, ctx.cfg.device)
        report("metapatch", device_scorer(self.model, ctx.ds.profile, self.phi))


class DCCL(Strategy):
    """One round: devices personalise φ on the bundle they hold and upload it; the cloud runs
    MoMoDistill (step 1: W_f over the pooled fresh data and the device models; step 2: Θ and g
    distilled from the device models) and ships the new bundle; each device starts from
    g(profile, history, φ_n) on it and personalises on its local data again — with the step budget
    chosen for a bundle that has already trained on that data (`cfg.bundle_device()`); the upload
    session, on data the bundle it holds has not seen, uses `cfg.device` on the stale model (round 0)
    and `cfg.upload_device(r)` on a MoMoDistill bundle (later rounds)."""

    name, keys = "dccl", ("bundle-in", "dccl-upload", "momodistill", "dccl-start", "dccl")

    def setup(self, ctx):
        super().setup(ctx)
        self.phi = torch.zeros(ctx.n_users, self.model.phi_dim)
        # str(round) -> the MoMoDistill setting (momodistill_each_round) and update balance
        # (update_balance_each_round) chosen in it, as results.json keeps them
        self.choices: dict[str, dict] = {}
        # The setting in use (a tune_momodistill candidate; None if cfg.momodistill is none of them): a
        # later round's choice keeps it unless another candidate is clearly better (`choose_momodistill`;
        # cfg.momodistill_keep_incumbent).
        self.incumbent = grid_candidate(ctx.cfg.tune_momodistill, ctx.cfg.momodistill)

    def run_round(self, ctx, r, report):
        rd, m, dev = ctx.rounds[r], ctx.cfg.momodistill, ctx.cfg.upload_device(r)
        report("bundle-in", cloud_scorer(self.model, ctx.ds.profile))
        uploaded, _ = personalize_all(self.model, start_phi(self.encoder, ctx, r, self.phi), rd.fresh_train, rd.val, dev)
        report("dccl-upload", device_scorer(self.model, ctx.ds.profile, uploaded))
        balance = round_update_balance(ctx, self.model, r, self.choices)
        if r >= 1 and ctx.cfg.tune and ctx.cfg.momodistill_each_round and ctx.cfg.tune_momodistill:
            # MoMoDistill's setting chosen anew for this round, on its validation slices, with device
            # models that have not read those slices (`blind_uploads`).
            teachers = blind_uploads(self.model, blind_start_phi(self.encoder, ctx, r, self.phi), rd, dev)
            choice = choose_momodistill(ctx, self.model, r, teachers, ctx.cfg.tune_momodistill, seed=ctx.seed * 100 + r,
                                        incumbent=self.incumbent if ctx.cfg.momodistill_keep_incumbent else None,
                                        label_balance=balance)
            m, self.incumbent = choice["config"], choice["chosen"]
            self.choices.setdefault(str(r), {}).update(chosen=choice["chosen"], val_gauc=mean_scores(choice["scores"]))
            if len(ctx.cfg.tune_step2_target) > 1:
                # And what step 2 distils, on the same slices: step 2 replayed on the chosen replay.
                target = choose_step2_target(ctx, r, self.model, self.encoder, choice["replay"], teachers, m,
                                             ctx.cfg.tune_step2_target)
                m = replace(m, step2_target=target["chosen"])
                self.choices[str(r)]["step2_target"] = {"chosen": target["chosen"],
                                                        "val_gauc": mean_scores(target["scores"])}
        # The device models f_n as uploaded (current W_f, Θ and each φ_n) label the pooled fresh data
        # (and, with kd_extra, unlabelled candidates of each user).
        before = logits(self.model, rd.fresh) if m.step2_target == "delta" else None
        _, teacher = step1(self.model, rd.fresh, uploaded, m, ctx.ds.n_items, seed=ctx.seed * 100 + r,
                           label_balance=balance)
        report("momodistill", cloud_scorer(self.model, ctx.ds.profile))
        step2(self.model, self.encoder, rd.fresh, teacher, uploaded, ctx.profile, rd.seq, m,
              seed=ctx.seed * 100 + r, before=before)
        ship_as_new_bundle(self.encoder, ctx.cfg.start)
        start = start_phi(self.encoder, ctx, r, uploaded)
        report("dccl-start", device_scorer(self.model, ctx.ds.profile, start))
        self.phi, _ = personalize_all(self.model, start, rd.fresh_train, rd.val, ctx.cfg.bundle_device())
        report("dccl", device_scorer(self.model, ctx.ds.profile, self.phi))


class FedAvgPatches(Strategy):
    """Federated baseline: devices train φ from the global φ̄; the cloud averages them (FedAvg)."""

    name, keys = "fedavg-patches", ("fedavg-patches",)

    def setup(self, ctx):
        super().setup(ctx)
        self.phi_bar = torch.zeros(1, self.model.phi_dim)

    def run_round(self, ctx, r, report):
        rd = ctx.rounds[r]
        phi0 = self.phi_bar.expand(ctx.n_users, -1).clone()
        phi, _ = personalize_all(self.model, phi0, rd.fresh_train, rd.val, ctx.cfg.device)
        w = rd.train_count.unsqueeze(1)
        self.phi_bar = ((phi * w).sum(0, keepdim=True) / w.sum().clamp(min=1.0))
        report("fedavg-patches", device_scorer(self.model, ctx.ds.profile, self.phi_bar.expand(ctx.n_users, -1)))


REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (StaleCloud, ModelOverData, FullPatch, MetaPatch, DCCL, FedAvgPatches)
}


def validation_gauc(ctx: SeedContext, r: int):
    """Per-user gAUC on round r's validation slices of a scorer (for choices made on validation only)."""
    val = ctx.rounds[r].val_eval
    return lambda scorer: per_user(val, score_eval_set(val, scorer))["gauc"]


def blind_uploads(model, phi0: torch.Tensor, rd, cfg: DeviceTrainConfig) -> torch.Tensor:
    """The round's device models for choices judged on its validation slices: the upload session as
    deployed (`cfg`'s budget on the fresh windows minus those slices; a device with no slice keeps its
    start), but without the keep-if-worse check, which reads the slices' labels (and from a start
    `phi0` that has not read the slices' items either: `blind_start_phi`). A device model kept
    because it did well on its slice would make distilling from it — or starting from it — look better on
    that very slice: the choice would be judged on data it had already used. A replay by the cloud on
    the pooled fresh data it holds, so always the PyTorch reference — never the fleet that `dccl
    simulate` puts behind this module's `personalize_all`."""
    phi, _ = reference.personalize_all(model, phi0, rd.fresh_train, rd.val, replace(cfg, keep_if_worse=False))
    return phi


def replay_step1(ctx: SeedContext, model, r: int, uploaded: torch.Tensor, m_cfg, seed: int,
                 label_balance: float | None = None) -> tuple:
    """MoMoDistill step 1 of round r on a copy of `model`, on the fresh windows minus the validation
    slices, taught by `uploaded`, with the round's update balance (None: `cloud.update_balance`):
    (the copy, the device models' logits on the logged rows)."""
    model = copy.deepcopy(model)
    balance = ctx.cfg.cloud.update_balance if label_balance is None else label_balance
    _, teacher = step1(model, ctx.rounds[r].fresh_train, uploaded, m_cfg, ctx.ds.n_items, seed=seed,
                       label_balance=balance)
    return model, teacher


def grid_candidate(grid: list[dict], m_cfg) -> dict | None:
    """The candidate of `grid` whose setting `m_cfg` (a MoMoDistillConfig) has, or None."""
    return next((c for c in grid if all(getattr(m_cfg, k) == v for k, v in momodistill_setting(c).items())), None)


def choose_momodistill(ctx: SeedContext, model, r: int, uploaded: torch.Tensor, grid: list[dict],
                       seed: int, incumbent: dict | None = None, label_balance: float | None = None) -> dict:
    """Choose MoMoDistill's step-1 setting (λ, kd_extra, kd_balance) for round r on its validation
    slices: the device models `uploaded` (trained on the fresh windows minus those slices) teach a copy
    of `model` on the same rows (`replay_step1`), and each copy is scored on the held-out slices;
    near-ties keep the candidate listed first (one-SE rule) — or the `incumbent`, the setting the
    previous round used, which then goes first: a later round changes the setting only when its
    validation slices show another clearly better, so choices do not flip between near-ties. The cloud
    holds these rows itself (the pooled fresh data), so a deployment can make this choice every round.
    Returns {"chosen", "config", "scores", "replay": (model copy, teacher logits) of the chosen
    candidate}."""
    evaluate_val = validation_gauc(ctx, r)
    scores, replays = {}, {}
    if incumbent is not None:
        grid = [incumbent] + [c for c in grid if momodistill_setting(c) != momodistill_setting(incumbent)]
    for cand in grid:
        key = json.dumps(cand, sort_keys=True)
        m_cfg = replace(ctx.cfg.momodistill, **momodistill_setting(cand))
        replays[key] = (*replay_step1(ctx, model, r, uploaded, m_cfg, seed, label_balance), m_cfg)
        scores[key] = evaluate_val(cloud_scorer(replays[key][0], ctx.ds.profile))
    key = choose_within_noise(scores)
    copy_, teacher, m_cfg = replays[key]
    return {"chosen": json.loads(key), "config": m_cfg, "scores": scores, "replay": (copy_, teacher)}


def replay_step2(ctx: SeedContext, r: int, model_before, encoder, replay: tuple, uploaded: torch.Tensor,
                 m_cfg, seed: int) -> tuple:
    """MoMoDistill step 2 of round r with settings `m_cfg` on copies of step 1's replay (`replay`: the
    model after step 1 and the teachers' logits, `replay_step1` from `model_before`) and of `encoder`,
    on the fresh windows minus the validation slices: the bundle (model, encoder) that round would
    ship, for choices judged on those slices. One replay of step 1 serves several step-2 settings."""
    rd = ctx.rounds[r]
    model, teacher = replay
    model, encoder = copy.deepcopy(model), copy.deepcopy(encoder)
    before = logits(model_before, rd.fresh_train) if m_cfg.step2_target == "delta" else None
    step2(model, encoder, rd.fresh_train, teacher, uploaded, ctx.profile, rd.val_seq, m_cfg, seed=seed, before=before)
    ship_as_new_bundle(encoder, ctx.cfg.start)
    return model, encoder


def choose_step2_target(ctx: SeedContext, r: int, model_before, encoder, replay: tuple, uploaded: torch.Tensor,
                        m_cfg, targets: list[str]) -> dict:
    """Choose momodistill.step2_target for round r >= 1 on its validation slices: step 2 replayed with
    each target (`replay_step2`), each device's starting φ on the replayed bundle (the start policy the
    bundle ships) scored there. One-SE rule; the first target listed wins near-ties. Returns
    {"chosen", "scores"}. (Round 0's tuning chooses it with the balance: `experiment.tune_step2`.)"""
    rd = ctx.rounds[r]
    evaluate_val = validation_gauc(ctx, r)
    scores = {}
    for t in dict.fromkeys(targets):
        model, enc = replay_step2(ctx, r, model_before, encoder, replay, uploaded, replace(m_cfg, step2_target=t),
                                  seed=ctx.seed * 100 + r)
        scores[t] = evaluate_val(device_scorer(model, ctx.ds.profile, encode_phi(enc, ctx.profile, rd.val_seq, uploaded)))
    return {"chosen": choose_within_noise(scores), "scores": scores}


def tune_device_steps(ctx: SeedContext, model, phi0: torch.Tensor, cfg: DeviceTrainConfig, steps_grid: list[int],
                      evaluate_val, r: int = 0) -> tuple[int, dict[int, np.ndarray]]:
    """Choose the on-device step budget on the validation slices (of round `r`): train once for the
    largest budget on the round's fresh windows minus those slices, snapshot φ at each budget of the
    grid, score each on the validation positives (per user, `evaluate_val`), keep the fewest steps
    within noise of the best. Never looks at the future window."""
    rd = ctx.rounds[r]
    grid = sorted(set(steps_grid))
    snaps = {0: phi0.clone()}
    run_cfg = DeviceTrainConfig(**{**cfg.to_dict(), "steps": grid[-1], "keep_if_worse": False, "steps_by_positives": None})
    personalize_all(model, phi0, rd.fresh_train, None, run_cfg,
                    on_step=lambda step, phi: snaps.__setitem__(step, phi.clone()) if step in grid else None)
    scores = {s: evaluate_val(device_scorer(model, ctx.ds.profile, snaps[s])) for s in grid}
    return choose_within_noise(scores), scores  # near-ties: the fewest steps


def choose_steps_by_positives(ctx: SeedContext, scores: dict[int, np.ndarray], r: int = 0,
                              brackets: int = 5) -> tuple[list[list[int]], dict]:
    """A device budget per bracket of training-positive counts, from a budget sweep's per-user
    validation scores (`tune_device_steps`): the brackets are quantiles of the counts among the
    devices with a validation slice (round r's fresh windows minus the slices), and each bracket gets
    the one-SE choice over its own devices. Returns (the `steps_by_positives` table, adjacent brackets
    with the same budget merged; a record per bracket). A device counts what it trains on, so it can
    look its budget up itself (`dccl.protocol.manifest.step_budget`)."""
    rd = ctx.rounds[r]
    users = np.unique(rd.val_eval.user)  # per_user's order, which the scores follow
    owner, label = rd.fresh_train["owner"].numpy(), rd.fresh_train["label"].numpy()
    pos = np.bincount(owner, weights=(label > 0).astype(np.float64), minlength=ctx.n_users)[users].astype(np.int64)
    edges = np.ceil(np.quantile(pos, np.linspace(0, 1, brackets + 1)[1:-1])).astype(np.int64)
    mins = [0, *sorted(int(e) for e in set(edges.tolist()) if e > 0)]
    table: list[list[int]] = []
    record: dict[str, dict] = {}
    for lo, hi in zip(mins, mins[1:] + [None]):
        mask = (pos >= lo) & (True if hi is None else pos < hi)
        if not mask.any():
            continue
        per = {s: v[mask] for s, v in scores.items()}
        chosen = choose_within_noise(per)
        record[f">= {lo}"] = {"chosen": chosen, "devices": int(mask.sum()), "val_gauc": mean_scores(per)}
        if not table or table[-1][1] != chosen:
            table.append([lo, chosen])
    table[0][0] = 0
    return table, record
