"""Does meta-training Θ on device-sized episodes give φ leverage where a device needs it? (one seed, round 0)

    .venv/bin/python bench/probe_meta_episodes.py [--dataset ml-100k] [--data PATH] [--seed 0]
        [--episodes sampled device]

Θ and the encoder are meta-trained on episodes cut from each user's cloud history (`meta_train`):
"sampled" (the default) adapts φ on up to 50 rows drawn from the whole older history; "device" adapts
it on the user's *newest* older rows, as many positives as a device's fresh window holds (drawn from
the fleet's round-0 counts) — the support a device really has, right before the interactions it is
scored on. For each, this builds seed S's starting point as `dccl experiment` does and prints:

  validation   the devices' step budget as `tune` scores it (round 0's slices, devices trained on the
               fresh windows minus the slices from the encoder's φ blind to them): gAUC overall
               (tail / head quintile) per budget, and the budget the one-SE rule picks
  future       reference only, never used to choose: MetaPatch devices as deployed in round 0 (that
               budget on the whole fresh window minus its newest 30 %, keep-if-worse) minus the
               cloud model (φ = 0), on round 0's future window, warm users, with a 95 % bootstrap CI
               over users — overall and on the tail quintile (the MetaPatch-vs-full-patch claim's
               group, where full patches choose 0 steps)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import choose_within_noise, paired_ci, per_user, score_eval_set
from cloud_trainer.experiment import load_data
from cloud_trainer.personalize import personalize_all
from cloud_trainer.strategies import (blind_start_phi, cloud_scorer, device_scorer, start_phi, tune_device_steps,
                                      validation_gauc)

GRID = [0, 1, 2, 3, 5, 8, 12, 20]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", nargs="+", default=["sampled", "device"], choices=["sampled", "device"])
    a = p.parse_args()
    for episodes in a.episodes:
        t0 = time.perf_counter()
        cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2, "meta": {"episodes": episodes}})
        ds = load_data(cfg)
        ctx = build_context(ds, cfg, a.seed)
        rd, U = ctx.rounds[0], ctx.n_users
        zero = torch.zeros(U, ctx.model.phi_dim)
        users_val = per_user(rd.val_eval, score_eval_set(rd.val_eval, cloud_scorer(ctx.model, ds.profile)))
        tail_v, head_v = users_val["group"] == 0, users_val["group"] == 4
        best, scores = tune_device_steps(ctx, ctx.model, blind_start_phi(ctx.encoder, ctx, 0, zero), cfg.device,
                                         GRID, validation_gauc(ctx, 0))
        print(f"episodes={episodes} (meta-train {ctx.timings['meta_train']:.0f} s; "
              f"query loss per epoch {', '.join(f'{x:.4f}' for x in ctx.history['meta_train'])})")
        print("  validation gAUC overall (tail / head) by device steps:")
        for s, v in scores.items():
            print(f"    {s:>2} steps {np.nanmean(v):.5f} ({np.nanmean(v[tail_v]):.5f} / {np.nanmean(v[head_v]):.5f})")
        tail_best = choose_within_noise({s: v[tail_v] for s, v in scores.items()})
        print(f"  chosen (one-SE rule): {best} steps; on the tail quintile's slices alone: {tail_best}")

        cfg.device.steps = best
        phi, _ = personalize_all(ctx.model, start_phi(ctx.encoder, ctx, 0, zero), rd.fresh_train, rd.val, cfg.device)
        fut = {k: per_user(rd.future, score_eval_set(rd.future, sc)) for k, sc in
               (("cloud", cloud_scorer(ctx.model, ds.profile)), ("devices", device_scorer(ctx.model, ds.profile, phi)))}
        warm = ~fut["cloud"]["cold"]
        d = fut["devices"]["gauc"] - fut["cloud"]["gauc"]
        for name, sel in (("warm", warm), ("tail", warm & (fut["cloud"]["group"] == 0)),
                          ("head", warm & (fut["cloud"]["group"] == 4))):
            ci = paired_ci(d[sel])
            print(f"  future, devices − cloud model, {name}: {ci['mean']:+.4f} [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]"
                  f"  (cloud {np.nanmean(fut['cloud']['gauc'][sel]):.4f})")
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
