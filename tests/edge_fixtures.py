"""Shared helpers for the edge agent tests (plain functions; tests/conftest.py is not ours).

Everything here runs in the torch-free edge environment. ``build_bundle`` is the one helper
that needs the cloud environment: it shells out to ``.venv/bin/dccl export`` and skips the
calling test cleanly when that environment or the export command is not there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EDGE_PY = REPO / ".venv-edge" / "bin" / "python"
CLOUD_BIN = REPO / ".venv" / "bin"


def edge_python() -> str:
    """The edge environment's interpreter (falls back to the current one)."""
    return str(EDGE_PY) if EDGE_PY.exists() else sys.executable


def events(n: int, start_ts: float = 1_000_000.0, click_every: int = 1, item0: int = 1,
           prefix: str = "e") -> list[dict[str, Any]]:
    """n events, one second apart; every ``click_every``-th is a click, the rest impressions."""
    return [{"event_id": f"{prefix}{i}", "kind": "click" if i % click_every == 0 else "impression",
             "item": item0 + i, "ts": start_ts + i} for i in range(n)]


def write_config(dirpath: Path, **overrides: Any) -> Path:
    """A valid agent config in ``dirpath``/agent.json; sections in overrides are merged."""
    cfg: dict[str, Any] = {"device_id": "dev-1", "state_dir": "state", "bundle_dir": "bundle",
                           "http": {"port": 0}, "train": {"max_steps": 20, "max_seconds": 30}}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path = dirpath / "agent.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def run_edge_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
                 stdin: str | None = None) -> subprocess.CompletedProcess:
    """``dccl ...`` in the edge environment, as a user would run it."""
    return subprocess.run([edge_python(), "-m", "dccl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=stdin, cwd=REPO)


# A tiny cloud checkpoint (60 items, profile [4, 3], L = 6, φ of 8) with an encoder, made by the
# cloud environment; Θ is scaled up so that φ moves the logits (an untrained Θ leaves φ inert).
_MAKE_CHECKPOINT = """
import sys, numpy as np, torch
from cloud_trainer.checkpoint import build_model, save_checkpoint
from cloud_trainer.models.din import DINConfig
from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
from cloud_trainer.models.metapatch import MetaPatchConfig
torch.manual_seed(0)
n_items, vocab = 60, [4, 3]
attrs = torch.from_numpy(np.random.default_rng(0).integers(0, 5, (n_items + 1, 2)))
attrs[0] = 0
model = build_model(DINConfig(n_items=n_items, n_attrs=5, profile_vocab=vocab, max_len=6, emb_dim=8,
                              profile_dim=4, attn_hidden=8, mlp_hidden=(16, 8)),
                    MetaPatchConfig(phi_dim=8, bottleneck=2), attrs)
with torch.no_grad():
    for p in model.shared_parameters().values():
        p.normal_(0.0, 0.3)
enc = PatchEncoder(EncoderConfig(n_items=n_items, phi_dim=8, profile_vocab=vocab, emb_dim=4, profile_dim=2, hidden=8))
save_checkpoint(sys.argv[1], model, enc, step=1, round=0)
"""


def build_bundle(out: Path) -> Path:
    """A tiny real bundle made by the cloud environment's ``dccl export``; skips if unavailable.

    Built once into ``$DCCL_TEST_BUNDLE_CACHE`` (default /tmp/dccl-edge-test-bundle-<uid>) and
    copied, because an export costs seconds of CPU shared with other engineers.
    """
    cache = Path(os.environ.get("DCCL_TEST_BUNDLE_CACHE", f"/tmp/dccl-edge-test-bundle-{os.getuid()}"))
    if not (cache / "manifest.json").exists():
        py, dccl = CLOUD_BIN / "python", CLOUD_BIN / "dccl"
        if not (py.exists() and dccl.exists()):
            pytest.skip("needs the cloud environment (.venv) to export a test bundle")
        ckpt = cache.with_name(cache.name + ".pt")
        r = subprocess.run([str(py), "-c", _MAKE_CHECKPOINT, str(ckpt)], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
        if r.returncode != 0:
            pytest.skip(f"could not make a test checkpoint: {r.stderr.strip()[-500:]}")
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        r = subprocess.run([str(dccl), "export", "--checkpoint", str(ckpt), "--out", str(tmp), "--force",
                            "--version", "edge-test-1", "--steps", "10", "--lr", "0.05"],
                           capture_output=True, text=True, timeout=600, cwd=REPO)
        if r.returncode != 0:
            pytest.skip(f"`dccl export` failed: {r.stderr.strip()[-500:]}")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    shutil.copytree(cache, out, dirs_exist_ok=True)
    return out


class FakeModel:
    """A numpy stand-in for a bundle's model (``edge_agent.agent.Model``): deterministic scores
    that depend on φ, the history and the profile, so tests see each of them flow through."""

    def __init__(self, n_items: int = 50, max_len: int = 5, profile_vocab: tuple[int, ...] = (3, 4),
                 m: int = 4, version: str = "fake-1"):
        from edge_agent.agent import BundleInfo
        self.info = BundleInfo(version, n_items, max_len, profile_vocab, {"phi": (1, m)})
        self.calls: list[tuple] = []

    def score(self, phi, item, hist, profile):
        self.calls.append(("score", item.copy(), hist.copy(), profile.copy()))
        # items near the most recent history item score higher; φ[0] shifts every score
        last = hist[:, -1].astype(np.float64)
        return -np.abs(item - last) + float(phi["phi"][0, 0]) + 0.01 * profile.sum(1)

    def initial_phi(self, profile, hist, phi_prev):
        self.calls.append(("initial_phi", profile.copy(), hist.copy()))
        return {"phi": np.full((1, self.info.trainable["phi"][1]), 0.25, np.float32)}, "encoder"

    def train(self, phi, opt, arrays, cfg, seed):
        from edge_agent.agent import RoundResult
        self.calls.append(("train", len(arrays.train), len(arrays.val), seed))
        new = {"phi": phi["phi"] + 1.0}
        step = int(opt.get("step", np.array(0))) + 3
        return RoundResult(new, {"step": np.array(step, np.int64)}, loss=0.5, steps=3,
                           kept_previous=False, backend="fake", detail={})
