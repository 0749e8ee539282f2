"""What a device budget by training positives costs the cloud's batched reference (`personalize_all`).

    .venv/bin/python bench/bench_budget_by_positives.py [--data PATH] [--table '[[0,20],[4,0],[7,2],[14,3],[25,2]]']

On seed 0's round-0 fresh windows of ML-100K (the samples the experiment's devices train on), times
`personalize_all` with the table (`DeviceTrainConfig.steps_by_positives`) against the same call with
one budget for every device equal to the table's largest — what the table cost before only the devices
within their budget computed a loss — and against the table's most common budget for everyone. Prints
the median of `--repeats` runs of each and the ratios. The default table is the one validation chose in
session 15 (a small bracket with 20 steps, the rest 0–3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import torch

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.experiment import load_data
from cloud_trainer.personalize import DeviceTrainConfig, personalize_all
from dccl.protocol.manifest import check_steps_by_positives, step_budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="MovieLens-100K folder (default: DCCL_DATA)")
    p.add_argument("--table", default="[[0,20],[4,0],[7,2],[14,3],[25,2]]")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    table = check_steps_by_positives(json.loads(a.table), "--table")
    cfg = build_config({"dataset": "ml-100k", "data_path": a.data, "rounds": 2})
    ctx = build_context(load_data(cfg), cfg, 0)
    rd = ctx.rounds[0]
    phi0 = torch.zeros(ctx.n_users, ctx.model.phi_dim)
    positives = np.bincount(rd.fresh_train["owner"].numpy()[rd.fresh_train["label"].numpy() > 0],
                            minlength=ctx.n_users)
    budgets = np.asarray(step_budget(0, table, positives))
    common = int(np.bincount(budgets).argmax())
    base = DeviceTrainConfig(lr=cfg.device.lr, keep_if_worse=False, require_val=False)
    runs = {"table": replace(base, steps_by_positives=table),
            f"everyone {max(budgets)} steps": replace(base, steps=int(max(budgets))),
            f"everyone {common} steps": replace(base, steps=common)}
    print(f"{len(rd.fresh_train['owner'])} samples, {ctx.n_users} devices; devices per budget: "
          f"{ {int(b): int(n) for b, n in zip(*np.unique(budgets, return_counts=True))} }")
    times = {}
    for name, run in runs.items():
        t = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            personalize_all(ctx.model, phi0, rd.fresh_train, None, run)
            t.append(time.perf_counter() - t0)
        times[name] = statistics.median(t)
    ref = times["table"]
    for name, sec in times.items():
        print(f"{name:20s} {sec:7.3f} s   table / this {ref / sec:5.2f}x")


if __name__ == "__main__":
    main()
