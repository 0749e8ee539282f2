"""How the patch generator is built and meta-trained, judged by what devices gain (one seed, round 0)

    .venv/bin/python bench/probe_patch_generator.py [--dataset ml-100k] [--data PATH] [--seed 0]
        [--variant NAME=JSON ...]

Each variant is a config override (as `dccl experiment --set` takes them, as one JSON object) of the
patch generator: where the patches sit (`metapatch.target_modules`), the size of φ
(`metapatch.phi_dim`), each patch's rank (`metapatch.bottleneck`), how Θ and the encoder are
meta-trained (`meta.*`, e.g. `meta.episodes`: "sampled" adapts φ on up to 50 rows drawn from the whole
older history, "device" on the user's newest rows, as many positives as a device's fresh window
holds). One key is the probe's own, not a config field: `"sgd_lr": LR` trains φ with plain SGD at
that rate instead of AdamW, on devices and in meta-training's inner loop (the deployment's devices
run AdamW, whose first steps move every coordinate of φ by about the rate whatever its gradient;
SGD moves each in proportion to the evidence). W_f does not depend on any of them (pretraining and the catch-up skip the patches and draw
from their own generators; the probe prints a checksum of W_f to show it), so the variants differ in
Θ and g alone. For each, this builds seed S's starting point as `dccl experiment` does and prints:

  validation   the devices' step budget as `tune` scores it (round 0's slices, devices trained on the
               fresh windows minus the slices from the encoder's φ blind to them): gAUC overall
               (tail / head quintile) per budget, and the budget the one-SE rule picks; then each
               variant's best budget against the first variant's (paired over users, ± one SE)
  future       reference only, never used to choose: MetaPatch devices as deployed in round 0 (that
               budget on the whole fresh window minus its newest 30 %, keep-if-worse) minus the
               cloud model (φ = 0), on round 0's future window, warm users, with a 95 % bootstrap CI
               over users — overall and on the tail quintile (the MetaPatch-vs-full-patch claim's
               group, where full patches choose 0 steps)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import time

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import choose_within_noise, paired_ci, paired_difference, per_user, score_eval_set
from cloud_trainer.experiment import load_data
from cloud_trainer.personalize import personalize_all
from cloud_trainer.strategies import (blind_start_phi, cloud_scorer, device_scorer, start_phi, tune_device_steps,
                                      validation_gauc)
from dccl.errors import DcclError

VARIANTS = [
    "default={}",
    'attention={"metapatch": {"target_modules": ["attention.key", "mlp.0", "mlp.2"]}}',
    'phi16={"metapatch": {"phi_dim": 16}}',
    'rank8={"metapatch": {"bottleneck": 8}}',
]


def variant(text: str) -> tuple[str, dict]:
    name, sep, body = text.partition("=")
    try:
        override = json.loads(body)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: the part after '=' is not JSON ({e})")
    if not sep or not name or not isinstance(override, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=JSON-object")
    return name, override


def merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def mean(v: np.ndarray) -> str:
    """Mean over users with a score; "—" for a group without validation slices (Amazon's tail)."""
    v = v[~np.isnan(v)]
    return f"{v.mean():.5f}" if len(v) else "—"


def checksum(model) -> str:
    h = hashlib.sha256()
    for p in model.cloud_parameters().values():  # values only: a patched layer's names gain ".base_layer"
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:12]


@contextlib.contextmanager
def phi_optimizer(sgd_lr: float | None):
    """AdamW trains only φ here (devices, and meta-training's inner loop; the cloud runs Adam), so
    swapping the class swaps φ's optimizer and nothing else."""
    if sgd_lr is None:
        yield
        return
    adamw = torch.optim.AdamW
    torch.optim.AdamW = lambda params, lr=None, **kw: torch.optim.SGD(params, lr=sgd_lr)
    try:
        yield
    finally:
        torch.optim.AdamW = adamw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="device step budgets to score (default: the experiment's tune_steps)")
    p.add_argument("--variant", action="append", type=variant,
                   help="NAME=JSON config override, repeatable (default: " + "; ".join(VARIANTS) + ")")
    a = p.parse_args()
    variants = a.variant or [variant(v) for v in VARIANTS]
    if len({name for name, _ in variants}) < len(variants):
        p.error("--variant: two variants share a name")
    base = {"dataset": a.dataset, "data_path": a.data, "rounds": 2}
    ds = load_data(build_config(base))
    configs = []  # every variant's config checked before any runs
    for name, override in variants:
        override = dict(override)
        sgd_lr = override.pop("sgd_lr", None)
        if sgd_lr is not None and not (isinstance(sgd_lr, (int, float)) and sgd_lr > 0):
            p.error(f"--variant {name}: sgd_lr = {sgd_lr!r}: must be a number > 0")
        try:
            configs.append((name, override, sgd_lr, build_config(merged(base, override))))
        except (ValueError, DcclError) as e:
            p.error(f"--variant {name}: {e}")
    best_scores: dict[str, np.ndarray] = {}
    for name, override, sgd_lr, cfg in configs:
        print(f"{name} {json.dumps(override)}" + (f", φ trained with SGD at lr {sgd_lr:g}" if sgd_lr else ""))
        with phi_optimizer(sgd_lr):
            best_scores[name] = run_variant(ds, cfg, a.seed, a.steps or cfg.tune_steps)
        if len(best_scores) > 1:
            first = next(iter(best_scores))
            d = paired_difference(best_scores[name], best_scores[first])
            print(f"  best budget − {first}'s: {d['mean']:+.5f} ± {d['se']:.5f} (one SE)")
    if len(best_scores) > 1:
        print(f"chosen among the variants (one-SE rule, the first listed preferred, as tune_meta_episodes "
              f"chooses): {choose_within_noise(best_scores)}")


def run_variant(ds, cfg, seed: int, steps: list[int]) -> np.ndarray:
    """Print one variant's validation and future numbers; return its devices' per-user validation
    gAUC at the budget the one-SE rule picks."""
    t0 = time.perf_counter()
    ctx = build_context(ds, cfg, seed)
    rd, U = ctx.rounds[0], ctx.n_users
    zero = torch.zeros(U, ctx.model.phi_dim)
    users_val = per_user(rd.val_eval, score_eval_set(rd.val_eval, cloud_scorer(ctx.model, ds.profile)))
    tail_v, head_v = users_val["group"] == 0, users_val["group"] == 4
    best, scores = tune_device_steps(ctx, ctx.model, blind_start_phi(ctx.encoder, ctx, 0, zero), cfg.device,
                                     steps, validation_gauc(ctx, 0))
    print(f"  W_f {checksum(ctx.model)}; meta-train {ctx.timings['meta_train']:.0f} s; "
          f"query loss per epoch {', '.join(f'{x:.4f}' for x in ctx.history['meta_train'])}")
    print("  validation gAUC overall (tail / head) by device steps:")
    for s, v in scores.items():
        print(f"    {s:>2} steps {mean(v)} ({mean(v[tail_v])} / {mean(v[head_v])})")
    tail_has = bool((~np.isnan(scores[best][tail_v])).any())
    tail_best = choose_within_noise({s: v[tail_v] for s, v in scores.items()}) if tail_has else "— (no slices)"
    print(f"  chosen (one-SE rule): {best} steps; on the tail quintile's slices alone: {tail_best}")

    cfg.device.steps = best
    phi, _ = personalize_all(ctx.model, start_phi(ctx.encoder, ctx, 0, zero), rd.fresh_train, rd.val, cfg.device)
    fut = {k: per_user(rd.future, score_eval_set(rd.future, sc)) for k, sc in
           (("cloud", cloud_scorer(ctx.model, ds.profile)), ("devices", device_scorer(ctx.model, ds.profile, phi)))}
    warm = ~fut["cloud"]["cold"]
    d = fut["devices"]["gauc"] - fut["cloud"]["gauc"]
    for group, sel in (("warm", warm), ("tail", warm & (fut["cloud"]["group"] == 0)),
                       ("head", warm & (fut["cloud"]["group"] == 4))):
        ci = paired_ci(d[sel])
        print(f"  future, devices − cloud model, {group}: {ci['mean']:+.4f} [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]"
              f"  (cloud {np.nanmean(fut['cloud']['gauc'][sel]):.4f})")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return scores[best]


if __name__ == "__main__":
    main()
