"""Why do DCCL's devices fall below their own bundle's cloud model on the tail? (one seed, all rounds)

    .venv/bin/python bench/probe_tail.py [--dataset ml-100k] [--data PATH] [--seed 0]

Makes seed 0's choices exactly as `dccl experiment` does (`experiment.tune`), then runs DCCL's
rounds and, after each round's MoMoDistill, prints per activity quintile (tail ... head) the
future-window gAUC of

  momodistill    the new bundle's cloud model (zero φ)
  dccl-start     the new bundle with each device's starting φ (the encoder's, or the chosen policy)
  dccl           that start personalised on-device (what the experiment reports)
  best-of-3      each device keeps whichever of zero φ / start φ / trained φ has the lowest loss on its
                 own validation slice (a per-device guard against ending below the cloud model)

and, per quintile, how many devices the guard sends back to zero φ, and the mean number of
on-device training samples and validation samples. A diagnosis only: nothing here is chosen on the
future window.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from cloud_trainer import strategies
from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.evaluate import per_user, score_eval_set
from cloud_trainer.experiment import load_data, tune
from cloud_trainer.personalize import per_owner_loss, personalize_all
from cloud_trainer.strategies import DCCL, device_scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--data", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY=JSON, as dccl experiment --set")
    a = p.parse_args()
    over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = build_config({"dataset": a.dataset, "data_path": a.data, "rounds": a.rounds, **over})
    ds = load_data(cfg)
    ctx = build_context(ds, cfg, a.seed)
    print(json.dumps(tune(ctx, cfg), default=str)[:2000], flush=True)

    # DCCL's bundle session is its last personalize_all call of a round: its phi0 is the start φ.
    calls: list[torch.Tensor] = []

    def recording(model, phi0, *args, **kw):
        calls.append(phi0)
        return personalize_all(model, phi0, *args, **kw)

    strategies.personalize_all = recording
    dccl = DCCL()
    dccl.setup(ctx)
    for r in range(cfg.rounds):
        rd = ctx.rounds[r]
        ev = rd.future
        got = {}

        def report(key, scorer, _ev=ev):
            got[key] = per_user(_ev, score_eval_set(_ev, scorer))

        dccl.run_round(ctx, r, report)
        start = calls[-1]
        U = ctx.n_users
        zero = torch.zeros_like(start)
        with torch.no_grad():
            losses = torch.stack([per_owner_loss(dccl.model, rd.val, t, U) for t in (zero, start, dccl.phi)])
        has_val = torch.zeros(U, dtype=torch.bool)
        has_val[rd.val["owner"]] = True
        pick = torch.where(has_val, losses.argmin(0), torch.full((U,), 2))
        tables = torch.stack([zero, start, dccl.phi])
        best = tables[pick, torch.arange(U)]
        got["best-of-3"] = per_user(ev, score_eval_set(ev, device_scorer(dccl.model, ds.profile, best)))
        n_train = torch.zeros(U).index_add(0, rd.fresh_train["owner"], rd.fresh_train["label"]).numpy()
        n_val = torch.zeros(U).index_add(0, rd.val["owner"], rd.val["label"]).numpy()
        warm = ~got["dccl"]["cold"]
        grp = got["dccl"]["group"]
        uid = got["dccl"]["user"]
        print(f"\nround {r + 1}: future gAUC by quintile (warm users)")
        print("  " + " ".join(f"{k:>12s}" for k in ("quintile", "momodistill", "dccl-start", "dccl", "best-of-3",
                                                     "→zero", "train pos", "val pos")))
        for g in range(5):
            m = warm & (grp == g)
            if not m.any():
                continue
            row = [np.nanmean(got[k]["gauc"][m]) for k in ("momodistill", "dccl-start", "dccl", "best-of-3")]
            u = uid[m]
            print("  " + f"{g:>12d}" + "".join(f" {v:12.4f}" for v in row)
                  + f" {float((pick[u] == 0).float().mean()):12.2f} {n_train[u].mean():12.1f} {n_val[u].mean():12.1f}")
        m = warm
        row = [np.nanmean(got[k]["gauc"][m]) for k in ("momodistill", "dccl-start", "dccl", "best-of-3")]
        print("  " + f"{'all':>12s}" + "".join(f" {v:12.4f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
