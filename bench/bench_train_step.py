"""On-device training cost of the ML-100K model, from one run (prints; asserts nothing).

    .venv/bin/python bench/bench_train_step.py [--data ../shared/datasets/ml-100k] [--batches 32 256]

- step time at each batch size on 1 thread: PyTorch eager φ-only AdamW (model frozen, and
  ``train_phi`` as written, which also back-propagates into the frozen-in-spirit model
  parameters), the ORT training API and the portable graph — each edge backend in its own
  edge environment (.venv-edge-ort, .venv-edge), plus the portable graph on the training build
  in this process; ratios vs PyTorch (goal <= 0.3x);
- bundle size (per file);
- one on-device training round for the median ML-100K user (load + verify bundle, train φ on the
  user's fresh window with the manifest's step budget, early stopping on its validation slice):
  wall time and peak RSS of the edge process (goal <= 80 MB).

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


def time_steps(step, n: int) -> float:
    for _ in range(10):
        step()
    blocks = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            step()
        blocks.append((time.perf_counter() - t) / n)
    return float(np.median(blocks))


def torch_step_time(model, batch: dict, cfg: DeviceTrainConfig, frozen: bool) -> float:
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

    t = time_steps(step, 200 if len(batch["item"]) <= 64 else 50)
    for p in model.parameters():
        p.requires_grad_(True)
    return t


def edge(mode: str, backend: str, bundle: Path, data: Path) -> dict | None:
    python = EDGE[backend]
    if not python.exists():
        return None
    proc = subprocess.run([str(python), str(WORKER), mode, str(bundle), backend, str(data)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        print(f"  ({backend} {mode} failed: {proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "datasets" / "ml-100k")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DeviceTrainConfig()
    model, seqs, profile = build(args.data)
    print(f"model: n_items=1682, genres 19+1, profile {model.base.config.profile_vocab}, L={model.base.config.max_len}, "
          f"phi {model.phi_dim}, patches {list(model.config.target_modules)}; torch {torch.__version__}, 1 thread")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = tmp / "bundle"
        t = time.perf_counter()
        manifest = write_bundle(model, None, bundle, version="bench", cfg=cfg)
        print(f"export + contract check: {time.perf_counter() - t:.1f} s")
        total = sum(e["size"] for e in manifest["files"].values()) + (bundle / "manifest.json").stat().st_size
        sizes = ", ".join(f"{n} {e['size'] / 1024:.0f}" for n, e in sorted(manifest["files"].items()))
        print(f"bundle: {total / 1024:.0f} KiB total ({sizes} KiB; manifest {(bundle / 'manifest.json').stat().st_size / 1024:.0f})")
        print(f"  a board with one backend needs: ort-training {sum(manifest['files'][f]['size'] for f in ('training_model.onnx', 'eval_model.onnx', 'optimizer_model.onnx', 'checkpoint', 'inference.onnx', 'encoder.onnx')) / 1024:.0f} KiB,"
              f" portable {sum(manifest['files'][f]['size'] for f in ('train_step.onnx', 'inference.onnx', 'encoder.onnx')) / 1024:.0f} KiB")

        big = example_batch(model, max(args.batches), seed=1)
        data = tmp / "data.npz"
        train, val, user, n_user = median_user_round(seqs, profile, model.base.config.max_len)
        np.savez(data, batch_sizes=np.array(args.batches), **{f"bench_{k}": v for k, v in big.items()},
                 **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()})

        rows = []
        for bs in args.batches:
            batch = {k: v[:bs] for k, v in big.items()}
            rows.append((bs, "pytorch eager, model frozen", torch_step_time(model, batch, cfg, frozen=True)))
            rows.append((bs, "pytorch eager, train_phi as written", torch_step_time(model, batch, cfg, frozen=False)))
        local = {}
        for backend in ("ort-training", "portable"):
            tr = Trainer(bundle, backend, threads=1)
            from bench._edge_worker import step_times  # same timing loop as in the edge envs

            local[backend] = step_times(tr, big, args.batches)
        remote = {b: edge("steps", b, bundle, data) for b in ("ort-training", "portable")}
        for bs in args.batches:
            rows.append((bs, "ORT training API, in .venv-edge-ort (ORT 1.19.2)", (remote["ort-training"] or {}).get(str(bs))))
            rows.append((bs, "portable graph, in .venv-edge (ORT 1.32)", (remote["portable"] or {}).get(str(bs))))
            rows.append((bs, "ORT training API, this process", local["ort-training"][str(bs)]))
            rows.append((bs, "portable graph, this process (ORT 1.19.2)", local["portable"][str(bs)]))
        print(f"\nstep time, 1 thread (median of 5 blocks); ratio vs 'pytorch eager, model frozen' (goal <= 0.3x)")
        for bs in args.batches:
            ref = next(t for b, n, t in rows if b == bs and n.startswith("pytorch eager, model frozen"))
            for b, name, t in rows:
                if b == bs:
                    shown = "   n/a" if t is None else f"{t * 1e3:7.3f} ms  {t / ref:5.2f}x"
                    print(f"  B={bs:<4} {name:<50} {shown}")

        print(f"\non-device round, median ML-100K user (user {user}, {n_user} ratings): {len(train['item'])} train / "
              f"{len(val['item'])} val samples, budget {cfg.steps} full-batch steps, early stopping on val")
        for backend in ("ort-training", "portable"):
            r = edge("round", backend, bundle, data)
            if r:
                print(f"  {backend:<13} round {r['round_s'] * 1e3:6.0f} ms (train {r['train_s'] * 1e3:5.0f} ms, "
                      f"{r['steps']} steps, {r['stopped']}); peak RSS {r['peak_rss_mb']:.0f} MB (goal <= 80); "
                      f"torch loaded: {r['torch_loaded']}")


if __name__ == "__main__":
    main()
