"""The deployment split (docs/DESIGN.md): per user, in time order,

    [ cloud history | fresh round 0 | fresh round 1 | ... | fresh round K-1 | future ]

Round r trains the cloud on `[0, a_r)`, the device on its fresh window `[a_r, b_r)`
(the last `val_frac` of it is the device's validation slice), and evaluates on the
future window `[b_r, b_r + T)`. Round r+1's cloud window is round r's cloud + fresh.

Rounding (per user of length n): every fresh window has F = max(1, round(f·n)) items,
the future window T = max(1, round(t·n)), and the cloud history the rest,
C = n - K·F - T (≈ c·n with c = 1 - K·f - t). If C < 1, F then T shrink (never below 1).
A user needs n >= K + 2 (≥ 1 cloud, ≥ 1 per fresh window, ≥ 1 future item); a
shorter user is an error naming the user — we raise rather than silently drop,
because dropped users would change every metric's population.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cloud_trainer.data.dataset import RecDataset
from dccl.errors import DcclError
from dccl.protocol.manifest import val_len

# Window names accepted by `RoundWindows.window` (and the sample builders).
WINDOWS = ("cloud", "fresh", "fresh_train", "val", "cloud+fresh", "future")
N_GROUPS = 5   # activity quintiles, 0 = tail .. 4 = head


@dataclass
class RoundWindows:
    """Index ranges `[start, end)` into each user's sequence for one round; all [n_users]."""

    round: int
    cloud: np.ndarray        # [n_users, 2]  [0, a)                 (empty for cold users)
    fresh: np.ndarray        # [n_users, 2]  [a, b)                 (empty for cold users)
    fresh_train: np.ndarray  # [n_users, 2]  [a, b - V)             fresh minus the validation slice
    val: np.ndarray          # [n_users, 2]  [b - V, b)             the device's validation slice
    future: np.ndarray       # [n_users, 2]  [b, b + T)             evaluation (cold users too)
    group: np.ndarray        # [n_users] int64 activity quintile of b (interactions before future)
    cold: np.ndarray         # [n_users] bool

    def window(self, which: str) -> np.ndarray:
        """[n_users, 2] start/end for a window name in WINDOWS."""
        if which == "cloud+fresh":   # = next round's cloud window: what model-over-data trains on
            return np.stack([self.cloud[:, 0], self.fresh[:, 1]], 1)
        if which not in WINDOWS:
            raise DcclError(f"unknown window {which!r}; valid: {', '.join(WINDOWS)}")
        return getattr(self, which)


@dataclass
class DeploymentSplit:
    rounds: int
    fresh_frac: float
    future_frac: float
    val_frac: float
    cold_frac: float
    seed: int
    cloud_len: np.ndarray    # [n_users] C
    fresh_len: np.ndarray    # [n_users] F (every round)
    val_len: np.ndarray      # [n_users] V (last V of each fresh window)
    future_len: np.ndarray   # [n_users] T
    cold: np.ndarray         # [n_users] bool, seeded; in no training window
    group: np.ndarray        # [rounds, n_users] int64 activity quintile per round

    @property
    def warm(self) -> np.ndarray:
        return ~self.cold

    def round(self, r: int) -> RoundWindows:
        if not 0 <= r < self.rounds:
            raise DcclError(f"round {r} out of range 0..{self.rounds - 1}")
        a = self.cloud_len + r * self.fresh_len
        b = a + self.fresh_len
        e = b + self.future_len
        zero = np.zeros_like(a)
        warm = ~self.cold
        # Cold users' training windows are empty [0, 0); their future window is real.
        def rng(s, t):
            return np.stack([np.where(warm, s, 0), np.where(warm, t, 0)], 1)
        return RoundWindows(
            round=r,
            cloud=rng(zero, a), fresh=rng(a, b), fresh_train=rng(a, b - self.val_len),
            val=rng(b - self.val_len, b), future=np.stack([b, e], 1),
            group=self.group[r], cold=self.cold,
        )

    def since_round0(self, r: int) -> RoundWindows:
        """Round r's windows for a device that still holds the round-0 bundle (device-only strategies,
        whose cloud model never changes): its fresh window is every interaction since that bundle,
        `[a_0, b_r)` — what a board's agent trains on with `train.window` "bundle", since the bundle's
        `local_data.since` stays where it was — and its validation slice the newest `val_len` of that
        window, as the agent's store holds out. Round 0's are `round(0)`'s."""
        w, w0 = self.round(r), self.round(0)
        a, b = w0.fresh[:, 0], w.fresh[:, 1]
        v = val_len(b - a, self.val_frac)
        return replace(w, fresh=np.stack([a, b], 1), fresh_train=np.stack([a, b - v], 1), val=np.stack([b - v, b], 1))

    def summary(self) -> str:
        w = self.warm
        return (
            f"deployment split: {self.rounds} round(s), fresh {self.fresh_frac}, future {self.future_frac}, "
            f"val {self.val_frac} of fresh; {int(w.sum())} warm + {int(self.cold.sum())} cold users; "
            f"per warm user cloud/fresh/future items (median) "
            f"{int(np.median(self.cloud_len[w]))}/{int(np.median(self.fresh_len[w]))}/"
            f"{int(np.median(self.future_len[w]))}"
        )


def activity_group(counts: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Quintile (0 = tail .. 4 = head) of each count within `reference` (warm users' counts).

    Uses the mid-rank, so tied counts always share a group.
    """
    ref = np.sort(reference)
    lo = np.searchsorted(ref, counts, "left")
    hi = np.searchsorted(ref, counts, "right")
    mid = np.maximum((lo + hi - 1) / 2.0, 0.0)
    return np.minimum((N_GROUPS * mid / len(ref)).astype(np.int64), N_GROUPS - 1)


def make_split(
    ds: RecDataset,
    rounds: int = 1,
    fresh_frac: float = 0.2,
    future_frac: float = 0.15,
    val_frac: float = 0.2,
    cold_frac: float = 0.1,
    seed: int = 0,
) -> DeploymentSplit:
    """Deployment split of `ds` over `rounds` rounds; see the module docstring."""
    K = rounds
    if K < 1:
        raise DcclError(f"rounds={rounds}: must be >= 1")
    for name, v in (("fresh_frac", fresh_frac), ("future_frac", future_frac)):
        if not 0 < v < 1:
            raise DcclError(f"{name}={v}: must be in (0, 1)")
    if not 0 <= val_frac < 1 or not 0 <= cold_frac < 1:
        raise DcclError(f"val_frac={val_frac}, cold_frac={cold_frac}: each must be in [0, 1)")
    if K * fresh_frac + future_frac >= 1:
        raise DcclError(
            f"rounds·fresh_frac + future_frac = {K}·{fresh_frac} + {future_frac} >= 1: no cloud history left")

    n = ds.lengths()
    short = np.flatnonzero(n < K + 2)
    if len(short):
        u = int(short[0])
        raise DcclError(
            f"{ds.name}: user {u} has {n[u]} interactions; {K} round(s) need >= {K + 2} "
            f"(1 cloud + {K} fresh + 1 future); {len(short)} user(s) too short — use fewer rounds")

    F = np.maximum(1, np.round(fresh_frac * n)).astype(np.int64)
    T = np.maximum(1, np.round(future_frac * n)).astype(np.int64)
    # Shrink F, then T, for users whose cloud history would be empty (short sequences).
    deficit = np.maximum(0, 1 - (n - K * F - T))
    cut_f = np.minimum(F - 1, -(-deficit // K))          # ceil(deficit / K), at most F - 1
    F -= cut_f
    deficit = np.maximum(0, 1 - (n - K * F - T))
    T -= np.minimum(T - 1, deficit)
    C = n - K * F - T
    assert (C >= 1).all()

    V = val_len(F, val_frac)

    rng = np.random.default_rng(seed)
    cold = np.zeros(ds.n_users, bool)
    cold[rng.permutation(ds.n_users)[: int(round(cold_frac * ds.n_users))]] = True
    if cold.all():
        raise DcclError(f"cold_frac={cold_frac} leaves no warm users among {ds.n_users}")

    # Activity: interactions before the future window, b_r = C + (r+1)·F; quintiles over warm users.
    group = np.stack([
        activity_group(C + (r + 1) * F, (C + (r + 1) * F)[~cold]) for r in range(K)
    ])
    return DeploymentSplit(
        rounds=K, fresh_frac=fresh_frac, future_frac=future_frac, val_frac=val_frac,
        cold_frac=cold_frac, seed=seed, cloud_len=C, fresh_len=F, val_len=V, future_len=T,
        cold=cold, group=group,
    )
