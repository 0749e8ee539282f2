"""Would devices gain on a new MoMoDistill bundle with a smaller step size? (seed 0, validation only)

    .venv/bin/python bench/probe_bundle_lr.py [--dataset amazon] [--data PATH] [--lr 0.1 0.03 0.01 0.003]

Makes round 0's choices as `dccl experiment` does (device budget, MoMoDistill, step 2, start policy;
teachers blind to the validation slices), then, on the replayed round-0 bundle from the chosen starting
φ, prints the validation gAUC of each device step budget (`tune_steps`) at each learning rate — what
`experiment.tune_bundle_steps` scores at `device.lr` alone. A diagnosis: nothing is chosen here.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.experiment import load_data, tune_momodistill, tune_start, tune_step2
from cloud_trainer.patch_generator import encode_phi
from cloud_trainer.strategies import blind_uploads, start_phi, tune_device_steps, validation_gauc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="amazon")
    p.add_argument("--data", default=None)
    p.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.003])
    a = p.parse_args()
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2})
    ctx = build_context(load_data(cfg), cfg, 0)
    evaluate_val = validation_gauc(ctx, 0)
    phi0 = start_phi(ctx.encoder, ctx, 0, torch.zeros(ctx.n_users, ctx.model.phi_dim))
    cfg.device.steps, _ = tune_device_steps(ctx, ctx.model, phi0, cfg.device, cfg.tune_steps, evaluate_val)
    uploaded = blind_uploads(ctx.model, phi0, ctx.rounds[0], cfg.device)
    _, replayed = tune_momodistill(ctx, cfg, uploaded)
    bundle, _ = tune_step2(ctx, cfg, uploaded, replayed)
    start = tune_start(ctx, cfg, bundle, uploaded, evaluate_val)["chosen"]
    print(f"device.steps {cfg.device.steps}, start policy {start}", flush=True)
    model, encoder = bundle
    phi = encode_phi(encoder, ctx.profile, ctx.rounds[0].val_seq, uploaded)
    for lr in a.lr:
        best, scores = tune_device_steps(ctx, model, phi, replace(cfg.bundle_device(), lr=lr), cfg.tune_steps,
                                         evaluate_val)
        print(f"lr {lr:g}: one-SE choice {best} steps; "
              + ", ".join(f"{s}: {np.nanmean(v):.5f}" for s, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
