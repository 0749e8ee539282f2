"""MoMoDistill step-1 epoch vs a plain cloud epoch on the same data (goal: <= 1.5x), from one run.

    .venv/bin/python bench/bench_momodistill.py [--dataset ml-100k] [--repeats 3] [--kd-extra 0 1 2] [--kd-balance 0 1]

Both sides train the same copy of the pretrained-size model on the same pooled fresh window of round 0,
for MoMoDistill's configured number of step-1 epochs. The MoMoDistill side includes scoring the device
models (the teachers) on the logged rows and on every epoch's unlabelled candidates (kd_extra per
positive per epoch): the whole of step 1 as a cloud round pays it, divided by its epochs.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from cloud_trainer.checkpoint import build_model
from cloud_trainer.context import to_batch
from cloud_trainer.data import build_ctr_samples, load_dataset, make_split, make_synthetic
from cloud_trainer.models.din import DINConfig
from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.momodistill import MoMoDistillConfig, step1
from cloud_trainer.train import fit_cloud, reproducible


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kd-extra", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kd-balance", type=float, nargs="+", default=[0.0],
                   help="device balance of the distillation term (each value with each kd_extra)")
    a = p.parse_args()
    reproducible()  # deterministic algorithms, as every cloud training path runs (context.build_context)
    torch.manual_seed(0)
    ds = make_synthetic() if a.dataset == "synthetic" else load_dataset(a.dataset, a.data)
    w = make_split(ds, rounds=2).round(0)
    data = to_batch(build_ctr_samples(ds, w, "fresh", neg=4, max_len=20, seed=1), ds.profile)
    cfg = DINConfig(n_items=ds.n_items, n_attrs=ds.n_attrs, profile_vocab=list(ds.profile_vocab))
    model = build_model(cfg, MetaPatchConfig(phi_dim=64), torch.from_numpy(np.asarray(ds.item_attrs)))
    phi = torch.randn(ds.n_users, 64) * 0.5
    epochs = MoMoDistillConfig().step1_epochs
    settings = [(k, b) for k in a.kd_extra for b in a.kd_balance]
    plain, momo = [], {s: [] for s in settings}
    for r in range(a.repeats):  # interleaved, so load drift hits every side alike
        m = copy.deepcopy(model)
        t = time.perf_counter()
        fit_cloud(m, data, list(m.cloud_parameters().values()), epochs, 1e-3, 512, seed=r)
        plain.append((time.perf_counter() - t) / epochs)
        for k, b in settings:
            m = copy.deepcopy(model)
            t = time.perf_counter()
            step1(m, data, phi, MoMoDistillConfig(step1_epochs=epochs, lam=1.0, kd_extra=k, kd_balance=b), ds.n_items,
                  seed=r)
            momo[(k, b)].append((time.perf_counter() - t) / epochs)
    pm = float(np.median(plain))
    print(f"dataset {ds.name}: {len(data['item'])} fresh samples, {epochs} epochs, {torch.get_num_threads()} threads, "
          f"median of {a.repeats}")
    print(f"plain cloud epoch                 {pm:7.2f} s   1.00x")
    for (k, b), times in momo.items():
        mm = float(np.median(times))
        verdict = "met" if mm / pm <= 1.5 else "MISSED"
        print(f"MoMoDistill step-1, kd_extra {k}, kd_balance {b:g}    {mm:7.2f} s   {mm / pm:.2f}x  "
              f"(goal <= 1.5x: {verdict})")


if __name__ == "__main__":
    main()
