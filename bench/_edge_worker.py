"""Runs inside an edge environment (no torch): step times of one backend, or one training round.

  python _edge_worker.py steps BUNDLE BACKEND DATA.npz    -> JSON {batch: seconds per step}
  python _edge_worker.py round BUNDLE BACKEND DATA.npz    -> JSON {round_s, steps, peak_rss_mb, ...}

``round`` is what an agent does for one user: load the bundle (sha256 verified), build the
backend, train φ on the user's fresh samples within the manifest's step budget with
early stopping on the validation slice. Peak RSS is the whole process's (VmHWM).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

from edge_agent.trainer import Trainer

KEYS = ("item", "hist", "profile", "label")


def step_times(trainer: Trainer, data: dict, batch_sizes: list[int]) -> dict[str, float]:
    out = {}
    phi0 = np.zeros(trainer.bundle.phi_shape, np.float32)
    impl = trainer._impl  # the raw step, without the round's bookkeeping
    for bs in batch_sizes:
        batch = {k: data[k][:bs] for k in KEYS}
        impl.start(phi0, trainer.optimizer)
        for _ in range(10):
            impl.step(batch)
        blocks = []
        n = 200 if bs <= 64 else 50
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                impl.step(batch)
            blocks.append((time.perf_counter() - t) / n)
        out[str(bs)] = float(np.median(blocks))
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    forking parent across exec, so a child of a big benchmark process would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(mode: str, bundle: str, backend: str, data_path: str) -> None:
    raw = np.load(data_path)
    t0 = time.perf_counter()
    trainer = Trainer(bundle, backend, threads=1)
    if mode == "steps":
        data = {k: raw[f"bench_{k}"] for k in KEYS}
        print(json.dumps(step_times(trainer, data, [int(b) for b in raw["batch_sizes"]])))
        return
    train = {k: raw[f"train_{k}"] for k in KEYS}
    val = {k: raw[f"val_{k}"] for k in KEYS}
    phi0 = np.zeros(trainer.bundle.phi_shape, np.float32)
    r = trainer.train(phi0, train, val=val)
    round_s = time.perf_counter() - t0
    print(json.dumps({"backend": trainer.backend, "round_s": round_s, "train_s": r.seconds, "steps": r.steps,
                      "n_train": int(train["item"].shape[0]), "n_val": int(val["item"].shape[0]),
                      "stopped": r.stopped, "kept_previous": r.kept_previous,
                      "peak_rss_mb": peak_rss_mb(),
                      "torch_loaded": "torch" in sys.modules}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
