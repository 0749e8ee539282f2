"""A seeded SYNTHETIC dataset shaped like the DCCL deployment setting.

Not real data (`name="synthetic"`, `synthetic=True`). What it builds in, and why:

- Zipf-like item popularity and lognormal sequence lengths (min 8): the long tails
  that make tail users the hard case.
- Taste = a part predictable from profile (age, gender, occupation) + an idiosyncratic
  part: a profile encoder helps cold start, on-device personalisation helps the rest.
- Taste drift: each user's taste moves from `z0` to `z1` along the sequence, so the
  device's fresh window carries information the old cloud history does not.
- Item categories follow taste clusters; brands are cluster-specific too.
- Sequential structure: the next item leans toward items similar to the last one.
"""

from __future__ import annotations

import numpy as np

from cloud_trainer.data.dataset import RecDataset

_PROFILE_NAMES = ["age", "gender", "occupation"]
_PROFILE_CARD = [7, 2, 12]          # categories per column, ids 1..card (0 = unknown)


def make_synthetic(
    n_users: int = 600,
    n_items: int = 800,
    seed: int = 0,
    n_clusters: int = 8,
    dim: int = 16,
    mean_len: float = 30.0,
    min_len: int = 8,
    drift: float = 1.0,
) -> RecDataset:
    """Generate the dataset. `drift` in [0, 1]: how far taste moves from start to end."""
    rng = np.random.default_rng(seed)
    d = dim

    # Items: cluster centres, embeddings around them, popularity ~ 1 / rank^0.9.
    centres = 1.5 * rng.normal(size=(n_clusters, d)) / np.sqrt(d)
    cluster = rng.integers(0, n_clusters, n_items)
    emb = (centres[cluster] + 0.7 * rng.normal(size=(n_items, d)) / np.sqrt(d)).astype(np.float32)   # (I, d)
    rank = rng.permutation(n_items) + 1
    log_pop = (-0.9 * np.log(rank)).astype(np.float32)

    # Attributes: a sub-category inside the item's cluster and a cluster-leaning brand.
    n_sub, n_brand = 3, 4                       # per cluster
    sub = cluster * n_sub + rng.integers(0, n_sub, n_items)
    own_brand = rng.random(n_items) < 0.7
    brand = np.where(own_brand, cluster * n_brand + rng.integers(0, n_brand, n_items),
                     rng.integers(0, n_clusters * n_brand, n_items))
    item_attrs = np.zeros((n_items + 1, 2), np.int64)
    item_attrs[1:, 0] = 1 + sub
    item_attrs[1:, 1] = 1 + n_clusters * n_sub + brand
    n_attrs = 1 + n_clusters * (n_sub + n_brand)

    # Users: skewed categorical profile; taste = profile part + idiosyncratic part.
    profile = np.zeros((n_users, len(_PROFILE_CARD)), np.int64)
    taste_profile = np.zeros((n_users, d))
    for j, card in enumerate(_PROFILE_CARD):
        p = rng.dirichlet(np.full(card, 2.0))
        profile[:, j] = 1 + rng.choice(card, n_users, p=p)
        # Each category value leans toward one cluster centre.
        value_taste = centres[rng.integers(0, n_clusters, card)] + rng.normal(size=(card, d)) / np.sqrt(d)
        taste_profile += 0.8 * value_taste[profile[:, j] - 1]
    own = 0.5 * (centres[rng.integers(0, n_clusters, n_users)] + 0.5 * rng.normal(size=(n_users, d)) / np.sqrt(d))
    z0 = taste_profile + own
    # Drift target: another cluster, kept partly in the user's orbit.
    z1 = 0.5 * z0 + centres[rng.integers(0, n_clusters, n_users)] + 0.5 * rng.normal(size=(n_users, d)) / np.sqrt(d)
    z1 = (1 - drift) * z0 + drift * z1

    lengths = np.exp(rng.normal(np.log(mean_len) - 0.32, 0.8, n_users))   # lognormal, mean ~ mean_len
    lengths = np.clip(np.round(lengths), min_len, max(min_len, n_items // 3)).astype(np.int64)

    # Simulate all users step by step; users sorted by length so active users are a prefix.
    order = np.argsort(-lengths, kind="stable")
    lens_sorted = lengths[order]
    z0s, z1s = z0[order].astype(np.float32), z1[order].astype(np.float32)
    seqs_sorted = np.zeros((n_users, int(lens_sorted[0])), np.int64)
    consumed = np.zeros((n_users, n_items), bool)
    last = np.full(n_users, -1)
    taste_w, seq_w = 1.0, 0.7   # tuned: top cluster ~54% of a user's items, profile R^2 ~0.27
    for t in range(int(lens_sorted[0])):
        n_act = int(np.searchsorted(-lens_sorted, -t, side="left"))   # users with length > t
        tau = (t / np.maximum(lens_sorted[:n_act] - 1, 1))[:, None].astype(np.float32)
        z = (1 - tau) * z0s[:n_act] + tau * z1s[:n_act]                           # (U_act, d)
        prev = np.where(last[:n_act, None] >= 0, emb[np.maximum(last[:n_act], 0)], 0.0)
        scores = (taste_w * z + seq_w * prev) @ emb.T + log_pop                    # (U_act, I)
        gumbel = -np.log(rng.standard_exponential((n_act, n_items), dtype=np.float32) + 1e-30)   # Gumbel-max
        scores = np.where(consumed[:n_act], -np.inf, scores + gumbel)
        pick = scores.argmax(1)
        consumed[np.arange(n_act), pick] = True
        last[:n_act] = pick
        seqs_sorted[:n_act, t] = pick + 1

    seqs: list[np.ndarray] = [None] * n_users   # type: ignore[list-item]
    for k, u in enumerate(order):
        seqs[u] = seqs_sorted[k, : lens_sorted[k]].copy()

    return RecDataset(
        name="synthetic", synthetic=True, n_users=n_users, n_items=n_items, sequences=seqs,
        item_attrs=item_attrs, n_attrs=n_attrs, profile=profile,
        profile_vocab=[c + 1 for c in _PROFILE_CARD], profile_names=list(_PROFILE_NAMES),
    )
