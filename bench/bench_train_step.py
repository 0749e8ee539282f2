"""On-device training cost of the ML-100K model, from one run (prints; asserts nothing).

    .venv/bin/python bench/bench_train_step.py [--data ../shared/datasets/ml-100k] [--batches 32 256]
                                                [--repeats 3] [--clock cpu|wall]

Two bundles of the same model: the *cached* one devices get (patches only in the MLP, so the train
graphs are the head on trunk features computed once per sample per round) and the *full-graph* one
(``write_bundle(cache_features=False)``: the train graphs run the whole model on raw inputs every
step, as before the feature cache).

- step time at each batch size on 1 thread — median of 5 blocks, and the median of that over
  ``--repeats`` (3) repeats in which all rows are measured in turn — as CPU time of the calling thread
  (``--clock cpu``, the default: on cores shared with other jobs, wall time also counts the waits
  for a core, which differ from row to row) or elapsed time (``--clock wall``):
  - full-model step: PyTorch eager φ-only AdamW (model frozen, and ``train_phi`` as written, which
    also back-propagates into the frozen-in-spirit model parameters), the ORT training API and the
    portable graph of the full-graph bundle — each edge backend in its own edge environment
    (.venv-edge-ort, .venv-edge), plus both in this process; ratios vs PyTorch eager, model frozen;
  - head step on cached features (what a device runs now): PyTorch eager head step on the same
    features (the fair baseline), and the cached bundle's ORT training API / portable steps in
    both edge environments and in this process; each ratio against both PyTorch baselines
    (cached-head eager, and full-model eager);
  - the trunk forward (paid once per sample per round, not per step): PyTorch no-grad and
    trunk.onnx in both edge environments; and a round of ``steps`` full-batch steps on one batch
    built from the measured times (trunk once + steps x head step, vs steps x full-model step);
- bundle size (per file) of both bundles;
- one on-device training round for the median ML-100K user (load + verify bundle, train φ on the
  user's fresh window with the manifest's step budget, early stopping on its validation slice):
  wall time (cold: the process's first training call; and the same call again with warm
  sessions), the process's CPU time for the round, and peak RSS of the edge process (goal
  <= 80 MB), for the cached bundle (the path devices run) and the full-graph one.

The model has ML-100K's real item genres when the dataset is present (synthetic ones otherwise)
and a seeded random Θ; speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cloud_trainer.checkpoint import build_model  # noqa: E402
from cloud_trainer.models.din import DINConfig  # noqa: E402
from cloud_trainer.models.metapatch import MetaPatchConfig  # noqa: E402
from cloud_trainer.personalize import DeviceTrainConfig  # noqa: E402
from edge_agent.trainer import Trainer  # noqa: E402
from onnx_export.bundle import write_bundle  # noqa: E402
from onnx_export.schema import example_batch  # noqa: E402

from bench._edge_worker import step_times, time_fn, trunk_times  # noqa: E402  (the same timing as in the edge envs)

KEYS = ("item", "hist", "profile", "label")
WORKER = ROOT / "bench" / "_edge_worker.py"
EDGE = {"portable": ROOT / ".venv-edge" / "bin" / "python", "ort-training": ROOT / ".venv-edge-ort" / "bin" / "python"}


def load_ml100k(path: Path):
    """(item_attrs [1683, A], per-user item sequences in time order, profile table) or None."""
    try:
        from cloud_trainer.data.loaders import load_dataset

        ds = load_dataset("ml-100k", path)
        return torch.from_numpy(ds.item_attrs), ds.sequences, ds.profile, list(ds.profile_vocab)
    except Exception as exc:  # absent or unreadable: fall back to synthetic genres
        print(f"(ml-100k not used: {type(exc).__name__}: {exc}; synthetic genres, median user of 65 ratings)")
        return None


def build(data_path: Path):
    torch.manual_seed(0)
    real = load_ml100k(data_path)
    if real is None:
        rng = np.random.default_rng(0)
        attrs = np.zeros((1683, 6), np.int64)
        for i in range(1, 1683):
            k = int(rng.integers(1, 4))
            attrs[i, :k] = rng.choice(np.arange(1, 20), k, replace=False)
        seqs = [rng.permutation(np.arange(1, 1683))[:65] for _ in range(943)]
        real = (torch.from_numpy(attrs), seqs, np.zeros((943, 3), np.int64), [8, 3, 22])
    attrs, seqs, profile, vocab = real
    model = build_model(DINConfig(n_items=1682, n_attrs=20, profile_vocab=vocab), MetaPatchConfig(), attrs)
    with torch.no_grad():
        for p in model.shared_parameters().values():
            p.normal_(0.0, 0.3)
    return model.eval(), seqs, profile


def median_user_round(seqs, profile, max_len: int, neg: int = 4, seed: int = 0) -> tuple[dict, dict, int, int]:
    """The median-length user's fresh window (25% of the sequence after a 60% cloud part), each
    positive with ``neg`` sampled negatives; the window's last 20% is the validation slice."""
    lengths = np.array([len(s) for s in seqs])
    u = int(np.argsort(lengths)[len(lengths) // 2])
    seq = np.asarray(seqs[u])
    n = len(seq)
    lo, hi = int(0.6 * n), int(0.85 * n)
    rng = np.random.default_rng(seed)
    rows = []
    for pos in range(lo, hi):
        h = seq[max(0, pos - max_len):pos]
        hist = np.zeros(max_len, np.int64)
        hist[max_len - len(h):] = h
        rows.append((seq[pos], hist, 1.0))
        seen = set(seq.tolist())
        for _ in range(neg):
            j = int(rng.integers(1, 1683))
            while j in seen:
                j = int(rng.integers(1, 1683))
            rows.append((j, hist, 0.0))
    n_pos = hi - lo
    split = (n_pos - max(1, n_pos // 5)) * (1 + neg)
    arr = {"item": np.array([r[0] for r in rows], np.int64), "hist": np.stack([r[1] for r in rows]),
           "label": np.array([r[2] for r in rows], np.float32)}
    arr["profile"] = np.repeat(np.asarray(profile[u], np.int64)[None], len(rows), axis=0)
    train = {k: v[:split] for k, v in arr.items()}
    val = {k: v[split:] for k, v in arr.items()}
    return train, val, u, n


CLOCK = "cpu"  # set from --clock in main()


def torch_step_time(model, batch: dict, cfg: DeviceTrainConfig, frozen: bool) -> float:
    """One φ-only AdamW step of the whole model on raw inputs."""
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    for p in model.parameters():
        p.requires_grad_(not frozen)
    phi = torch.zeros(1, model.phi_dim, requires_grad=True)
    opt = torch.optim.AdamW([phi], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)

    def step():
        loss = F.binary_cross_entropy_with_logits(model(tb["item"], tb["hist"], tb["profile"], phi=phi), tb["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time_fn(step, CLOCK)
    for p in model.parameters():
        p.requires_grad_(True)
    return t


def torch_trunk_features(model, batch: dict) -> tuple[torch.Tensor, float]:
    """The trunk features of ``batch`` (no grad) and the time of one such forward."""
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}

    def trunk():
        with torch.no_grad():
            return model.features(tb["item"], tb["hist"], tb["profile"])

    return trunk(), time_fn(trunk, CLOCK)


def torch_head_step_time(model, features: torch.Tensor, label: np.ndarray, cfg: DeviceTrainConfig) -> float:
    """One φ-only AdamW step of the head on cached trunk features, model frozen: what PyTorch
    would run per step with the same feature cache (the fair baseline for the cached ORT steps)."""
    y = torch.from_numpy(label)
    for p in model.parameters():
        p.requires_grad_(False)
    phi = torch.zeros(1, model.phi_dim, requires_grad=True)
    opt = torch.optim.AdamW([phi], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)

    def step():
        loss = F.binary_cross_entropy_with_logits(model.head(features, phi=phi), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time_fn(step, CLOCK)
    for p in model.parameters():
        p.requires_grad_(True)
    return t


def edge(mode: str, backend: str, bundle: Path, data: Path) -> dict | None:
    python = EDGE[backend]
    if not python.exists():
        return None
    proc = subprocess.run([str(python), str(WORKER), mode, str(bundle), backend, str(data), CLOCK],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        print(f"  ({backend} {mode} failed: {proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(name: str, bundle: Path, manifest: dict) -> None:
    files = manifest["files"]
    total = sum(e["size"] for e in files.values()) + (bundle / "manifest.json").stat().st_size
    sizes = ", ".join(f"{n} {e['size'] / 1024:.0f}" for n, e in sorted(files.items()))
    print(f"{name}: {total / 1024:.0f} KiB total ({sizes} KiB; manifest {(bundle / 'manifest.json').stat().st_size / 1024:.0f})")
    common = ["inference.onnx", "encoder.onnx"] + [f for f in (manifest["models"].get("trunk"), manifest["models"].get("head")) if f]
    ort_files = list(manifest["models"]["ort_training"].values())
    kib = lambda names: sum(files[f]["size"] for f in names) / 1024  # noqa: E731
    print(f"  train graphs take {manifest['train_inputs']}; a board with one backend needs: "
          f"ort-training {kib(ort_files + common):.0f} KiB, portable {kib(['train_step.onnx'] + common):.0f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "ml-100k")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--repeats", type=int, default=3, help="measure every step-time row this many times (median)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="step times as CPU time of the calling thread (default) or elapsed time")
    args = ap.parse_args()
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(1)
    cfg = DeviceTrainConfig()
    model, seqs, profile = build(args.data)
    assert model.cacheable  # the default patches (mlp.0, mlp.2): the device path is the cached one
    print(f"model: n_items=1682, genres 19+1, profile {model.base.config.profile_vocab}, L={model.base.config.max_len}, "
          f"phi {model.phi_dim}, patches {list(model.config.target_modules)}, trunk features F={model.feature_dim}; "
          f"torch {torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundles = {"cached": tmp / "cached", "full": tmp / "full"}
        manifests = {}
        for kind, path in bundles.items():
            t = time.perf_counter()
            manifests[kind] = write_bundle(model, None, path, version=f"bench-{kind}", cfg=cfg,
                                           cache_features=(kind == "cached"))
            print(f"export + contract check ({kind}): {time.perf_counter() - t:.1f} s")
        describe("bundle, cached (what devices get)", bundles["cached"], manifests["cached"])
        describe("bundle, full graphs (before the feature cache)", bundles["full"], manifests["full"])

        big = example_batch(model, max(args.batches), seed=1)
        data = tmp / "data.npz"
        train, val, user, n_user = median_user_round(seqs, profile, model.base.config.max_len)
        np.savez(data, batch_sizes=np.array(args.batches), **{f"bench_{k}": v for k, v in big.items()},
                 **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()})

        # -- measurements: every row once per repeat, rows interleaved; each row's median over repeats --
        # (on shared cores the load drifts; measuring all rows in each repeat lets every row see it)
        samples: dict[tuple, list[float]] = {}

        def record(key, value):
            if value is not None:
                samples.setdefault(key, []).append(value)

        for rep in range(args.repeats):
            for bs in args.batches:
                batch = {k: v[:bs] for k, v in big.items()}
                record(("torch", "full", bs), torch_step_time(model, batch, cfg, frozen=True))
                record(("torch", "full-unfrozen", bs), torch_step_time(model, batch, cfg, frozen=False))
                feats, t = torch_trunk_features(model, batch)
                record(("torch", "trunk", bs), t)
                record(("torch", "head", bs), torch_head_step_time(model, feats, batch["label"], cfg))
            for kind, path in bundles.items():
                for backend in ("ort-training", "portable"):
                    tr = Trainer(path, backend, threads=1)
                    res = {"local": {"step": step_times(tr, big, args.batches, CLOCK),
                                     "trunk": trunk_times(tr, big, args.batches, CLOCK)},
                           "remote": edge("steps", backend, path, data)}
                    for where, r in res.items():
                        for what in ("step", "trunk"):
                            for bs in args.batches:
                                record((where, kind, backend, what, bs),
                                       None if r is None or r.get(what) is None else r[what][str(bs)])
            print(f"  (repeat {rep + 1}/{args.repeats} measured)", flush=True)
        med = {k: float(np.median(v)) for k, v in samples.items()}
        t_full = {bs: med["torch", "full", bs] for bs in args.batches}
        t_full_unfrozen = {bs: med["torch", "full-unfrozen", bs] for bs in args.batches}
        t_head = {bs: med["torch", "head", bs] for bs in args.batches}
        t_trunk = {bs: med["torch", "trunk", bs] for bs in args.batches}
        local, remote = "local", "remote"

        def got(where, kind, backend, what, bs):
            return med.get((where, kind, backend, what, bs))

        ms = lambda t: "    n/a   " if t is None else f"{t * 1e3:7.3f} ms"  # noqa: E731
        ratio = lambda t, ref: "   n/a" if t is None else f"{t / ref:5.2f}x"  # noqa: E731
        envs = [(remote, "ort-training", "ORT training API, in .venv-edge-ort (ORT 1.19.2)"),
                (remote, "portable", "portable graph, in .venv-edge (ORT 1.32)"),
                (local, "ort-training", "ORT training API, this process"),
                (local, "portable", "portable graph, this process (ORT 1.19.2)")]
        what = "CPU time of the calling thread" if CLOCK == "cpu" else "elapsed time"
        print(f"\nstep time ({what}), 1 thread; each row the median over {args.repeats} interleaved repeats of the "
              "median of 5 blocks. Goal: <= 0.3x PyTorch eager.")
        print("  A = 'pytorch eager, model frozen' (the full model on raw inputs, every step)")
        print("  C = 'pytorch eager head on cached features, model frozen' (the same feature cache in PyTorch:")
        print("      the fair baseline for the cached ORT steps)")
        for bs in args.batches:
            A, C = t_full[bs], t_head[bs]
            print(f"\n  B={bs}  full-model step (full-graph bundle, raw inputs)          time        vs A")
            print(f"    {'pytorch eager, model frozen  [A]':<62} {ms(A)}  {ratio(A, A)}")
            print(f"    {'pytorch eager, train_phi as written':<62} {ms(t_full_unfrozen[bs])}  {ratio(t_full_unfrozen[bs], A)}")
            for where, backend, name in envs:
                t = got(where, "full", backend, "step", bs)
                print(f"    {name:<62} {ms(t)}  {ratio(t, A)}")
            print(f"  B={bs}  head step on cached trunk features (what a device runs)   time        vs C    vs A")
            print(f"    {'pytorch eager head, model frozen  [C]':<62} {ms(C)}  {ratio(C, C)}  {ratio(C, A)}")
            for where, backend, name in envs:
                t = got(where, "cached", backend, "step", bs)
                print(f"    {name:<62} {ms(t)}  {ratio(t, C)}  {ratio(t, A)}")
            print(f"  B={bs}  trunk features, once per sample per round (not per step)   time")
            print(f"    {'pytorch, no grad':<62} {ms(t_trunk[bs])}")
            for where, backend, name in envs[:3]:  # the trunk is one inference session: once per process
                where_name = name.split(", ", 1)[1] if where == remote else "this process (ORT 1.19.2)"
                print(f"    {'trunk.onnx, ' + where_name:<62} {ms(got(where, 'cached', backend, 'trunk', bs))}")
            S = cfg.steps
            print(f"  B={bs}  a round of {S} full-batch steps on these {bs} samples          time        vs A-round")
            a_round = S * A
            print(f"    {f'pytorch eager full model: {S} x A  [A-round]':<62} {a_round * 1e3:7.2f} ms  {1:5.2f}x")
            c_round = t_trunk[bs] + S * C
            print(f"    {f'pytorch eager cached: trunk + {S} x C':<62} {c_round * 1e3:7.2f} ms  {c_round / a_round:5.2f}x")
            for where, backend, name in envs[:2]:
                step, trunk_t = got(where, "cached", backend, "step", bs), got(where, "cached", backend, "trunk", bs)
                t = None if step is None or trunk_t is None else trunk_t + S * step
                shown = "     n/a" if t is None else f"{t * 1e3:7.2f} ms  {t / a_round:5.2f}x"
                print(f"    {'cached: trunk + ' + str(S) + ' x head step, ' + name.split(', ', 1)[1]:<62} {shown}")

        print(f"\non-device round, median ML-100K user (user {user}, {n_user} ratings): {len(train['item'])} train / "
              f"{len(val['item'])} val samples, budget {cfg.steps} full-batch steps, early stopping on val")
        print(f"  (a fresh edge process per round, {args.repeats} per row: median times, highest peak RSS)")
        for kind, label in (("cached", "cached bundle (the device path)"), ("full", "full-graph bundle (before)")):
            for backend in ("ort-training", "portable"):
                runs = [r for r in (edge("round", backend, bundles[kind], data) for _ in range(args.repeats)) if r]
                if not runs:
                    continue
                m = lambda key: float(np.median([r[key] for r in runs])) * 1e3  # noqa: E731
                r = runs[0]
                print(f"  {label:<31} {backend:<13} round {m('round_s'):4.0f} ms wall, {m('round_cpu_s'):4.0f} ms CPU "
                      f"(train {m('train_s'):3.0f} ms, {r['steps']} steps, {r['stopped']}; again warm: train "
                      f"{m('warm_train_s'):4.1f} ms); peak RSS {max(x['peak_rss_mb'] for x in runs):.0f} MB (goal <= 80); "
                      f"torch loaded: {any(x['torch_loaded'] for x in runs)}")


if __name__ == "__main__":
    main()
