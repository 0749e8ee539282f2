"""`dccl experiment`: every strategy on identical splits, negatives and seeds; tables, CIs, plots.

Choices (the on-device step budget) are made on validation slices only, never on the future window.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cloud_trainer.config import DATASETS, STRATEGIES, build_config, momodistill_setting
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import choose_within_noise, mean_scores, paired_ci, per_user, score_eval_set, summarize
from cloud_trainer.patch_generator import meta_train
from cloud_trainer.strategies import (KIND, REGISTRY, FullPatch, blind_start_phi, choose_momodistill,
                                      choose_steps_by_positives, choose_update_balance, replay_step1,
                                      ship_as_new_bundle, tune_device_steps, validation_gauc)
from dccl.errors import DcclError

BASELINES = ("stale", "model-over-data")
CI_METRICS = ("gauc", "ndcg@10", "hr@10")  # per-user metrics: paired over users
TABLE_METRICS = ("auc", "gauc", "hr@10", "ndcg@10")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: synthetic, built in)")
    p.add_argument("--data", default=None, help="dataset path (file or folder); default $DCCL_DATA or ../shared/datasets")
    p.add_argument("--rounds", type=int, default=None, help="device-cloud rounds K (default 2)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3); mean ± std over seeds")
    p.add_argument("--strategies", default=None, help=f"comma-separated subset of: {', '.join(STRATEGIES)}")
    p.add_argument("--config", default=None, help="JSON config file (see cloud_trainer/config.py for every field)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set device.steps=10 (repeatable; VALUE is JSON)")
    p.add_argument("--no-tune", action="store_true",
                   help="keep the config's device step budgets (device.steps, bundle_steps, upload_steps), MoMoDistill settings "
                        "and start policy instead of choosing them on the validation slices")
    p.add_argument("--out", default="runs/experiment", help="output folder (results.json, results.md, plots)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DcclError(f"--set {item!r}: expected KEY=VALUE, e.g. device.steps=10")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args) -> int:
    overrides = {"dataset": args.dataset, "data_path": args.data, "rounds": args.rounds, "seeds": args.seeds}
    if args.strategies:
        overrides["strategies"] = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.no_tune:
        overrides["tune"] = False
    overrides.update(_parse_set(args.set))
    cfg = build_config(overrides, args.config)
    ds = load_data(cfg)
    print(ds.summary(), file=sys.stderr)
    out = Path(args.out)
    results = run_experiment(cfg, ds, progress=not args.quiet)
    write_outputs(results, out)
    print(results["table_md"])
    print(f"\nresults: {out / 'results.json'}  report: {out / 'results.md'}", file=sys.stderr)
    return 0


def load_data(cfg):
    """The configured dataset: the built-in synthetic one, or a real one from its path."""
    from cloud_trainer.data import load_dataset, make_synthetic

    if cfg.dataset == "synthetic":
        return make_synthetic(n_users=cfg.data.synthetic_users, n_items=cfg.data.synthetic_items, seed=12345)
    return load_dataset(cfg.dataset, cfg.data_path)


def run_experiment(cfg, ds, progress: bool = True) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    keys = [k for name in cfg.strategies for k in REGISTRY[name].keys]
    summ = {k: [[None] * cfg.rounds for _ in range(cfg.seeds)] for k in keys}
    users = {k: [[None] * cfg.rounds for _ in range(cfg.seeds)] for k in keys}
    tuning, timings = {}, []
    untuned = cfg.model_copy(deep=True)  # tune_each_seed: every seed starts from the configured values
    bar = tqdm(total=cfg.seeds * len(cfg.strategies), desc="experiment", disable=not progress, file=sys.stderr)
    for seed in range(cfg.seeds):
        bar.set_postfix_str(f"seed {seed}: pretrain + meta-train")
        # Seed 0 tunes `cfg` itself (what results.json's config records); with tune_each_seed every
        # later seed tunes its own copy on its own slices, else it runs with seed 0's choices.
        seed_cfg = cfg if seed == 0 or not cfg.tune_each_seed else untuned.model_copy(deep=True)
        tunes = cfg.tune and (seed == 0 or cfg.tune_each_seed)
        ctx = build_context(ds, seed_cfg, seed, tunes=tunes)
        t_seed = {"seed": seed, **ctx.timings}
        if tunes:
            bar.set_postfix_str(f"seed {seed}: tune on validation slices")
            t0 = time.perf_counter()
            chosen = tune(ctx, seed_cfg)
            if seed == 0:
                tuning = chosen
            else:
                tuning.setdefault("per_seed", {})[str(seed)] = chosen
            t_seed["tune"] = time.perf_counter() - t0
        for name in cfg.strategies:
            bar.set_postfix_str(f"seed {seed}: {name}")
            t0 = time.perf_counter()
            strategy = REGISTRY[name]()
            strategy.setup(ctx)
            for r in range(cfg.rounds):
                ev = ctx.rounds[r].future

                def report(key, scorer, _r=r, _ev=ev):
                    scores = score_eval_set(_ev, scorer)
                    summ[key][seed][_r] = summarize(_ev, scores)
                    users[key][seed][_r] = per_user(_ev, scores)

                strategy.run_round(ctx, r, report)
            if getattr(strategy, "choices", None):  # choices made anew in later rounds, on their slices
                key = "momodistill_each_round" if name == "dccl" else f"{name}_each_round"
                tuning.setdefault(key, {})[str(seed)] = strategy.choices
            t_seed[name] = time.perf_counter() - t0
            bar.update(1)
        timings.append(t_seed)
    bar.close()
    results = aggregate(cfg, ds, summ, users)
    results["tuning"] = tuning
    results["timings"] = {"per_seed": timings, "total_seconds": time.perf_counter() - t_start}
    results["table_md"] = table_markdown(results, cfg)
    return results


def tune(ctx, cfg) -> dict:
    """Choose, on round 0's validation slices (seed 0), each device strategy's step budget and, for
    DCCL, MoMoDistill's λ / unlabelled candidates and the devices' start policies (on the first bundle,
    with its budget: `tune_first_bundle`; on new bundles: `tune_start`); writes them into cfg."""
    evaluate_val = validation_gauc(ctx, 0)
    out = {}
    if len(cfg.tune_update_balance) > 1 and {"model-over-data", "dccl"} & set(cfg.strategies):
        out["cloud.update_balance"] = tune_update_balance(ctx, cfg)
    if len(cfg.tune_meta_episodes) > 1 and ctx.meta_inputs is not None:
        out["meta.episodes"] = tune_meta_episodes(ctx, cfg, evaluate_val)
    if len(cfg.tune_phi_dim) > 1 and ctx.meta_inputs is not None:
        out["metapatch.phi_dim"] = tune_phi_dim(ctx, cfg, evaluate_val)
    ctx.meta_inputs = None  # the pre-meta-training copy and its inputs are not needed again this seed
    phi0 = tune_first_bundle(ctx, cfg, evaluate_val, out)
    if "full-patch" in cfg.strategies:
        fp = FullPatch()
        fp.setup(ctx)
        best, scores = tune_device_steps(ctx, fp.model, fp.phi, cfg.full_patch_device, cfg.tune_steps, evaluate_val)
        cfg.full_patch_device.steps = best
        out["full_patch_device.steps"] = {"chosen": best, "val_gauc": mean_scores(scores)}
        if cfg.tune_steps_by_positives:
            cfg.full_patch_device.steps_by_positives, brackets = choose_steps_by_positives(ctx, scores)
            out["full_patch_device.steps_by_positives"] = {"chosen": cfg.full_patch_device.steps_by_positives,
                                                           "brackets": brackets}
    if "dccl" in cfg.strategies:
        # Round 0's device models (on the fresh windows minus their validation slices, blind to those
        # slices: `blind_uploads`): the teachers of the choices below and the devices' previous φ.
        from cloud_trainer.strategies import blind_uploads

        uploaded = blind_uploads(ctx.model, phi0, ctx.rounds[0], cfg.device)
        replayed = None
        if cfg.tune_momodistill:
            out["momodistill"], replayed = tune_momodistill(ctx, cfg, uploaded)
        bundle, record = tune_step2(ctx, cfg, uploaded, replayed)
        if record is not None:
            out["momodistill.step2"] = record
        out["start"] = tune_start(ctx, cfg, bundle, uploaded, evaluate_val)
        out["bundle_device.steps"] = tune_bundle_steps(ctx, cfg, bundle, uploaded, evaluate_val)
        if cfg.tune_upload_steps and len(ctx.rounds) > 1:
            out["upload_device.steps"] = tune_upload_steps(
                ctx, cfg, validation_gauc(ctx, 1))
    return out


def tune_first_bundle(ctx, cfg, evaluate_val, out: dict) -> torch.Tensor:
    """Choose how devices start on the first bundle (the cloud model before any MoMoDistill, which no
    device holds a φ for yet) and their step budget on it, together, on round 0's validation slices:
    for each start — the encoder's φ, or zero (the cloud model itself) — the budget is chosen by the
    one-SE rule from that start (blind to the slices: `blind_start_phi`); then the start whose budget
    scores best, the encoder's unless zero is clearly better (`choose_within_noise`). Writes
    `cfg.start.first` (inside the first bundle's encoder.onnx), `cfg.device.steps` (and, with
    `tune_steps_by_positives`, a budget per bracket); records them under "start.first" and
    "device.steps"; returns the chosen starting φ.

    The policy on new MoMoDistill bundles (`tune_start`) is chosen apart, on a replayed new bundle:
    the two bundles differ, and so may what devices do best to start from on them. Only MetaPatch
    and DCCL start from the encoder; for other strategies the configured start is kept."""
    from cloud_trainer.models.encoder import START_COLD

    c = ctx.encoder.config
    options = START_COLD if {"metapatch", "dccl"} & set(cfg.strategies) else (cfg.start.first,)
    starts, sweeps, best = {}, {}, {}
    for option in options:
        c.start_cold = option
        starts[option] = blind_start_phi(ctx.encoder, ctx, 0, torch.zeros(ctx.n_users, ctx.model.phi_dim))
        best[option], sweeps[option] = tune_device_steps(ctx, ctx.model, starts[option], cfg.device, cfg.tune_steps,
                                                         evaluate_val)
    chosen = choose_within_noise({o: sweeps[o][best[o]] for o in options})
    c.start_cold = cfg.start.first = chosen
    cfg.device.steps = best[chosen]
    if len(options) > 1:
        out["start.first"] = {"chosen": chosen,
                              "val_gauc": mean_scores({f"{o} ({best[o]} steps)": sweeps[o][best[o]] for o in options})}
    out["device.steps"] = {"chosen": best[chosen], "val_gauc": mean_scores(sweeps[chosen])}
    if cfg.tune_steps_by_positives:
        cfg.device.steps_by_positives, brackets = choose_steps_by_positives(ctx, sweeps[chosen])
        out["device.steps_by_positives"] = {"chosen": cfg.device.steps_by_positives, "brackets": brackets}
    return starts[chosen]


def tune_meta_episodes(ctx, cfg, evaluate_val) -> dict:
    """Choose `meta.episodes` (from `cfg.tune_meta_episodes`) on round 0's validation slices: Θ and g
    meta-trained with each kind of episode from the same start (`ctx.meta_inputs`), each scored by its
    devices' best step budget (`_choose_generator`). W_f does not depend on Θ (a device-free forward
    pass skips the patches), so every option shares the seed's cloud model. Writes the choice into cfg
    (later seeds meta-train with it) and puts its Θ and g into ctx."""
    mi = ctx.meta_inputs

    def build(episodes):
        if episodes == cfg.meta.episodes:
            return ctx.model, ctx.encoder, ctx.history.get("meta_train")
        before, encoder = copy.deepcopy(mi["before"])
        history = meta_train(before, encoder, mi["support"], mi["query"], mi["user_profile"], mi["user_seq"],
                             replace(cfg.meta, episodes=episodes), seed=mi["seed"],
                             support_positives=mi["support_positives"])
        model = copy.deepcopy(ctx.model)
        _copy_params(model.shared_parameters(), before.shared_parameters())
        return model, encoder, history

    cfg.meta.episodes, record = _choose_generator(ctx, cfg, evaluate_val, cfg.tune_meta_episodes, build)
    return record


def tune_phi_dim(ctx, cfg, evaluate_val) -> dict:
    """Choose `metapatch.phi_dim` (from `cfg.tune_phi_dim`) on round 0's validation slices, after
    `meta.episodes`: for each size, Θ and g initialised as this seed would have initialised them
    (`ctx.meta_inputs["patch_generator"]`) and meta-trained on the same pretrained W_f, then given the
    seed's cloud model (W_f does not depend on Θ); each scored by its devices' best step budget
    (`_choose_generator`). Writes the choice into cfg (later seeds build that size) and puts the
    chosen model and g into ctx."""
    mi = ctx.meta_inputs

    def build(k):
        if k == ctx.model.phi_dim:
            return ctx.model, ctx.encoder, ctx.history.get("meta_train")
        rng = torch.get_rng_state()  # the generator rewinds the global RNG; later stages keep theirs
        model, encoder = mi["patch_generator"](replace(cfg.metapatch, phi_dim=k))
        torch.set_rng_state(rng)
        _copy_params(model.cloud_parameters(), mi["before"][0].cloud_parameters())  # W_f as pretrained
        history = meta_train(model, encoder, mi["support"], mi["query"], mi["user_profile"], mi["user_seq"],
                             cfg.meta, seed=mi["seed"], support_positives=mi["support_positives"])
        _copy_params(model.cloud_parameters(), ctx.model.cloud_parameters())  # W_f after its catch-up
        return model, encoder, history

    cfg.metapatch.phi_dim, record = _choose_generator(ctx, cfg, evaluate_val, cfg.tune_phi_dim, build)
    return record


def _choose_generator(ctx, cfg, evaluate_val, options: list, build) -> tuple:
    """Score each option's patch generator (`build(option)` -> model, encoder, meta-training history)
    by its devices' best step budget on round 0's slices (φ from g, blind to the slices, trained on the
    fresh windows minus them); one-SE rule over those, the first listed preferred. Puts the chosen
    model, encoder and history into ctx; returns (the chosen option, its record for `tuning`)."""
    candidates, per_user_best, record = {}, {}, {}
    for option in options:
        model, encoder, history = build(option)
        phi0 = blind_start_phi(encoder, ctx, 0, torch.zeros(ctx.n_users, model.phi_dim))
        best, scores = tune_device_steps(ctx, model, phi0, cfg.device, cfg.tune_steps, evaluate_val)
        candidates[option], per_user_best[option] = (model, encoder, history), scores[best]
        record[str(option)] = {"chosen_steps": best, "val_gauc": mean_scores(scores)}
    chosen = choose_within_noise(per_user_best)
    ctx.model, ctx.encoder, ctx.history["meta_train"] = candidates[chosen]
    val = {str(k): v for k, v in mean_scores(per_user_best).items()}
    return chosen, {"chosen": chosen, "val_gauc": val, "device_steps": record}


def _copy_params(dst: dict, src: dict) -> None:
    with torch.no_grad():
        for name, p in dst.items():
            p.copy_(src[name])


def tune_update_balance(ctx, cfg) -> dict:
    """Choose `cloud.update_balance` (from `cfg.tune_update_balance`) on round 0's validation slices
    (`strategies.choose_update_balance` from the stale model); written to cfg.cloud.update_balance.
    With `update_balance_each_round`, model-over-data and DCCL choose anew in every later round."""
    choice = choose_update_balance(ctx, ctx.model, 0, cfg.tune_update_balance, seed=ctx.seed)
    cfg.cloud.update_balance = choice["chosen"]
    return choice


def tune_upload_steps(ctx, cfg, evaluate_val_r1) -> dict:
    """Choose the step budget of the upload session on a MoMoDistill bundle (rounds >= 1: devices on
    the bundle they hold, training on fresh data it has not seen). Round 0 cannot show that case, so
    DCCL's round 0 runs with every other choice made, and the budget is chosen on round 1's
    validation slices (one-SE rule): each device's newest interactions of round 1, which its upload
    session does not train on (it keeps them for keep-if-worse) and which precede round 1's future
    window. Round 0 never uses this budget. Written to `cfg.upload_steps`."""
    from cloud_trainer.strategies import DCCL

    dccl = DCCL()
    dccl.setup(ctx)
    dccl.run_round(ctx, 0, lambda key, scorer: None)
    start = blind_start_phi(dccl.encoder, ctx, 1, dccl.phi)
    best, scores = tune_device_steps(ctx, dccl.model, start, cfg.device, cfg.tune_steps, evaluate_val_r1, r=1)
    cfg.upload_steps = best
    return {"chosen": best, "val_gauc": mean_scores(scores)}


def tune_step2(ctx, cfg, uploaded, replayed) -> tuple[tuple, dict | None]:
    """Choose step 2's settings — momodistill.step2_balance (from `cfg.tune_step2_balance`) and
    step2_target (from `cfg.tune_step2_target`) — on round 0's validation slices: on step 1's replay
    (`replayed`, from the stale model), step 2 replayed for each pair on the fresh windows minus the
    validation slices (`strategies.replay_step2`), each device's starting φ from the new encoder (warm:
    from its uploaded φ) scored on the new bundle. Step 2 shapes exactly that start, so it is judged
    there, before any on-device step; the start policy is chosen after, so this scores the raw encoder.
    One-SE rule; the pair listed first (balance, then target) wins near-ties. Written to
    cfg.momodistill; returns the chosen pair's bundle — the bundle every choice about devices on a new
    bundle is judged on — and the record (None when at most one pair was possible)."""
    from itertools import product

    from cloud_trainer.strategies import device_scorer, replay_step2

    if replayed is None:  # step 1 with the configured settings (MoMoDistill's tuning did not run it)
        replayed = replay_step1(ctx, ctx.model, 0, uploaded, cfg.momodistill, seed=ctx.seed)
    m = cfg.momodistill
    pairs = list(product(dict.fromkeys(cfg.tune_step2_balance or [m.step2_balance]),
                         dict.fromkeys(cfg.tune_step2_target or [m.step2_target])))
    rd, evaluate_val = ctx.rounds[0], validation_gauc(ctx, 0)
    bundles, scores = {}, {}
    for v, t in pairs:
        setting = replace(m, step2_balance=float(v), step2_target=t)
        key = json.dumps({"step2_balance": float(v), "step2_target": t})
        bundles[key] = replay_step2(ctx, 0, ctx.model, ctx.encoder, replayed, uploaded, setting, seed=ctx.seed)
        if len(pairs) > 1:
            model, encoder = bundles[key]
            with torch.no_grad():  # the raw g: the encoder's φ, whatever start policy is set
                phi = encoder(ctx.profile, rd.val_seq, uploaded)
            scores[key] = evaluate_val(device_scorer(model, ctx.ds.profile, phi))
    if len(pairs) == 1:
        m.step2_balance, m.step2_target = float(pairs[0][0]), pairs[0][1]
        return next(iter(bundles.values())), None
    best = choose_within_noise(scores)
    chosen = json.loads(best)
    m.step2_balance, m.step2_target = chosen["step2_balance"], chosen["step2_target"]
    return bundles[best], {"chosen": chosen, "val_gauc": mean_scores(scores)}


def tune_start(ctx, cfg, bundle: tuple, uploaded, evaluate_val) -> dict:
    """Choose what devices start from on a new bundle — the encoder's φ, their previous φ, or zero
    (the cloud model itself); for a device without a previous φ, the encoder's or zero — on round 0's
    validation slices: each option's starting φ on the replayed bundle (`_replay_round0`) is scored
    there. Cold start is judged on the same devices with no previous φ."""
    from cloud_trainer.models.encoder import START_COLD, START_WARM
    from cloud_trainer.patch_generator import encode_phi
    from cloud_trainer.strategies import device_scorer

    rd = ctx.rounds[0]
    model, encoder = bundle
    scores = {}
    c = encoder.config
    for which, options, prev in (("warm", START_WARM, uploaded), ("cold", START_COLD, torch.zeros_like(uploaded))):
        for option in options:
            c.start_warm, c.start_cold = (option, "encoder") if which == "warm" else ("encoder", option)
            phi = encode_phi(encoder, ctx.profile, rd.val_seq, prev)
            scores[f"{which}={option}"] = evaluate_val(device_scorer(model, ctx.ds.profile, phi))
    # Near-ties keep the first option listed (the encoder's φ): choose_within_noise.
    for which, options in (("warm", START_WARM), ("cold", START_COLD)):
        best = choose_within_noise({o: scores[f"{which}={o}"] for o in options})
        setattr(cfg.start, which, best)
    # The replayed bundle's encoder now starts devices the chosen way (tune_bundle_steps trains from its
    # starting φ); so will every new bundle (`strategies.ship_as_new_bundle`). The first bundle keeps
    # its own policy (`tune_first_bundle`).
    ship_as_new_bundle(encoder, cfg.start)
    return {"chosen": {"warm": cfg.start.warm, "cold": cfg.start.cold}, "val_gauc": mean_scores(scores)}


def tune_bundle_steps(ctx, cfg, bundle: tuple, uploaded, evaluate_val) -> dict:
    """Choose the step budget of devices re-personalising on a new MoMoDistill bundle — which has
    already trained on the fresh data they train on, unlike the bundle `cfg.device`'s budget was
    chosen on — on the replayed round-0 bundle from the chosen starting φ (validation slices, one-SE
    rule). Written to `cfg.bundle_steps`; the bundles a deployment ships after MoMoDistill carry it."""
    from cloud_trainer.patch_generator import encode_phi
    from cloud_trainer.strategies import tune_device_steps

    model, encoder = bundle
    start = encode_phi(encoder, ctx.profile, ctx.rounds[0].val_seq, uploaded)
    best, scores = tune_device_steps(ctx, model, start, cfg.bundle_device(), cfg.tune_steps, evaluate_val)
    cfg.bundle_steps = best
    return {"chosen": best, "val_gauc": mean_scores(scores)}


def tune_momodistill(ctx, cfg, phi) -> tuple[dict, tuple]:
    """Choose MoMoDistill's λ, kd_extra and kd_balance on round 0's validation slices
    (`strategies.choose_momodistill`: the device models of round 0 teach a copy of the cloud model on
    the fresh windows *without* their validation slices, scored on those slices); written into
    cfg.momodistill. Returns the choice and the chosen replay. With `momodistill_each_round`, DCCL
    chooses anew in every later round, on that round's slices."""
    choice = choose_momodistill(ctx, ctx.model, 0, phi, cfg.tune_momodistill, seed=ctx.seed)
    for name, value in momodistill_setting(choice["chosen"]).items():
        setattr(cfg.momodistill, name, value)
    return {"chosen": choice["chosen"], "val_gauc": mean_scores(choice["scores"])}, choice["replay"]


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]  # an empty activity quintile (Amazon: tied counts) has no value in any seed
    if not len(a):
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(a.mean()), "std": float(a.std()) if len(a) > 1 else 0.0}


def _seed_diffs(users, key, base, metric, r, subset=None) -> list[np.ndarray]:
    """Per-user differences key − base for round r, one array per seed (same users, same negatives)."""
    diffs = []
    for s in range(len(users[key])):
        a, b = users[key][s][r], users[base][s][r]
        assert np.array_equal(a["user"], b["user"])
        mask = ~a["cold"] if subset is None else subset(a)
        diffs.append(a[metric][mask] - b[metric][mask])
    return diffs


def _pool_diff(users, key, base, metric, r, subset=None) -> np.ndarray:
    """Per-user differences key − base for round r, pooled over seeds."""
    return np.concatenate(_seed_diffs(users, key, base, metric, r, subset))


def _finite_mean(a: np.ndarray) -> float:
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def _claim_stat(users, key, base, r, subset=None) -> dict:
    """A claim row's gAUC statistic: the paired CI over users pooled over seeds, and `per_seed`, each
    seed's mean difference — the CI is over users only; how far the seeds (training runs) spread is
    the variance it leaves out."""
    per = _seed_diffs(users, key, base, "gauc", r, subset)
    return {**paired_ci(np.concatenate(per)), "per_seed": [_finite_mean(d) for d in per]}


def aggregate(cfg, ds, summ, users) -> dict:
    R = cfg.rounds
    last = R - 1
    out = {"config": cfg.to_dict(), "dataset": ds.summary(), "synthetic": bool(ds.synthetic), "strategies": {}}
    for key in summ:
        rounds = []
        for r in range(R):
            per = [summ[key][s][r] for s in range(cfg.seeds)]
            entry = {
                "overall": {m: _mean_std([p["overall"][m] for p in per]) for m in TABLE_METRICS},
                "cold": {m: _mean_std([p["cold"][m] for p in per]) for m in TABLE_METRICS},
                "groups": {g: {m: _mean_std([p["groups"][g][m] for p in per]) for m in TABLE_METRICS}
                           for g in per[0]["groups"]},
                "users": per[0]["overall"]["users"],
                "cold_users": per[0]["cold"]["users"],
            }
            rounds.append(entry)
        gains = {}
        for base in BASELINES:
            if base not in summ or base == key:
                continue
            gains[base] = {
                "overall": {m: paired_ci(_pool_diff(users, key, base, m, last)) for m in CI_METRICS},
                "groups": {str(g): {m: paired_ci(_pool_diff(users, key, base, m, last,
                                                            lambda a, g=g: (~a["cold"]) & (a["group"] == g)))
                                    for m in ("gauc", "ndcg@10")} for g in range(5)},
                "cold": {m: paired_ci(_pool_diff(users, key, base, m, last, lambda a: a["cold"]))
                         for m in ("gauc", "ndcg@10")},
            }
        out["strategies"][key] = {"kind": KIND[key], "rounds": rounds, "gain_vs": gains}
    out["claims"] = claims(users, summ, last)
    return out


def _claim(text, comparison, stat) -> dict:
    holds = bool(np.isfinite(stat["ci_low"]) and stat["ci_low"] > 0)
    return {"claim": text, "comparison": comparison, "metric": "gauc", **stat, "holds": holds}


def tail_minus_head(users, key, base, r) -> dict:
    """(key − base on the tail quintile) − (key − base on the head quintile), warm users, round r,
    pooled over seeds, with a 95 % bootstrap CI (two independent groups of users); and, as `tail_gain`,
    the tail's own paired gain with its CI — the claim is about a gain, so it needs one (`tail_claim`)."""
    from scipy import stats as sps

    tails = _seed_diffs(users, key, base, "gauc", r, lambda a: (~a["cold"]) & (a["group"] == 0))
    heads = _seed_diffs(users, key, base, "gauc", r, lambda a: (~a["cold"]) & (a["group"] == 4))
    per_seed = [_finite_mean(t) - _finite_mean(h) for t, h in zip(tails, heads)]
    tail, head = np.concatenate(tails), np.concatenate(heads)
    tail, head = tail[np.isfinite(tail)], head[np.isfinite(head)]
    if len(tail) < 2 or len(head) < 2:
        nan = float("nan")
        return {"mean": nan, "ci_low": nan, "ci_high": nan, "n": 0, "per_seed": per_seed,
                "tail_gain": {"mean": nan, "ci_low": nan, "ci_high": nan, "n": 0}}
    res = sps.bootstrap((tail, head), lambda a, b, axis=-1: a.mean(axis) - b.mean(axis), vectorized=True,
                        n_resamples=2000, method="percentile", random_state=np.random.default_rng(0))
    return {"mean": float(tail.mean() - head.mean()), "ci_low": float(res.confidence_interval.low),
            "ci_high": float(res.confidence_interval.high), "n": int(len(tail) + len(head)),
            "per_seed": per_seed, "tail_gain": paired_ci(tail)}


def tail_claim(text, comparison, stat) -> dict:
    """A tail-vs-head row: it holds only where the tail gains at all (its own gain's CI above zero) and
    gains more than the head (tail − head's CI above zero). Where both groups lose, the tail losing less
    is no gain on the tail."""
    out = _claim(text, comparison, stat)
    t = stat["tail_gain"]
    out["holds"] = out["holds"] and bool(np.isfinite(t["ci_low"]) and t["ci_low"] > 0)
    return out


def claims(users, summ, r) -> list[dict]:
    have = set(summ)
    out = []
    if {"dccl-upload", "bundle-in"} <= have:
        out.append(_claim("device models beat the cloud model they started from (on fresh data it has not seen)",
                          "dccl-upload (φ trained on the round's fresh window) − bundle-in (the bundle they hold, "
                          "zero φ), warm users", _claim_stat(users, "dccl-upload", "bundle-in", r)))
    if {"metapatch", "stale"} <= have:
        out.append(_claim("device models beat the cloud model they started from (MetaPatch alone)",
                          "metapatch (devices personalise φ on the stale cloud model, every round) − stale, "
                          "warm users", _claim_stat(users, "metapatch", "stale", r)))
    if {"dccl", "momodistill"} <= have:
        out.append(_claim("device models beat the cloud model they started from (on data it has trained on)",
                          "dccl (device) − momodistill (the new bundle's cloud model, zero φ; MoMoDistill trained it "
                          "on the same fresh windows), warm users",
                          _claim_stat(users, "dccl", "momodistill", r)))
    if {"momodistill", "model-over-data"} <= have:
        out.append(_claim("MoMoDistill beats model-over-data on the same data and epochs",
                          "momodistill − model-over-data (cloud), warm users",
                          _claim_stat(users, "momodistill", "model-over-data", r)))
    if {"metapatch", "full-patch"} <= have:
        out.append(_claim("MetaPatch beats per-user full patches on the tail group",
                          "metapatch − full-patch, tail quintile (group 0)",
                          _claim_stat(users, "metapatch", "full-patch", r,
                                      lambda a: (~a["cold"]) & (a["group"] == 0))))
    if {"dccl", "stale"} <= have:
        out.append(tail_claim("the gain on the tail group is at least the gain on the head group",
                              "(dccl − stale on tail) − (dccl − stale on head); holds if the tail gains (CI above zero) "
                              "and this difference's CI is above zero",
                              tail_minus_head(users, "dccl", "stale", r)))
    if {"dccl", "model-over-data"} <= have:
        # The paper's baselines are cloud models trained on all the data, which model-over-data is here;
        # this reading was added in session 13, after the per-quintile gains were seen: a second view,
        # not a replacement for the row above.
        out.append(tail_claim("the gain on the tail group is at least the gain on the head group (over model-over-data)",
                              "(dccl − model-over-data on tail) − (same on head); holds if the tail gains (CI above "
                              "zero) and this difference's CI is above zero",
                              tail_minus_head(users, "dccl", "model-over-data", r)))
    if {"dccl", "momodistill"} <= have:
        out.append(_claim("the encoder's cold-start φ beats a zero φ",
                          "dccl (encoder φ after step 2) − momodistill (zero φ, same bundle), cold-start users",
                          _claim_stat(users, "dccl", "momodistill", r, lambda a: a["cold"])))
    return out


def _fmt(ms: dict) -> str:
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}"


def _fmt_ci(c: dict) -> str:
    return f"{c['mean']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"


def table_markdown(results: dict, cfg) -> str:
    r = cfg.rounds - 1
    lines = [f"### {results['dataset']}", "",
             f"Round {r + 1} of {cfg.rounds}, {cfg.seeds} seed(s), mean ± std over seeds; warm users unless noted.", "",
             "| strategy | model | AUC | gAUC | HR@10 | NDCG@10 | tail gAUC | head gAUC | cold gAUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, s in results["strategies"].items():
        e = s["rounds"][r]
        lines.append(f"| {key} | {s['kind']} | " + " | ".join(_fmt(e["overall"][m]) for m in TABLE_METRICS)
                     + f" | {_fmt(e['groups']['0']['gauc'])} | {_fmt(e['groups']['4']['gauc'])} | {_fmt(e['cold']['gauc'])} |")
    lines += ["", "Gain (gAUC, NDCG@10) with 95% paired bootstrap CI over users, pooled over seeds:", "",
              "| strategy | vs stale gAUC | vs stale NDCG@10 | vs model-over-data gAUC | vs model-over-data NDCG@10 |",
              "|---|---|---|---|---|"]
    for key, s in results["strategies"].items():
        cells = []
        for base in BASELINES:
            g = s["gain_vs"].get(base)
            cells += [_fmt_ci(g["overall"]["gauc"]), _fmt_ci(g["overall"]["ndcg@10"])] if g else ["—", "—"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Claims of the paper (gAUC, last round; the CI is over users, pooled over seeds; each seed's own "
              "mean difference shows the spread between training runs, which that CI leaves out):", "",
              "| claim | comparison | difference [95% CI] | per seed | held here? |", "|---|---|---|---|---|"]
    for c in results["claims"]:
        diff = _fmt_ci(c) + (f" (the tail's own gain {_fmt_ci(c['tail_gain'])})" if "tail_gain" in c else "")
        seeds = ", ".join(f"{d:+.4f}" for d in c.get("per_seed", []))
        lines.append(f"| {c['claim']} | {c['comparison']} | {diff} | {seeds} | {'yes' if c['holds'] else 'no'} |")
    lines += _choices_markdown(results.get("tuning", {}))
    if results.get("synthetic"):
        lines += ["", "_These numbers are on SYNTHETIC data._"]
    return "\n".join(lines)


def _setting(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
    return f"{value:g}" if isinstance(value, float) else str(value)


def _choices_markdown(tuning: dict) -> list[str]:
    """What tuning chose on the validation slices and each option's mean validation gAUC (results.json's
    `tuning`), so a report shows what its numbers were run with."""
    if not tuning:
        return []
    anew = "momodistill and the update balance" if "cloud.update_balance" in tuning else "momodistill"
    tuned_on = "seed 0 here, every seed its own below" if "per_seed" in tuning else "seed 0"
    lines = ["", f"Choices made on validation slices ({tuned_on}, round 1's slices; upload_device.steps on round 2's; "
             f"{anew} chosen anew on each later round's slices of each seed; one-SE rule), with each option's "
             "validation gAUC:", ""]
    for name, rec in tuning.items():
        if name.endswith("_each_round") or name == "per_seed":
            continue
        if "brackets" in rec:  # a budget per bracket of training positives
            per = "; ".join(f"{lo} positives, {b['devices']} devices: {b['chosen']} ("
                            + ", ".join(f"{k}: {v:.5f}" for k, v in b["val_gauc"].items()) + ")"
                            for lo, b in rec["brackets"].items())
            lines.append(f"- {name}: **{rec['chosen']}** ({per})")
            continue
        options = "; ".join(f"{_setting(json.loads(k)) if str(k).startswith('{') else k}: {v:.5f}"
                            for k, v in rec["val_gauc"].items())
        lines.append(f"- {name}: **{_setting(rec['chosen'])}** ({options})")
    for seed, own in tuning.get("per_seed", {}).items():  # tune_each_seed
        lines.append(f"- seed {seed}, its own round-0 choices: "
                     + "; ".join(f"{name} {_setting(rec['chosen'])}" for name, rec in own.items()))
    for key, who in (("momodistill_each_round", "momodistill"), ("model-over-data_each_round", "model-over-data")):
        for seed, rounds in tuning.get(key, {}).items():
            chosen = "; ".join(f"round {int(r) + 1}: " + ", ".join(_round_choice(c)) for r, c in rounds.items())
            lines.append(f"- {who}, chosen anew (seed {seed}): {chosen}")
    return lines


def _round_choice(c: dict) -> list[str]:
    """One later round's choices (strategies.DCCL / ModelOverData `choices`), as the report lists them."""
    parts = [f"update balance {c['update_balance']['chosen']:g}"] if "update_balance" in c else []
    parts += [_setting(c["chosen"])] if "chosen" in c else []
    parts += [f"step-2 target {c['step2_target']['chosen']}"] if "step2_target" in c else []
    return parts


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "table_md"}, indent=2))
    plots = make_plots(results, out)
    md = results["table_md"] + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    (out / "results.md").write_text(md)


def make_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, s in results["strategies"].items():
        ys = [e["overall"]["gauc"]["mean"] for e in s["rounds"]]
        err = [e["overall"]["gauc"]["std"] for e in s["rounds"]]
        ax.errorbar(range(1, len(ys) + 1), ys, yerr=err, marker="o", capsize=3, label=f"{key} ({s['kind']})")
    ax.set_xlabel("round")
    ax.set_ylabel("gAUC (future window, warm users)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "gauc_per_round.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    keys = [k for k, s in results["strategies"].items() if "model-over-data" in s["gain_vs"]]
    if keys:
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            g = results["strategies"][key]["gain_vs"]["model-over-data"]["groups"]
            means = [g[str(q)]["gauc"]["mean"] for q in range(5)]
            lo = [g[str(q)]["gauc"]["mean"] - g[str(q)]["gauc"]["ci_low"] for q in range(5)]
            hi = [g[str(q)]["gauc"]["ci_high"] - g[str(q)]["gauc"]["mean"] for q in range(5)]
            ax.bar(np.arange(5) + i * width, means, width, yerr=[lo, hi], capsize=2, label=key)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(5) + 0.4 - width / 2, ["tail", "q2", "q3", "q4", "head"])
        ax.set_ylabel("gAUC gain over model-over-data")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / "gain_by_activity_group.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
