"""Devices without a validation slice: would scoring them on their whole fresh window change a choice?
(one seed, no training)

    .venv/bin/python bench/probe_unsliced.py [--dataset amazon] [--data PATH] [--seed 0]

A device whose fresh window holds one positive gets no validation slice (`manifest.val_len` keeps it
for training), so choices made on the slices speak for the more active devices only — on Amazon
Beauty 7,486 of 20,127 warm devices. For the start policy on the stale model no device trains, so
the whole fresh window of *every* device is data the model has not seen and precedes the future
window: honest validation for the devices the slices leave out. This prints the encoder's φ against
a zero φ (the cloud model itself), paired per-user gAUC with a 95 % bootstrap CI, for all warm
devices / those with a slice / those without / the tail quintile, scored on

  val slices        what `experiment.tune` sees (the encoder reads the history before the slice)
  whole fresh       every device's fresh window (the encoder reads the history before it)
  future r0 / r1    round 0's and round 1's future windows (reference only: never used to choose);
                    on r1 with round 0's φ (a device on the bundle it holds) and with round 1's

If "whole fresh" on the unsliced devices agrees with their future windows where the slices do not,
validation should add them; if it agrees with the slices, the slices were not what misled.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context, sequence_at
from cloud_trainer.data.samples import build_eval_set
from cloud_trainer.evaluate import paired_ci, per_user, score_eval_set
from cloud_trainer.experiment import load_data
from cloud_trainer.strategies import device_scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="amazon")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2})
    ds = load_data(cfg)
    ctx = build_context(ds, cfg, a.seed)
    w0, w1, d = ctx.split.round(0), ctx.split.round(1), cfg.data
    zero = torch.zeros(ctx.n_users, ctx.model.phi_dim)
    has_slice = w0.val[:, 1] > w0.val[:, 0]
    print(ds.summary())

    def compare(label: str, w, which: str, seq_start: np.ndarray) -> None:
        ev = build_eval_set(ds, w, which, n_neg=d.eval_negatives, max_len=d.max_len, seed=a.seed + 11)
        with torch.no_grad():  # the raw g with no previous φ: what a device starts from on round 0
            g = ctx.encoder(ctx.profile, sequence_at(ds, seq_start, d.max_len), zero)
        pz = per_user(ev, score_eval_set(ev, device_scorer(ctx.model, ds.profile, zero)))
        pg = per_user(ev, score_eval_set(ev, device_scorer(ctx.model, ds.profile, g)))
        u, warm = pz["user"], ~pz["cold"]
        subsets = {"all warm": warm, "with a slice": warm & has_slice[u], "without a slice": warm & ~has_slice[u],
                   "tail quintile": warm & (pz["group"] == 0)}
        for name, m in subsets.items():
            diff = (pg["gauc"] - pz["gauc"])[m]
            diff = diff[np.isfinite(diff)]
            if not len(diff):
                continue
            ci = paired_ci(diff)
            print(f"{label:26s} {name:16s} {len(diff):6d} devices  encoder − zero {ci['mean']:+.5f} "
                  f"[{ci['ci_low']:+.5f}, {ci['ci_high']:+.5f}]", flush=True)

    compare("val slices", w0, "val", w0.val[:, 0])
    compare("whole fresh", w0, "fresh", w0.fresh[:, 0])
    compare("future r0 (reference)", w0, "future", w0.future[:, 0])
    compare("future r1, r0's φ (ref.)", w1, "future", w0.future[:, 0])
    compare("future r1, r1's φ (ref.)", w1, "future", w1.future[:, 0])


if __name__ == "__main__":
    main()
