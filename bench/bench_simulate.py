"""`dccl simulate` at scale, from one run each (prints; the ML-100K goal is checked and reported).

    .venv/bin/python bench/bench_simulate.py [--part ml100k|synthetic|both] [--data ../shared/datasets/ml-100k]
                                            [--devices 10000] [--out runs/bench-simulate]

- ml100k: all 943 ML-100K users as devices, 2 rounds, the default (experiment) config, embedded
  Mosquitto, 2 agent processes; wall time against the goal of <= 10 minutes on 2 cores.
- synthetic: 10,000 synthetic devices (default), 2 rounds, 4 agent processes of 2,500 devices;
  a small cloud budget (1 pretrain epoch, 1 meta-training epoch, no tuning) so that the fleet, not
  the cloud's training, is what is measured. Reports devices/s per phase and peak RSS per agent
  process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_trainer.config import build_config  # noqa: E402
from cloud_trainer.simulate import report  # noqa: E402
from cloud_trainer.simulate.loop import SimOptions, Simulation  # noqa: E402

GOAL_ML100K_S = 600.0


def _print(name: str, res: dict, out: Path) -> None:
    print(f"\n== {name}: {res['devices']} devices, {res['pools']} agent processes, "
          f"{res['total_seconds']:.0f} s total")
    print(report.phases_table(res))
    print("peak RSS per agent process (MB):", ", ".join(f"{x:.0f}" for x in res["pool_peak_rss_mb"] if x))
    print(report.counts_table(res))
    last = res["rounds"][-1]
    print("last round gAUC: " + ", ".join(f"{k} {last[k]['overall']['gauc']:.4f}" for k in last))
    print("report:", out / "report.md")


def ml100k(data: str | None, out: Path) -> dict:
    from cloud_trainer.data import load_dataset

    # No tuning: the step budget and MoMoDistill settings are the config's (tuning is an offline
    # cloud choice on validation slices, minutes of cloud CPU that says nothing about the fleet).
    cfg = build_config({"dataset": "ml-100k", "data_path": data, "rounds": 2, "seeds": 1, "strategies": ["dccl"],
                        "tune": False})
    ds = load_dataset("ml-100k", cfg.data_path)
    res = Simulation(cfg, ds, out, SimOptions(pools=2)).run()
    report.write(res, out)
    _print("ML-100K", res, out)
    ok = res["total_seconds"] <= GOAL_ML100K_S
    print(f"goal <= {GOAL_ML100K_S:.0f} s: {'met' if ok else 'MISSED'} ({res['total_seconds']:.0f} s)")
    return res


def synthetic(n: int, out: Path) -> dict:
    from cloud_trainer.data import make_synthetic

    cfg = build_config({"rounds": 2, "seeds": 1, "strategies": ["dccl"], "tune": False,
                        "data.synthetic_users": n, "cloud.pretrain_epochs": 1, "meta.epochs": 1})
    ds = make_synthetic(n_users=n, n_items=cfg.data.synthetic_items, seed=12345)
    res = Simulation(cfg, ds, out, SimOptions(pools=max(2, -(-n // 2500)), heartbeat_s=60.0)).run()
    report.write(res, out)
    _print(f"synthetic {n}", res, out)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("ml100k", "synthetic", "both"), default="both")
    p.add_argument("--data", default=None, help="ML-100K folder (default: $DCCL_DATA or ../shared/datasets)")
    p.add_argument("--devices", type=int, default=10_000, help="synthetic devices (default 10000)")
    p.add_argument("--out", default="runs/bench-simulate")
    args = p.parse_args()
    out = Path(args.out)
    summary = {}
    t0 = time.time()
    if args.part in ("ml100k", "both"):
        r = ml100k(args.data, out / "ml100k")
        summary["ml100k_seconds"] = r["total_seconds"]
    if args.part in ("synthetic", "both"):
        r = synthetic(args.devices, out / "synthetic")
        summary["synthetic_seconds"] = r["total_seconds"]
        summary["synthetic_devices_per_s"] = {
            f"{p['phase']}" + ("" if p["round"] is None else f" r{p['round'] + 1}.{p['session'] + 1}"):
            round(p["devices_per_s"], 1) for p in r["phases"] if "devices_per_s" in p}
        summary["synthetic_peak_rss_mb"] = r["pool_peak_rss_mb"]
    print("\n" + json.dumps(summary, indent=1))
    print(f"bench wall time {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
