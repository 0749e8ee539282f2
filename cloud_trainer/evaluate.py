"""Ranking metrics on the future window, per user and pooled, plus paired bootstrap CIs.

Every future positive is ranked against the same seeded negatives for every strategy (EvalSet).
Scoring de-duplicates (user, item) pairs: a user's history is the same for all its future rows,
so each distinct candidate of a user is scored once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from cloud_trainer.data.split import N_GROUPS

# scorer(user [N], item [N], hist [N, L]) -> logits [N]
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
METRICS = ("auc", "gauc", "hr@10", "ndcg@10")
K = 10


def score_eval_set(ev, scorer: Scorer) -> np.ndarray:
    """[M, 1 + n_neg] scores of every candidate of every row."""
    M, C = ev.candidates.shape
    user = np.repeat(ev.user, C)
    item = ev.candidates.reshape(-1)
    # One row per distinct (user, item): history depends only on the user here.
    key = user.astype(np.int64) * (int(item.max()) + 1) + item
    uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    row = first // C  # an EvalSet row that holds this pair (for its hist)
    scores = scorer(user[first], item[first], ev.hist[row])
    return np.asarray(scores, dtype=np.float64)[inverse].reshape(M, C)


def per_row(scores: np.ndarray) -> dict[str, np.ndarray]:
    """Each row's positive ranked against its negatives. A NaN score (a diverged model) counts as
    the worst case — a NaN positive below every negative, a NaN negative above the positive —
    never as a tie or a win: compared as plain floats, an all-NaN model would rank every positive first."""
    pos, neg = scores[:, :1], scores[:, 1:]
    bad = np.isnan(pos) | np.isnan(neg)
    higher = ((neg > pos) | bad).sum(1)
    ties = (neg == pos).sum(1)
    rank = higher + 0.5 * ties  # 0 = ranked first
    return {
        "row_auc": 1.0 - (higher + 0.5 * ties) / neg.shape[1],
        "hr@10": (rank < K).astype(np.float64),
        "ndcg@10": np.where(rank < K, 1.0 / np.log2(rank + 2.0), 0.0),
    }


def per_user(ev, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics per user (users with ≥ 1 future row): arrays aligned with the returned 'user'."""
    rows = per_row(scores)
    users, inv = np.unique(ev.user, return_inverse=True)
    count = np.bincount(inv).astype(np.float64)

    def mean(x):
        return np.bincount(inv, weights=x) / count

    # Per-user AUC over all (positive, negative) pairs of the user. Every row of a user holds one
    # positive against the user's same negatives (EvalSet), so that AUC is exactly the mean of the
    # rows' positive-vs-negatives AUCs (tests/test_experiment.py checks it against sklearn).
    gauc = mean(rows["row_auc"])
    order = np.argsort(inv, kind="stable")
    bounds = np.searchsorted(inv[order], np.arange(len(users) + 1))
    first_row = order[bounds[:-1]]
    return {
        "user": users,
        "gauc": gauc,
        "hr@10": mean(rows["hr@10"]),
        "ndcg@10": mean(rows["ndcg@10"]),
        "group": ev.group[first_row],
        "cold": ev.cold[first_row],
    }


def summarize(ev, scores: np.ndarray) -> dict:
    """Overall / per activity group / cold-start metrics. AUC pools every (positive, negative) pair
    of the subset; gAUC averages per-user AUC; HR/NDCG average over future positives."""
    rows = per_row(scores)
    pu = per_user(ev, scores)

    def block(row_mask: np.ndarray, user_mask: np.ndarray) -> dict:
        if not row_mask.any():
            return {m: float("nan") for m in METRICS} | {"users": 0, "rows": 0}
        s = scores[row_mask]
        y = np.zeros_like(s)
        y[:, 0] = 1.0
        return {
            "auc": float(roc_auc_score(y.reshape(-1), s.reshape(-1))),
            "gauc": float(pu["gauc"][user_mask].mean()),
            "hr@10": float(rows["hr@10"][row_mask].mean()),
            "ndcg@10": float(rows["ndcg@10"][row_mask].mean()),
            "users": int(user_mask.sum()),
            "rows": int(row_mask.sum()),
        }

    warm_r, warm_u = ~ev.cold, ~pu["cold"]
    out = {"overall": block(warm_r, warm_u), "cold": block(ev.cold, pu["cold"])}
    out["groups"] = {
        str(g): block(warm_r & (ev.group == g), warm_u & (pu["group"] == g)) for g in range(N_GROUPS)
    }
    return out


def paired_ci(diff: np.ndarray, seed: int = 0, n_resamples: int = 2000) -> dict:
    """Mean of paired per-user differences with a 95% percentile bootstrap CI (users resampled)."""
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    if len(diff) < 2:
        return {"mean": float(diff.mean()) if len(diff) else float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "n": int(len(diff))}
    res = stats.bootstrap((diff,), np.mean, confidence_level=0.95, n_resamples=n_resamples,
                          method="percentile", random_state=np.random.default_rng(seed))
    return {"mean": float(diff.mean()), "ci_low": float(res.confidence_interval.low),
            "ci_high": float(res.confidence_interval.high), "n": int(len(diff))}


def choose_within_noise(scores: dict) -> object:
    """The one-standard-error rule over per-user validation scores: the first option (in the caller's
    order of preference: fewer device steps, cheaper settings, the listed policy) whose mean lies within
    one standard error of the paired per-user difference from the best option's. Choices that the
    validation users cannot tell apart then no longer flip with float noise (thread count, reduction
    order), and the simpler option wins them."""
    means = mean_scores(scores)
    best = max(means, key=means.get)
    for key, per in scores.items():
        diff = paired_difference(per, scores[best])
        if diff["n"] < 2:
            continue
        if diff["mean"] >= -diff["se"]:
            return key
    return best


def paired_difference(per: np.ndarray, ref: np.ndarray) -> dict:
    """Mean and standard error of the per-user difference `per − ref` over users scored by both."""
    ok = np.isfinite(per) & np.isfinite(ref)
    diff = per[ok] - ref[ok]
    n = len(diff)
    return {"mean": float(diff.mean()) if n else float("nan"),
            "se": float(diff.std(ddof=1) / np.sqrt(n)) if n >= 2 else float("nan"), "n": n}


def mean_scores(scores: dict) -> dict:
    """Per-user validation gAUCs -> their means (what results.json records)."""
    return {k: float(np.nanmean(v)) for k, v in scores.items()}
