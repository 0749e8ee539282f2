"""Does the validation slice judge the cloud update's device balance as the future window does? (one seed)

    .venv/bin/python bench/probe_update_balance.py [--dataset ml-100k] [--data PATH] [--seed 0]

`cloud.update_balance` weighs each fresh row of the cloud update by rows_of_its_device^(-balance)
(1: every device's fresh data counts the same). `tune_update_balance` chooses it on round 0's
validation slices: model-over-data's update replayed on the fresh windows minus the slices, scored on
the slices. This prints, for each balance, the user-averaged gAUC (overall / tail / head quintile)
and the paired difference from balance 0 with a 95 % bootstrap CI over users, of

  val slices          the tuning's replay (fresh windows minus the slices), scored on the slices
  future (replay)     the same model on round 0's future window (reference only: never used to choose)
  future (deployed)   the update as a round runs it (whole fresh windows), on round 0's future window

If the slices reward a balance that the future window does not, the gap is not the slices' rows
missing from training (compare the two future rows) but what the slices are: each device's newest
fresh interactions, right after the rows the update has just weighted up.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import paired_ci, per_user, score_eval_set
from cloud_trainer.experiment import load_data
from cloud_trainer.strategies import cloud_scorer
from cloud_trainer.train import fit_cloud


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balance", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    a = p.parse_args()
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": 2})
    ds = load_data(cfg)
    ctx = build_context(ds, cfg, a.seed)
    rd, c = ctx.rounds[0], cfg.cloud
    print(ds.summary())

    def score(model, ev) -> dict:
        u = per_user(ev, score_eval_set(ev, cloud_scorer(model, ds.profile)))
        return {"gauc": u["gauc"], "group": u["group"], "warm": ~u["cold"]}

    rows = {}
    for b in a.balance:
        replay, deployed = copy.deepcopy(ctx.model), copy.deepcopy(ctx.model)
        for model, data in ((replay, rd.fresh_train), (deployed, rd.fresh)):
            fit_cloud(model, data, list(model.cloud_parameters().values()), c.update_epochs, c.lr, c.batch_size,
                      seed=a.seed, balance=b)
        rows[b] = {"val slices": score(replay, rd.val_eval), "future (replay)": score(replay, rd.future),
                   "future (deployed)": score(deployed, rd.future)}
    base = a.balance[0]
    print(f"gAUC overall (tail / head quintile); difference from balance {base:g} with 95 % CI over users")
    for where in ("val slices", "future (replay)", "future (deployed)"):
        print(where)
        for b in a.balance:
            s = rows[b][where]
            ok = s["warm"] & np.isfinite(s["gauc"])
            means = [np.nanmean(s["gauc"][ok & sel]) for sel in (True, s["group"] == 0, s["group"] == 4)]
            line = f"  balance {b:<4g} {means[0]:.4f} ({means[1]:.4f} / {means[2]:.4f})"
            if b != base:
                d = s["gauc"] - rows[base][where]["gauc"]
                ci = paired_ci(d[ok & np.isfinite(d)])
                line += f"   {ci['mean']:+.4f} [{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]"
            print(line, flush=True)


if __name__ == "__main__":
    main()
