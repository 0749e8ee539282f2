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


def _export_help_ok() -> bool:
    dccl = CLOUD_BIN / "dccl"
    if not dccl.exists():
        return False
    r = subprocess.run([str(dccl), "export", "--help"], capture_output=True, text=True, timeout=300)
    return r.returncode == 0


def build_bundle(out: Path) -> Path:
    """A tiny real bundle made by the cloud environment's ``dccl export``; skips if unavailable.

    Cached per pytest session in ``$DCCL_TEST_BUNDLE_CACHE`` (or a temp folder) because an
    export costs seconds of CPU shared with other engineers.
    """
    cache = Path(os.environ.get("DCCL_TEST_BUNDLE_CACHE", "/tmp/dccl-edge-test-bundle"))
    if (cache / "manifest.json").exists():
        shutil.copytree(cache, out, dirs_exist_ok=True)
        return out
    if not _export_help_ok():
        pytest.skip("needs a bundle from `.venv/bin/dccl export` (onnx_export not available yet)")
    ckpt_dir = cache.parent / (cache.name + "-ckpt")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(CLOUD_BIN / "python"), str(REPO / "tests" / "edge_make_tiny_bundle.py"),
                        str(ckpt_dir), str(cache)], capture_output=True, text=True, timeout=600, cwd=REPO)
    if r.returncode != 0 or not (cache / "manifest.json").exists():
        pytest.skip(f"could not build a test bundle: {r.stderr.strip().splitlines()[-1:]}")
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
