"""The simulated fleet: one device per user, grouped into agent-pool processes (edge_agent.pool).

Each device gets an id (``u00042`` for user 42), its own HMAC key and a replay of its user's log.
The replay gives every interaction a wall-clock time so that the deployment split becomes a time
split shared by all users: the cloud history falls in hour 0, round r's fresh window in hour r+1,
the future window in hour K+1 (hours counted from ``t0``). The simulation clock of round r then
says "fresh data is [t0 + (r+1) h, t0 + (r+2) h)", and every device finds exactly its fresh window
of the reference split there (edge_agent.pool)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dccl.errors import DcclError

REPO = Path(__file__).resolve().parents[2]
HOUR = 3600.0


def device_id(user: int) -> str:
    return f"u{user:05d}"


def edge_python() -> str:
    """The torch-free edge environment when it exists (DCCL_EDGE_PYTHON overrides)."""
    env = os.environ.get("DCCL_EDGE_PYTHON")
    if env:
        return env
    exe = REPO / ".venv-edge" / "bin" / "python"
    return str(exe) if exe.exists() else sys.executable


class Clock:
    """Replay times: segment s (0 = cloud, r + 1 = fresh round r, K + 1 = future) is hour s after t0."""

    def __init__(self, rounds: int, t0: float | None = None):
        self.rounds = rounds
        self.t0 = (time.time() - 12 * HOUR) if t0 is None else t0

    def window(self, r: int) -> tuple[float, float]:
        return self.t0 + (r + 1) * HOUR, self.t0 + (r + 2) * HOUR

    def times(self, C: int, F: int, T: int) -> np.ndarray:
        """[C + K·F + T] increasing times of one user's interactions."""
        segs = [C] + [F] * self.rounds + [T]
        out = []
        for s, m in enumerate(segs):
            out.append(self.t0 + s * HOUR + (np.arange(m) + 0.5) / max(m, 1) * HOUR * 0.999)
        return np.concatenate(out)


class Fleet:
    def __init__(self, root: Path, ds, split, cfg, *, seed: int, prefix: str, broker_url: str, pools: int,
                 heartbeat_s: float = 30.0, backend: str = "auto"):
        self.root = Path(root)
        self.users = list(range(ds.n_users))
        self.ids = [device_id(u) for u in self.users]
        self.user_of = {d: u for d, u in zip(self.ids, self.users)}
        self.clock = Clock(split.rounds)
        self.n_pools = max(1, min(pools, len(self.users)))
        rng = np.random.default_rng([seed, 0xD0CC])
        self.keys = {d: rng.bytes(32) for d in self.ids}
        self.pools: list[dict] = []
        self.procs: list[subprocess.Popen | None] = []
        self.restarts = 0
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "keys.json").write_text(json.dumps({d: k.hex() for d, k in self.keys.items()}))
        profile = np.asarray(ds.profile, np.int64).reshape(ds.n_users, -1)
        groups = np.array_split(np.arange(len(self.users)), self.n_pools)
        for i, idx in enumerate(groups):
            proot = self.root / f"pool-{i}"
            proot.mkdir(parents=True, exist_ok=True)
            seqs, times = [], []
            for u in idx:
                seq = np.asarray(ds.sequences[u], np.int64)
                ts = self.clock.times(int(split.cloud_len[u]), int(split.fresh_len[u]), int(split.future_len[u]))
                assert len(ts) == len(seq), (u, len(ts), len(seq))
                seqs.append(seq)
                times.append(ts)
            np.savez(proot / "feed.npz", users=np.asarray(idx, np.int64),
                     offsets=np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
                     items=np.concatenate(seqs), ts=np.concatenate(times), profile=profile[idx])
            pcfg = {
                "pool": str(i), "root": str(proot), "broker": broker_url, "prefix": prefix, "seed": seed,
                "neg": cfg.data.neg, "val_frac": cfg.data.val_frac, "heartbeat_s": heartbeat_s, "backend": backend,
                "feed": str(proot / "feed.npz"),
                "devices": [{"id": self.ids[u], "key": self.keys[self.ids[u]].hex(), "user": int(u),
                             "cold": bool(split.cold[u])} for u in idx],
            }
            (proot / "pool.json").write_text(json.dumps(pcfg))
            self.pools.append(pcfg)
            self.procs.append(None)

    @property
    def keys_path(self) -> Path:
        return self.root / "keys.json"

    def start(self, i: int | None = None) -> None:
        for j in ([i] if i is not None else range(len(self.pools))):
            proot = Path(self.pools[j]["root"])
            log = open(proot / "pool.log", "ab")
            self.procs[j] = subprocess.Popen([edge_python(), "-m", "edge_agent.pool", str(proot / "pool.json")],
                                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        for j, p in enumerate(self.procs):
            if p is not None and p.poll() is not None:
                tail = (Path(self.pools[j]["root"]) / "pool.log").read_text()[-1500:]
                raise DcclError(f"agent pool {j} exited with code {p.returncode}: {tail.strip().splitlines()[-1:] }")

    def kill(self, i: int) -> None:
        """SIGKILL, as a crash or power loss would; `start(i)` brings it back."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs[i] = None

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start(i)
        self.restarts += 1

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for j, p in enumerate(self.procs):
            if p is None:
                continue
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self.procs[j] = None

    def stats(self) -> list[dict]:
        out = []
        for pc in self.pools:
            try:
                out.append(json.loads((Path(pc["root"]) / "stats.json").read_text()))
            except (OSError, ValueError):
                out.append({})
        return out
