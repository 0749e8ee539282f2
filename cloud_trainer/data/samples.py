"""Training samples and evaluation sets, as numpy arrays (docs/DESIGN.md).

Negatives are a pure function of (seed, user, position in the user's sequence): a
counter-based hash (splitmix64) instead of a stateful generator, so the same positive
gets the same negatives whatever the window, round, strategy or call order. They are
drawn uniformly from the items the user never interacted with (whole sequence,
future included) by mapping a uniform index onto the complement of the user's items.

Rows are ordered by user, then by position in the user's sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Iterator, TypeVar

import numpy as np

from cloud_trainer.data.dataset import RecDataset
from cloud_trainer.data.split import RoundWindows
from dccl.errors import DcclError

DEFAULT_MAX_LEN = 20   # L: 50 would make Amazon's cloud samples [650k, 50] int64 = 260 MB
_TRAIN_STREAM, _EVAL_STREAM = 1, 2   # separate hash streams: training and eval negatives differ


@dataclass
class CTRSamples:            # training samples: each positive + `neg` seeded sampled negatives
    user: np.ndarray         # [N] int64
    item: np.ndarray         # [N] int64
    hist: np.ndarray         # [N, L] int64 last L items before the positive, right-aligned, 0-padded
    label: np.ndarray        # [N] float32

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class EvalSet:               # each future positive vs `n_neg` seeded non-interacted items
    user: np.ndarray         # [M] int64
    hist: np.ndarray         # [M, L] int64 last L items before the evaluated window
    candidates: np.ndarray   # [M, 1 + n_neg] int64; column 0 is the positive
    group: np.ndarray        # [M] int64 activity quintile of the user (0 = tail .. 4 = head)
    cold: np.ndarray         # [M] bool, the user is a cold-start user

    def __len__(self) -> int:
        return len(self.user)


# ----------------------------------------------------------------------------- internals

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _row_keys(seed: int, stream: int, user: np.ndarray, pos: np.ndarray) -> np.ndarray:
    h = _mix(np.full(len(user), (seed * 1_000_003 + stream) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    h = _mix(h ^ user.astype(np.uint64))
    return _mix(h + _GOLDEN * (pos.astype(np.uint64) + np.uint64(1)))


def _uniform(keys: np.ndarray, n: int, offset: int) -> np.ndarray:
    """[R, n] uniforms in [0, 1), column k from counter offset + k of each row's key."""
    ctr = np.arange(offset + 1, offset + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(keys[:, None] + _GOLDEN * ctr[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Index:
    """Flat view of all sequences + the sorted item set of each user, for fast gathers."""

    def __init__(self, ds: RecDataset):
        self.n_items = ds.n_items
        self.lens = ds.lengths()
        self.offset = np.concatenate([[0], np.cumsum(self.lens)[:-1]])
        self.flat = np.concatenate(ds.sequences)
        user = np.repeat(np.arange(ds.n_users), self.lens)
        # Sorted unique (user, item) pairs; `adj` = how many non-interacted ids precede each item.
        key = np.unique(user * (ds.n_items + 1) + self.flat)
        su, si = key // (ds.n_items + 1), key % (ds.n_items + 1)
        self.n_seen = np.bincount(su, minlength=ds.n_users)
        self.seen_start = np.concatenate([[0], np.cumsum(self.n_seen)[:-1]])
        rank = np.arange(len(key)) - self.seen_start[su]
        self.adj_key = su * (ds.n_items + 1) + (si - 1 - rank)    # non-decreasing
        self.seen_key = key

    def hist(self, user: np.ndarray, end: np.ndarray, L: int) -> np.ndarray:
        """[R, L] items at positions [end - L, end) of each user's sequence, 0 where < 0."""
        rel = end[:, None] + np.arange(-L, 0)[None, :]                                 # (R, L)
        idx = self.offset[user][:, None] + rel
        return np.where(rel >= 0, self.flat[np.maximum(idx, 0)], 0)

    def complement(self, user: np.ndarray, k: np.ndarray) -> np.ndarray:
        """The k-th (0-based) item id that user never interacted with; user [R], k [R, n]."""
        base = (user * (self.n_items + 1))[:, None]
        # k-th non-interacted id = k + 1 + #{interacted items whose adj <= k}
        below = np.searchsorted(self.adj_key, base + k, "right") - self.seen_start[user][:, None]
        return k + 1 + below

    def negatives(self, seed: int, stream: int, user: np.ndarray, pos: np.ndarray, n: int,
                  distinct: bool) -> np.ndarray:
        """[R, n] negatives per (user, pos) row, a pure function of (seed, stream, user, pos)."""
        free = self.n_items - self.n_seen[user]                                         # (R,)
        if len(user) and free.min() < (n if distinct else 1):
            u = int(user[np.argmin(free)])
            raise DcclError(f"user {u} has only {free.min()} non-interacted items; {n} negatives needed")
        keys = _row_keys(seed, stream, user, pos)
        if not distinct:
            k = (_uniform(keys, n, 0) * free[:, None]).astype(np.int64)
            return self.complement(user, k)
        # Without replacement: each row takes the first n distinct values of its own counter
        # stream, so the result does not depend on which other rows are in the call.
        out_k = np.zeros((len(user), n), np.int64)
        todo, pool = np.arange(len(user)), np.zeros((len(user), 0), np.int64)
        offset, width = 0, n + max(8, n // 4)
        while len(todo):
            draw = (_uniform(keys[todo], width, offset) * free[todo, None]).astype(np.int64)
            pool = np.concatenate([pool, draw], 1)
            first, ok = _first_distinct(pool, n)
            out_k[todo[ok]] = first[ok]
            todo, pool = todo[~ok], pool[~ok]
            offset += width
        out = np.empty_like(out_k)
        for lo in range(0, len(user), 65536):   # chunked: searchsorted on [R, n] is memory-bound
            sl = slice(lo, lo + 65536)
            out[sl] = self.complement(user[sl], out_k[sl])
        return out


def _first_distinct(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """First n distinct values of each row of k [R, W] in column order; ok [R] if a row has n."""
    order = np.argsort(k, axis=1, kind="stable")      # stable: the first occurrence stays first
    srt = np.take_along_axis(k, order, 1)
    dup_sorted = np.zeros(k.shape, bool)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup = np.empty_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, 1)
    keep = ~dup & (np.cumsum(~dup, 1) <= n)
    ok = keep.sum(1) == n
    first = np.zeros((len(k), n), np.int64)
    first[ok] = k[ok][keep[ok]].reshape(-1, n)
    return first, ok


def _positions(win: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand [n_users, 2] ranges to (user [R], position [R]) rows, ordered by user then position."""
    n = win[:, 1] - win[:, 0]
    user = np.repeat(np.arange(len(win)), n)
    first_row = np.concatenate([[0], np.cumsum(n)[:-1]])
    pos = np.arange(n.sum()) - np.repeat(first_row - win[:, 0], n)
    return user, pos


# ----------------------------------------------------------------------------- public


def build_ctr_samples(
    ds: RecDataset,
    windows: RoundWindows,
    which: str = "cloud",
    neg: int = 4,
    max_len: int = DEFAULT_MAX_LEN,
    seed: int = 0,
) -> CTRSamples:
    """Training samples for window `which` of every user ("cloud", "fresh", "fresh_train",
    "val", "cloud+fresh", ...): each positive, then its `neg` negatives (with replacement),
    all with hist = the last `max_len` items strictly before the positive.

    Change `seed` per epoch for fresh negatives; the same seed gives identical samples.
    """
    if neg < 0 or max_len < 1:
        raise DcclError(f"neg={neg}, max_len={max_len}: need neg >= 0 and max_len >= 1")
    idx = _Index(ds)
    user, pos = _positions(windows.window(which))
    G = 1 + neg                                                    # rows per positive
    items = np.empty((len(user), G), np.int64)
    items[:, 0] = idx.flat[idx.offset[user] + pos]
    if neg:
        items[:, 1:] = idx.negatives(seed, _TRAIN_STREAM, user, pos, neg, distinct=False)
    label = np.zeros((len(user), G), np.float32)
    label[:, 0] = 1.0
    hist = idx.hist(user, pos, max_len)                            # (R, L)
    return CTRSamples(
        user=np.repeat(user, G), item=items.reshape(-1),
        hist=np.repeat(hist, G, axis=0), label=label.reshape(-1),
    )


def build_eval_set(
    ds: RecDataset,
    windows: RoundWindows,
    which: str = "future",
    n_neg: int = 100,
    max_len: int = DEFAULT_MAX_LEN,
    seed: int = 0,
) -> EvalSet:
    """Each positive in window `which` ("future" or "val") vs the user's `n_neg` distinct negatives.

    hist is the last `max_len` items before the window starts (the state at deployment),
    so it never holds an item of the evaluated window. Cold users are included, flagged.
    """
    if n_neg < 1 or max_len < 1:
        raise DcclError(f"n_neg={n_neg}, max_len={max_len}: both must be >= 1")
    idx = _Index(ds)
    win = windows.window(which)
    user, pos = _positions(win)
    cand = np.empty((len(user), 1 + n_neg), np.int64)
    cand[:, 0] = idx.flat[idx.offset[user] + pos]
    # One fixed negative set per user and window (keyed by the window start): every future positive
    # of a user is ranked against the same items, and a user's distinct candidates are scored once.
    users, first = np.unique(user, return_index=True)
    negs = idx.negatives(seed, _EVAL_STREAM, users, win[users, 0], n_neg, distinct=True)
    cand[:, 1:] = negs[np.searchsorted(users, user)]
    return EvalSet(
        user=user, hist=idx.hist(user, win[user, 0], max_len), candidates=cand,
        group=windows.group[user], cold=windows.cold[user],
    )


S = TypeVar("S", CTRSamples, EvalSet)


def take(samples: S, rows: np.ndarray) -> S:
    """Rows `rows` (indices or a bool mask) of a CTRSamples / EvalSet."""
    return replace(samples, **{f.name: getattr(samples, f.name)[rows] for f in fields(samples)})


def user_rows(samples: S, user: int) -> S:
    """One user's rows (rows are sorted by user), e.g. a device's local training data."""
    lo, hi = np.searchsorted(samples.user, [user, user + 1])
    return take(samples, np.arange(lo, hi))


def iterate_batches(samples: S, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[S]:
    """Yield batches (the last one may be smaller); `seed` fixes the shuffle order."""
    order = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
    for lo in range(0, len(order), batch_size):
        yield take(samples, order[lo: lo + batch_size])
