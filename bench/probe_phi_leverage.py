"""Why on-device φ training does not help on a dataset: capacity or generalisation? (one seed, round 0)

    .venv/bin/python bench/probe_phi_leverage.py [--dataset ml-100k] [--data PATH]

Builds seed 0's starting point exactly as `dccl experiment` does (pretrained W_f, meta-trained Θ and
encoder), then trains every device's φ (`personalize_all`, no keep-if-worse) and prints the
validation gAUC (overall / tail / head quintile) after 1..40 steps for:

  fresh          the device's own training samples (what a device does)
  fresh, neg 20  the same positives with 20 sampled negatives each instead of 4
  fresh + old    plus the device's last 30 older (cloud-history) interactions
  ORACLE         φ fitted on the *future* window itself, scored on the future window: an upper
                 bound on what a φ of this size can express for a user (a capacity check — never
                 used to choose anything)

If the oracle gains a lot and the honest variants gain nothing, φ has leverage but what a device
learns from its fresh window does not carry over to its next interactions.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context, to_batch
from cloud_trainer.data import build_ctr_samples
from cloud_trainer.evaluate import score_eval_set, summarize
from cloud_trainer.experiment import load_data
from cloud_trainer.personalize import DeviceTrainConfig, personalize_all
from cloud_trainer.strategies import blind_start_phi, cloud_scorer, device_scorer, start_phi
from cloud_trainer.train import concat

GRID = (1, 2, 3, 5, 8, 12, 20, 40)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--lr", type=float, default=0.1, help="device AdamW rate (default: the deployed 0.1)")
    a = p.parse_args()
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2})
    ds = load_data(cfg)
    ctx = build_context(ds, cfg, 0)
    rd, w, d = ctx.rounds[0], ctx.split.round(0), cfg.data

    def gauc(ev, scorer) -> str:
        s = summarize(ev, score_eval_set(ev, scorer))
        return f"{s['overall']['gauc']:.4f} ({s['groups']['0']['gauc']:.4f} / {s['groups']['4']['gauc']:.4f})"

    zero = torch.zeros(ctx.n_users, ctx.model.phi_dim)
    # Scored on the validation slices: the encoder reads the history before them; on the future window,
    # the whole history a device holds by then.
    phi0_val, phi0 = blind_start_phi(ctx.encoder, ctx, 0, zero), start_phi(ctx.encoder, ctx, 0, zero)
    print(ds.summary())
    print(f"validation gAUC (tail / head): cloud model {gauc(rd.val_eval, cloud_scorer(ctx.model, ds.profile))}, "
          f"encoder φ {gauc(rd.val_eval, device_scorer(ctx.model, ds.profile, phi0_val))}")

    def sweep(name: str, train, ev) -> None:
        snaps: dict[int, torch.Tensor] = {}
        run = DeviceTrainConfig(steps=max(GRID), lr=a.lr, keep_if_worse=False, require_val=False)
        personalize_all(ctx.model, phi0 if ev is rd.future else phi0_val, train, None, run,
                        on_step=lambda s, phi: snaps.__setitem__(s, phi.clone()) if s in GRID else None)
        print(f"\n{name}:")
        for s in GRID:
            print(f"  {s:3d} steps  {gauc(ev, device_scorer(ctx.model, ds.profile, snaps[s]))}", flush=True)

    def ctr(window, which: str, neg: int, seed: int):
        return to_batch(build_ctr_samples(ds, window, which, neg=neg, max_len=d.max_len, seed=seed), ds.profile)

    sweep("fresh (validation gAUC)", rd.fresh_train, rd.val_eval)
    sweep("fresh, neg 20 (validation gAUC)", ctr(w, "fresh_train", 20, 5), rd.val_eval)
    c = w.cloud
    older = replace(w, cloud=np.stack([np.maximum(c[:, 0], c[:, 1] - 30), c[:, 1]], 1))
    with_older = concat([rd.fresh_train, ctr(older, "cloud", d.neg, 6)])
    sweep("fresh + last 30 older interactions (validation gAUC)", with_older, rd.val_eval)
    print(f"\nfuture window, encoder φ: {gauc(rd.future, device_scorer(ctx.model, ds.profile, phi0))}")
    sweep("ORACLE: φ fitted on the future window (future gAUC; capacity only)", ctr(w, "future", d.neg, 99), rd.future)


if __name__ == "__main__":
    main()
