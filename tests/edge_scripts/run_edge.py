"""Runs inside an edge environment (.venv-edge or .venv-edge-ort) as a real subprocess.

``import torch`` is made to fail before anything else is imported, so a hidden torch import
anywhere in the edge path fails the test. Reads a job from an .npz, writes results to an .npz:

  python run_edge.py BUNDLE BACKEND JOB.npz OUT.npz

JOB holds ``phi0``, ``n_batches`` and ``b{i}_{item,hist,profile,label}``; ``score_*`` arrays
to score with φ0; ``val_*`` / ``train_*`` arrays for a budgeted round.
"""

from __future__ import annotations

import importlib.abc
import sys


class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked on the edge ({name})")
        return None


sys.meta_path.insert(0, _NoTorch())

import numpy as np  # noqa: E402

from edge_agent.trainer import Encoder, Scorer, Trainer  # noqa: E402


def main(bundle: str, backend: str, job_path: str, out_path: str) -> None:
    job = dict(np.load(job_path))
    out: dict[str, np.ndarray] = {}
    trainer = Trainer(bundle, backend, threads=1)
    out["backend"] = np.array(trainer.backend)
    out["cached"] = np.asarray(trainer.bundle.cached)  # steps on trunk features (else on raw inputs)
    keys = ("item", "hist", "profile", "label")
    batches = [{k: job[f"b{i}_{k}"] for k in keys} for i in range(int(job["n_batches"]))]
    phi0 = job["phi0"]
    out["grad0"] = trainer.gradient(phi0, batches[0])
    res = trainer.train(phi0, batches, steps=len(batches))
    out["phi"] = res.phi
    out["losses"] = np.asarray(res.losses)
    scorer = Scorer(trainer.bundle, threads=1)
    out["scores"] = scorer.score(phi0, job["score_item"], job["score_hist"], job["score_profile"])
    out["start_phi"] = Encoder(trainer.bundle).start_phi(job["score_profile"][0], job["score_hist"][0], phi0)
    out["self_check"] = np.asarray([trainer.self_check()[k] for k in ("grad", "phi", "logit", "loss")])
    if "train_item" in job:
        data = {k: job[f"train_{k}"] for k in keys}
        val = {k: job[f"val_{k}"] for k in keys}
        r = trainer.train(phi0, data, epochs=30, batch_size=16, val=val, patience=2, seed=0)
        out["round_phi"] = r.phi
        out["round_val"] = np.asarray([r.val_loss_before, r.val_loss_after])
        out["round_kept"] = np.asarray(r.kept_previous)
        out["round_stopped"] = np.asarray(r.stopped)
        out["round_steps"] = np.asarray(r.steps)
    out["torch_loaded"] = np.asarray(any(m == "torch" or m.startswith("torch.") for m in sys.modules))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
