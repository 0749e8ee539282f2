"""Where does MoMoDistill's step-1 gain come from: the device models, or distillation itself? (round 0)

    .venv/bin/python bench/probe_teachers.py [--dataset ml-100k] [--data PATH] [--seeds 2] [--kd-balance 0 1]

Builds seed 0's starting point exactly as `dccl experiment` does, lets every device personalise φ on
its fresh window minus its validation slice (as the tuning does), then replays MoMoDistill step 1 on a
copy of the cloud model on those fresh windows with different teachers, and prints the cloud model's
validation gAUC (overall / tail / head quintile), mean over `--seeds` step-1 seeds:

  no distillation       λ = 0: the labels only (what model-over-data learns from the same rows)
  device models         each row's teacher is its owner's uploaded φ on the bundle (MoMoDistill)
  shuffled devices      each user is taught by another user's φ: device knowledge, not *its* user's
  bundle (φ = 0)        the bundle's own cloud model: self-distillation, no device knowledge at all

If "bundle (φ = 0)" scores like "device models", the gain is distillation itself (the old model's
knowledge and, with candidates, extra items it labels), not what devices learned. ``--kd-balance``
repeats every distilling row with each device-balance weighting (MoMoDistillConfig.kd_balance), and
``--update-balance`` repeats every row with each weighting of the label term (CloudConfig.update_balance:
1 gives every device's fresh data the same weight in W_f).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import score_eval_set, summarize
from cloud_trainer.experiment import load_data
from cloud_trainer.momodistill import step1
from cloud_trainer.strategies import blind_start_phi, blind_uploads, cloud_scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--kd-extra", type=int, nargs="+", default=[0, 1])
    p.add_argument("--kd-balance", type=float, nargs="+", default=[0.0])
    p.add_argument("--update-balance", type=float, nargs="+", default=[0.0])
    a = p.parse_args()
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2})
    ds = load_data(cfg)
    ctx = build_context(ds, cfg, 0)
    rd = ctx.rounds[0]
    # The teachers the experiment's choices use: blind to the validation slices (labels and items).
    phi0 = blind_start_phi(ctx.encoder, ctx, 0, torch.zeros(ctx.n_users, ctx.model.phi_dim))
    uploaded = blind_uploads(ctx.model, phi0, rd, cfg.device)
    perm = torch.randperm(ctx.n_users, generator=torch.Generator().manual_seed(0))
    teachers = {"device models": uploaded, "shuffled devices": uploaded[perm],
                "bundle (φ = 0)": torch.zeros_like(uploaded)}

    def val(model) -> np.ndarray:
        s = summarize(rd.val_eval, score_eval_set(rd.val_eval, cloud_scorer(model, ds.profile)))
        return np.array([s["overall"]["gauc"], s["groups"]["0"]["gauc"], s["groups"]["4"]["gauc"]])

    def replay(phi, lam: float, kd: int, balance: float = 0.0, ce: float = 0.0) -> str:
        runs = []
        for s in range(a.seeds):
            model = copy.deepcopy(ctx.model)
            step1(model, rd.fresh_train, phi, replace(cfg.momodistill, lam=lam, kd_extra=kd, kd_balance=balance),
                  ds.n_items, seed=s, label_balance=ce)
            runs.append(val(model))
        m = np.mean(runs, axis=0)
        return f"{m[0]:.4f} ({m[1]:.4f} / {m[2]:.4f})"

    print(ds.summary())
    print(f"validation gAUC (tail / head), mean of {a.seeds} step-1 seeds; the bundle itself: "
          f"{'{:.4f} ({:.4f} / {:.4f})'.format(*val(ctx.model))}")
    for ce in a.update_balance:
        tag = f", update_balance {ce:g}" if ce else ""
        print(f"  {'no distillation (λ = 0)' + tag:42s} {replay(uploaded, 0.0, 0, ce=ce)}", flush=True)
        for kd in a.kd_extra:
            for b in a.kd_balance:
                for name, phi in teachers.items():
                    label = name + f", kd_extra {kd}" + (f", kd_balance {b:g}" if b else "") + tag
                    print(f"  {label:42s} {replay(phi, 1.0, kd, b, ce)}", flush=True)


if __name__ == "__main__":
    main()
