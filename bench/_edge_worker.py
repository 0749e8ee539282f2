"""Runs inside an edge environment (no torch): step times of one backend, or one training round.

  python _edge_worker.py steps BUNDLE BACKEND DATA.npz [CLOCK]  -> JSON {"step": {batch: s}, "trunk": {batch: s} | null}
  python _edge_worker.py round BUNDLE BACKEND DATA.npz           -> JSON {round_s, steps, peak_rss_mb, ...}

CLOCK ``cpu`` (default): CPU time of the calling thread — everything runs on one thread, and on
cores shared with other jobs it does not count the time the thread waits for a core; ``wall``:
elapsed time.

``steps`` times the bare train step the bundle's graphs run (the whole model on raw inputs, or —
for a cached bundle — the head on trunk features computed beforehand), and for a cached bundle the
trunk's forward over a batch (paid once per sample per round, not per step).

``round`` is what an agent does for one user: load the bundle (sha256 verified), build the
backend, train φ on the user's fresh samples within the manifest's step budget with
early stopping on the validation slice (a cached bundle: trunk features of the training and
validation samples once, then head steps); then the same training call again (warm sessions).
Peak RSS is the whole process's (VmHWM).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

from edge_agent.trainer import Trainer

KEYS = ("item", "hist", "profile", "label")


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def time_fn(fn, clock: str = "cpu", block_s: float = 0.25, blocks: int = 5) -> float:
    """Median over ``blocks`` blocks of the mean time per call on ``clock``; each block lasts about
    ``block_s`` (at least 20 calls), after 10 warm-up calls."""
    now = CLOCKS[clock]
    t = now()
    for _ in range(10):
        fn()
    per = (now() - t) / 10
    n = max(20, int(block_s / max(per, 1e-7)))
    out = []
    for _ in range(blocks):
        t = now()
        for _ in range(n):
            fn()
        out.append((now() - t) / n)
    return float(np.median(out))


def step_times(trainer: Trainer, data: dict, batch_sizes: list[int], clock: str = "cpu") -> dict[str, float]:
    """Seconds per bare train step (``trainer.step_inputs``: raw inputs, or cached features)."""
    out = {}
    phi0 = np.zeros(trainer.bundle.phi_shape, np.float32)
    impl = trainer._impl  # the raw step, without the round's bookkeeping
    for bs in batch_sizes:
        batch = trainer.step_inputs({k: data[k][:bs] for k in KEYS})
        impl.start(phi0, trainer.optimizer)
        out[str(bs)] = time_fn(lambda: impl.step(batch), clock)
    return out


def trunk_times(trainer: Trainer, data: dict, batch_sizes: list[int], clock: str = "cpu") -> dict[str, float] | None:
    """Seconds per trunk forward over a batch (None: the bundle has no trunk)."""
    if trainer.trunk is None:
        return None
    out = {}
    for bs in batch_sizes:
        batch = trainer.bundle.check_batch({k: data[k][:bs] for k in KEYS})
        out[str(bs)] = time_fn(lambda: trainer.trunk.features(batch), clock)
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    forking parent across exec, so a child of a big benchmark process would report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(mode: str, bundle: str, backend: str, data_path: str, clock: str = "cpu") -> None:
    raw = np.load(data_path)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(bundle, backend, threads=1)
    if mode == "steps":
        data = {k: raw[f"bench_{k}"] for k in KEYS}
        sizes = [int(b) for b in raw["batch_sizes"]]
        print(json.dumps({"step": step_times(trainer, data, sizes, clock),
                          "trunk": trunk_times(trainer, data, sizes, clock)}))
        return
    train = {k: raw[f"train_{k}"] for k in KEYS}
    val = {k: raw[f"val_{k}"] for k in KEYS}
    phi0 = np.zeros(trainer.bundle.phi_shape, np.float32)
    r = trainer.train(phi0, train, val=val)
    round_s, round_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    # The same round again in this process: sessions warm, as for a pool hosting many devices or
    # an agent's later rounds on the same bundle (the first run of each ORT session pays set-up).
    warm = trainer.train(phi0, train, val=val)
    print(json.dumps({"backend": trainer.backend, "cached": trainer.bundle.cached, "round_s": round_s,
                      "round_cpu_s": round_cpu_s,
                      "train_s": r.seconds, "warm_train_s": warm.seconds, "steps": r.steps,
                      "n_train": int(train["item"].shape[0]), "n_val": int(val["item"].shape[0]),
                      "stopped": r.stopped, "kept_previous": r.kept_previous,
                      "peak_rss_mb": peak_rss_mb(),
                      "torch_loaded": "torch" in sys.modules}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
