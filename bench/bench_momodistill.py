"""MoMoDistill step-1 epoch vs a plain cloud epoch on the same data (goal: <= 1.5x), from one run.

    .venv/bin/python bench/bench_momodistill.py [--dataset ml-100k] [--repeats 3]

Both sides train the same copy of the pretrained-size model on the same pooled fresh window of round 0.
The MoMoDistill side includes computing the device models' logits (the teachers) once per epoch, which
is what a cloud round pays; with --kd-extra N it also distils on N unlabelled candidates per positive.
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
from cloud_trainer.momodistill import MoMoDistillConfig, device_logits, step1, with_candidates
from cloud_trainer.train import fit_cloud


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kd-extra", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(0)
    ds = make_synthetic() if a.dataset == "synthetic" else load_dataset(a.dataset, a.data)
    w = make_split(ds, rounds=2).round(0)
    data = to_batch(build_ctr_samples(ds, w, "fresh", neg=4, max_len=20, seed=1), ds.profile)
    cfg = DINConfig(n_items=ds.n_items, n_attrs=ds.n_attrs, profile_vocab=list(ds.profile_vocab))
    model = build_model(cfg, MetaPatchConfig(phi_dim=64), torch.from_numpy(np.asarray(ds.item_attrs)))
    phi = torch.randn(ds.n_users, 64) * 0.5
    m_cfg = MoMoDistillConfig(step1_epochs=1, lam=1.0, kd_extra=a.kd_extra)
    plain, momo = [], []
    for r in range(a.repeats):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        fit_cloud(m, data, list(m.cloud_parameters().values()), 1, 1e-3, 512, seed=r)
        plain.append(time.perf_counter() - t)
        m = copy.deepcopy(model)
        t = time.perf_counter()
        d, hard = with_candidates(data, ds.n_items, m_cfg.kd_extra, seed=r)
        step1(m, d, device_logits(m, d, phi), m_cfg, seed=r, hard_mask=hard)
        momo.append(time.perf_counter() - t)
    pm, mm = float(np.median(plain)), float(np.median(momo))
    print(f"dataset {ds.name}: {len(data['item'])} fresh samples, {torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"plain cloud epoch      {pm:7.2f} s   1.00x")
    print(f"MoMoDistill step-1     {mm:7.2f} s   {mm / pm:.2f}x  (teacher logits + epoch; kd_extra={a.kd_extra}; goal <= 1.5x)")


if __name__ == "__main__":
    main()
