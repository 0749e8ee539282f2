"""`dccl cloud train`: train the cloud model (W_f) and the patch generator (Θ, encoder g) on the
pooled cloud history, choose the device step budget, MoMoDistill's λ / kd_extra and the devices'
start policy on the validation slices (as `dccl experiment` does; `--no-tune` keeps the config's values), and write a
self-describing checkpoint for `dccl export` — whose bundle then carries the chosen budget."""

from __future__ import annotations

import argparse
import sys

from cloud_trainer.config import DATASETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default=None, help="dataset (default: synthetic, built in)")
    p.add_argument("--data", default=None, help="dataset path (file or folder); default $DCCL_DATA or ../shared/datasets")
    p.add_argument("--out", required=True, help="checkpoint file to write (e.g. runs/cloud.pt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training (default 0)")
    p.add_argument("--config", default=None, help="JSON config file (the `dccl experiment` config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set cloud.pretrain_epochs=5 (repeatable)")
    p.add_argument("--no-tune", action="store_true",
                   help="keep the config's device step budgets (device.steps, bundle_steps, upload_steps), MoMoDistill settings "
                        "and start policy instead of choosing them on the validation slices (minutes of CPU on "
                        "ML-100K)")


def run(args) -> int:
    from cloud_trainer.checkpoint import save_checkpoint
    from cloud_trainer.context import build_context
    from cloud_trainer.experiment import _parse_set, load_data
    from cloud_trainer.config import build_config

    cfg = build_config({"dataset": args.dataset, "data_path": args.data, **_parse_set(args.set)}, args.config)
    ds = load_data(cfg)
    print(ds.summary(), file=sys.stderr)
    ctx = build_context(ds, cfg, args.seed, tunes=not args.no_tune)
    tuning = {}
    if cfg.tune and not args.no_tune:
        from cloud_trainer.experiment import tune

        cfg.strategies = ["dccl"]       # a deployment tunes what it deploys: the device budget, MoMoDistill
        tuning = tune(ctx, cfg)         # writes the choices into cfg (saved below, read by `dccl export`)
        print(f"tuned on validation slices: device steps {cfg.device.steps} from a {cfg.start.first} φ on this first bundle "
              f"(on a new MoMoDistill bundle: "
              f"{cfg.bundle_device().steps}; uploading from one in later rounds: {cfg.upload_device(1).steps}), "
              f"cloud update balance {cfg.cloud.update_balance:g}, MoMoDistill lam {cfg.momodistill.lam:g} kd_extra {cfg.momodistill.kd_extra} kd_balance "
              f"{cfg.momodistill.kd_balance:g} step-2 balance {cfg.momodistill.step2_balance:g} target "
              f"{cfg.momodistill.step2_target}, starting φ on a new bundle: {cfg.start.warm} "
              f"(cold start: {cfg.start.cold}), meta-training episodes {cfg.meta.episodes}, φ of {cfg.metapatch.phi_dim} floats",
              file=sys.stderr)
    steps = sum(len(v) for v in ctx.history.values())
    path = save_checkpoint(args.out, ctx.model, ctx.encoder, step=steps, round=0,
                           extra={"dataset": ds.name, "synthetic": ds.synthetic, "seed": args.seed,
                                  "config": cfg.to_dict(), "tuning": tuning, "history": ctx.history, "timings": ctx.timings})
    print(f"checkpoint: {path}  (next: dccl export --checkpoint {path} --out DIR)")
    return 0
