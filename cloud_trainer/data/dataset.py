"""`RecDataset`: the in-memory form of every dataset (docs/DESIGN.md, data contract).

Item ids are ``1..n_items`` and ``0`` is padding everywhere; users (= devices) are
``0..n_users-1``. numpy only: the data layer never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dccl.errors import DcclError


@dataclass
class RecDataset:
    name: str                     # "synthetic", "ml-100k", "ml-1m", "amazon"
    synthetic: bool
    n_users: int
    n_items: int
    sequences: list[np.ndarray]   # per user: int64 item ids in time order
    item_attrs: np.ndarray        # [n_items + 1, A] int64 attribute ids (genres, brand, ...), 0 = pad
    n_attrs: int                  # attribute vocabulary size including 0
    profile: np.ndarray           # [n_users, P] int64 categorical profile features, 0 = unknown; P may be 0
    profile_vocab: list[int]      # vocabulary size of each profile column (including 0)
    profile_names: list[str]

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def lengths(self) -> np.ndarray:
        """[n_users] int64 sequence lengths."""
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))

    def summary(self) -> str:
        """One human-readable paragraph; synthetic data is labelled as such."""
        lens = self.lengths()
        label = " (SYNTHETIC data)" if self.synthetic else ""
        density = self.n_interactions / max(1, self.n_users * self.n_items)
        prof = ", ".join(f"{n}[{v}]" for n, v in zip(self.profile_names, self.profile_vocab)) or "none"
        return (
            f"{self.name}{label}: {self.n_users} users, {self.n_items} items, "
            f"{self.n_interactions} interactions (density {density:.4f}); "
            f"sequence length min/median/max {lens.min()}/{int(np.median(lens))}/{lens.max()}; "
            f"item attrs [{self.item_attrs.shape[0]}, {self.item_attrs.shape[1]}] over {self.n_attrs} ids; "
            f"profile: {prof}"
        )

    def validate(self) -> "RecDataset":
        """Check the data contract; raise DcclError naming the first violation. Returns self."""
        where = f"dataset {self.name!r}"

        def fail(msg: str) -> None:
            raise DcclError(f"{where}: {msg}")

        if self.n_users < 1 or self.n_items < 1:
            fail(f"n_users={self.n_users}, n_items={self.n_items}: both must be >= 1")
        if len(self.sequences) != self.n_users:
            fail(f"len(sequences)={len(self.sequences)} but n_users={self.n_users}")
        for u, seq in enumerate(self.sequences):
            if not isinstance(seq, np.ndarray) or seq.dtype != np.int64 or seq.ndim != 1:
                fail(f"sequences[{u}] must be a 1-D int64 array")
            if len(seq) == 0:
                fail(f"user {u} has no interactions")
        flat = np.concatenate(self.sequences)
        if flat.min() < 1 or flat.max() > self.n_items:
            bad = int(np.flatnonzero((flat < 1) | (flat > self.n_items))[0])
            fail(f"item id {int(flat[bad])} out of range 1..{self.n_items} (0 is padding)")

        a = self.item_attrs
        if a.ndim != 2 or a.shape[0] != self.n_items + 1 or a.dtype != np.int64:
            fail(f"item_attrs must be int64 [n_items + 1={self.n_items + 1}, A], got {a.dtype} {a.shape}")
        if a.size and (a[0] != 0).any():
            fail("item_attrs[0] (the padding item) must be all 0")
        if a.size and (a.min() < 0 or a.max() >= self.n_attrs):
            fail(f"item_attrs values must lie in 0..{self.n_attrs - 1} (n_attrs={self.n_attrs})")

        p = self.profile
        P = len(self.profile_vocab)
        if p.ndim != 2 or p.shape != (self.n_users, P) or p.dtype != np.int64:
            fail(f"profile must be int64 [n_users={self.n_users}, P={P}], got {p.dtype} {p.shape}")
        if len(self.profile_names) != P:
            fail(f"profile_names has {len(self.profile_names)} names for {P} profile columns")
        for j, (name, vocab) in enumerate(zip(self.profile_names, self.profile_vocab)):
            col = p[:, j]
            if col.min() < 0 or col.max() >= vocab:
                fail(f"profile column {name!r} has values outside 0..{vocab - 1} (profile_vocab[{j}]={vocab})")
        return self
