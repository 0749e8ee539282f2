"""Would devices gain on a new MoMoDistill bundle with a smaller step size? (seed 0, validation only)

    .venv/bin/python bench/probe_bundle_lr.py [--dataset amazon] [--data PATH] [--lr 0.1 0.03 0.01 0.003]

Makes round 0's choices exactly as `dccl experiment` does (`experiment.tune`, DCCL only), keeps the
replayed round-0 bundle `tune_bundle_steps` is handed, and prints, from the chosen starting φ on it, the
validation gAUC of each device step budget (`tune_steps`) at each learning rate — what
`tune_bundle_steps` scores at `device.lr` alone. A diagnosis: nothing is chosen here.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from cloud_trainer import experiment
from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.patch_generator import encode_phi
from cloud_trainer.strategies import tune_device_steps, validation_gauc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="amazon")
    p.add_argument("--data", default=None)
    p.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.003])
    a = p.parse_args()
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2, "strategies": ["dccl"]})
    ctx = build_context(experiment.load_data(cfg), cfg, 0)

    seen = {}
    real = experiment.tune_bundle_steps

    def capture(ctx, cfg, bundle, uploaded, evaluate_val):
        seen.update(bundle=bundle, uploaded=uploaded)
        return real(ctx, cfg, bundle, uploaded, evaluate_val)

    experiment.tune_bundle_steps = capture
    choices = experiment.tune(ctx, cfg)
    print(f"device.steps {cfg.device.steps}, start policy {choices['start']['chosen']}", flush=True)
    model, encoder = seen["bundle"]
    phi = encode_phi(encoder, ctx.profile, ctx.rounds[0].val_seq, seen["uploaded"])
    for lr in a.lr:
        best, scores = tune_device_steps(ctx, model, phi, replace(cfg.bundle_device(), lr=lr), cfg.tune_steps,
                                         validation_gauc(ctx, 0))
        print(f"lr {lr:g}: one-SE choice {best} steps; "
              + ", ".join(f"{s}: {np.nanmean(v):.5f}" for s, v in scores.items()), flush=True)


if __name__ == "__main__":
    main()
