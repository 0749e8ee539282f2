"""Evaluation metrics, strategies end to end on tiny synthetic data, and the experiment CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cloud_trainer.config import build_config
from cloud_trainer.context import build_context
from cloud_trainer.data import build_eval_set, make_split, make_synthetic
from cloud_trainer.evaluate import paired_ci, per_row, per_user, score_eval_set
from cloud_trainer.experiment import run_experiment, write_outputs
from dccl.errors import DcclError

REPO = Path(__file__).resolve().parents[1]
DCCL = [sys.executable, "-m", "dccl.cli"]


@pytest.fixture(scope="module")
def tiny_ds():
    return make_synthetic(n_users=80, n_items=120, seed=3)


def test_user_auc_equals_sklearn_per_user(tiny_ds):
    ev = build_eval_set(tiny_ds, make_split(tiny_ds, rounds=1, seed=1).round(0), n_neg=30, max_len=5, seed=2)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(tiny_ds.n_users, tiny_ds.n_items + 1))
    scores = score_eval_set(ev, lambda u, i, h: table[u, i])
    pu = per_user(ev, scores)
    for j, u in enumerate(pu["user"]):
        s = scores[ev.user == u]
        y = np.zeros_like(s)
        y[:, 0] = 1
        assert pu["gauc"][j] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()), abs=1e-12)


def test_rank_metrics_on_known_scores():
    scores = np.array([[5.0, 1, 2, 3], [0.0, 1, 2, 3], [2.5, 1, 2, 3]])
    rows = per_row(scores)
    assert rows["row_auc"] == pytest.approx([1.0, 0.0, 2 / 3])
    assert rows["ndcg@10"][0] == 1.0 and rows["ndcg@10"][1] == pytest.approx(1 / np.log2(5))
    assert rows["hr@10"].tolist() == [1, 1, 1]


def test_a_nan_score_ranks_worst_never_first():
    """A diverged model's NaN scores must not win: compared as plain floats they rank every positive
    first (gAUC 1), and a validation choice among candidates would pick the diverged one."""
    rows = per_row(np.array([[np.nan, 1, 2, 3], [4.0, np.nan, 2, 3], [np.nan] * 4]))
    assert rows["row_auc"] == pytest.approx([0.0, 2 / 3, 0.0])
    assert rows["ndcg@10"][0] == pytest.approx(1 / np.log2(5))


def test_score_eval_set_scores_each_distinct_candidate_once(tiny_ds):
    ev = build_eval_set(tiny_ds, make_split(tiny_ds, rounds=1, seed=1).round(0), n_neg=20, max_len=5, seed=2)
    calls = []

    def scorer(u, i, h):
        calls.append(len(u))
        return (u * 1000 + i).astype(float)

    s = score_eval_set(ev, scorer)
    assert (s == ev.user[:, None] * 1000 + ev.candidates).all()
    assert sum(calls) == len({(u, i) for u, row in zip(ev.user, ev.candidates) for i in row})


def test_tail_vs_head_holds_only_where_the_tail_gains():
    """The tail-vs-head rows need a gain on the tail: where both groups lose, the tail losing less is
    no gain (Amazon Beauty, session 14: −0.0004 on the tail, −0.0033 on the head, tail − head +0.0029
    with its CI above zero — once marked as held)."""
    from cloud_trainer.experiment import tail_claim

    rng = np.random.default_rng(0)
    tail_loses_less = {"mean": 0.003, "ci_low": 0.002, "ci_high": 0.004, "n": 600,
                       "tail_gain": paired_ci(-0.0004 + 0.001 * rng.normal(size=300))}
    assert tail_loses_less["tail_gain"]["ci_high"] < 0
    assert not tail_claim("c", "cmp", tail_loses_less)["holds"]
    tail_gains_more = {**tail_loses_less, "tail_gain": paired_ci(0.004 + 0.001 * rng.normal(size=300))}
    assert tail_claim("c", "cmp", tail_gains_more)["holds"]
    head_gains_more = {**tail_gains_more, "mean": -0.003, "ci_low": -0.004, "ci_high": -0.002}
    assert not tail_claim("c", "cmp", head_gains_more)["holds"]


def test_each_claim_row_reports_every_seeds_own_difference():
    """The claims' CIs are over users, pooled over seeds; each row also carries each seed's own mean
    difference (`per_seed`), the spread between training runs that the CI leaves out, and the table
    prints it: here seed 0 gains and seed 1 loses, and the pooled CI alone would not show it."""
    from cloud_trainer.experiment import claims, table_markdown

    rng = np.random.default_rng(0)
    n = 200
    group = np.repeat(np.arange(5), n // 5)
    cold = np.zeros(n, bool)
    cold[::10] = True

    def row(gauc):
        return [{"user": np.arange(n), "cold": cold, "group": group, "gauc": gauc}]

    base = [0.8 + 0.01 * rng.normal(size=n) for _ in range(2)]
    shift = [np.where(group == 0, 0.004, 0.001), np.where(group == 0, -0.002, -0.001)]
    users = {"stale": [row(b) for b in base], "metapatch": [row(b + d) for b, d in zip(base, shift)],
             "full-patch": [row(b) for b in base], "dccl": [row(b + 2 * d) for b, d in zip(base, shift)]}
    out = {c["claim"]: c for c in claims(users, dict.fromkeys(users), 0)}
    alone = out["device models beat the cloud model they started from (MetaPatch alone)"]
    warm = ~cold
    expect = [float(d[warm].mean()) for d in shift]
    assert alone["per_seed"] == pytest.approx(expect, abs=1e-12) and expect[0] > 0 > expect[1]
    assert alone["mean"] == pytest.approx(np.mean(expect), abs=1e-12)
    tail = out["MetaPatch beats per-user full patches on the tail group"]
    assert tail["per_seed"] == pytest.approx([0.004, -0.002], abs=1e-12)
    th = out["the gain on the tail group is at least the gain on the head group"]
    assert th["per_seed"] == pytest.approx([0.008 - 0.002, -0.004 + 0.002], abs=1e-12)
    text = table_markdown({"dataset": "d", "strategies": {}, "claims": list(out.values())},
                          build_config({"rounds": 1, "seeds": 2}))
    assert "| +0.0040, -0.0020 |" in text


def test_paired_ci():
    rng = np.random.default_rng(1)
    up = paired_ci(0.05 + 0.01 * rng.normal(size=300))
    assert up["ci_low"] > 0.04 and up["ci_high"] < 0.06
    null = paired_ci(0.01 * rng.normal(size=300))
    assert null["ci_low"] < 0 < null["ci_high"]


def tiny_config(**kw):
    return build_config({
        "dataset": "synthetic", "rounds": 2, "seeds": 1, "tune_steps": [0, 2], "tune_momodistill": [{"lam": 0.5, "kd_extra": 0}, {"lam": 1.0, "kd_extra": 1}],
        "data.synthetic_users": 80, "data.synthetic_items": 120, "data.max_len": 6, "data.eval_negatives": 30,
        "cloud.emb_dim": 8, "cloud.mlp_hidden": [16, 8], "cloud.attn_hidden": 8, "cloud.pretrain_epochs": 1,
        "cloud.update_epochs": 1, "metapatch.phi_dim": 8, "meta.epochs": 1, "meta.inner_steps": 2,
        "momodistill.step1_epochs": 1, **kw})


def test_every_strategy_runs_end_to_end_and_reports(tiny_ds, tmp_path):
    cfg = tiny_config(tune_upload_steps=True)
    res = run_experiment(cfg, tiny_ds, progress=False)
    keys = {"stale", "model-over-data", "full-patch", "metapatch", "bundle-in", "dccl-upload", "momodistill",
            "dccl-start", "dccl", "fedavg-patches"}
    assert set(res["strategies"]) == keys
    for key, s in res["strategies"].items():
        assert len(s["rounds"]) == 2
        e = s["rounds"][1]
        assert 0 < e["overall"]["gauc"]["mean"] <= 1 and set(e["groups"]) == {"0", "1", "2", "3", "4"}
        if key not in ("stale", "model-over-data"):
            g = s["gain_vs"]["stale"]["overall"]["gauc"]
            assert g["ci_low"] <= g["mean"] <= g["ci_high"]
    assert {c["claim"] for c in res["claims"]} >= {
        "MoMoDistill beats model-over-data on the same data and epochs",
        "device models beat the cloud model they started from (on fresh data it has not seen)",
        "device models beat the cloud model they started from (on data it has trained on)",
        "device models beat the cloud model they started from (MetaPatch alone)"}
    # Each claim's statistic is the paired comparison it names, e.g. MetaPatch alone = the metapatch row's
    # gain over stale (warm users, last round).
    (mp,) = [c for c in res["claims"] if c["claim"].endswith("(MetaPatch alone)")]
    assert mp["mean"] == res["strategies"]["metapatch"]["gain_vs"]["stale"]["overall"]["gauc"]["mean"]
    # Tail − head, over the stale model and over model-over-data: dccl's gain on quintile 0 minus its gain
    # on quintile 4, each the per-group paired gain the results report.
    for base, suffix in (("stale", ""), ("model-over-data", " (over model-over-data)")):
        (th,) = [c for c in res["claims"] if c["claim"] == "the gain on the tail group is at least the gain on the "
                 "head group" + suffix]
        g = res["strategies"]["dccl"]["gain_vs"][base]["groups"]
        assert th["mean"] == pytest.approx(g["0"]["gauc"]["mean"] - g["4"]["gauc"]["mean"], abs=1e-12)
        assert th["ci_low"] <= th["mean"] <= th["ci_high"]
        assert th["tail_gain"]["mean"] == pytest.approx(g["0"]["gauc"]["mean"], abs=1e-12)
        assert th["holds"] == (th["ci_low"] > 0 and th["tail_gain"]["ci_low"] > 0)
    # Round 0's devices start from the pretrained model, which is the stale one.
    assert res["strategies"]["bundle-in"]["rounds"][0]["overall"] == res["strategies"]["stale"]["rounds"][0]["overall"]
    assert res["tuning"]["device.steps"]["chosen"] in (0, 2)
    assert res["tuning"]["momodistill"]["chosen"] in ({"lam": 0.5, "kd_extra": 0}, {"lam": 1.0, "kd_extra": 1})
    # The start policy: every option scored on the validation slices, the best one chosen (or one listed
    # before it that validation could not tell from it: choose_within_noise) and used.
    start = res["tuning"]["start"]
    assert set(start["val_gauc"]) == {"warm=encoder", "warm=previous", "warm=zero", "cold=encoder", "cold=zero"}
    for which in ("warm", "cold"):
        options = [k for k in start["val_gauc"] if k.startswith(which)]
        best = max(options, key=start["val_gauc"].get)
        assert options.index(f"{which}={start['chosen'][which]}") <= options.index(best)
    assert {k: res["config"]["start"][k] for k in ("warm", "cold")} == start["chosen"]
    # The budget of devices on a new MoMoDistill bundle, chosen on the replayed round-0 bundle.
    bundle = res["tuning"]["bundle_device.steps"]
    assert set(bundle["val_gauc"]) == {0, 2} and res["config"]["bundle_steps"] == bundle["chosen"] in (0, 2)
    # Step 2's device balance and target, chosen on the same slices (the first pair listed unless another
    # is clearly better), and used.
    s2 = res["tuning"]["momodistill.step2"]
    pairs = [json.loads(k) for k in s2["val_gauc"]]
    assert pairs == [{"step2_balance": b, "step2_target": t} for b in (0.0, 1.0) for t in ("device", "delta")]
    best = max(s2["val_gauc"], key=s2["val_gauc"].get)
    assert pairs.index(s2["chosen"]) <= pairs.index(json.loads(best))
    assert {k: res["config"]["momodistill"][k] for k in s2["chosen"]} == s2["chosen"]
    # The upload session's budget on a MoMoDistill bundle, chosen on round 1's validation slices
    # (tune_upload_steps; off by default, and then not chosen: test_the_upload_session_...).
    upload = res["tuning"]["upload_device.steps"]
    assert set(upload["val_gauc"]) == {0, 2} and res["config"]["upload_steps"] == upload["chosen"] in (0, 2)
    write_outputs(res, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "results.md").read_text()
    assert saved["synthetic"] is True and "SYNTHETIC" in report
    # The report shows what tuning chose, with every option's validation score.
    assert f"- device.steps: **{res['tuning']['device.steps']['chosen']}** (0: " in report
    assert "- momodistill, chosen anew (seed 0): round 2: " in report
    assert (tmp_path / "gauc_per_round.png").stat().st_size > 1000
    assert (tmp_path / "gain_by_activity_group.png").stat().st_size > 1000


def test_devices_on_a_new_bundle_train_with_the_bundle_budget(tiny_ds):
    """DCCL's second device session of a round uses `bundle_steps`, the upload session `device.steps`:
    with no steps on the new bundle, the DCCL devices are exactly their starting φ."""
    cfg = tiny_config(strategies=["dccl"], tune=False, bundle_steps=0, **{"device.steps": 3})
    res = run_experiment(cfg, tiny_ds, progress=False)["strategies"]
    for r in range(2):
        assert res["dccl"]["rounds"][r]["overall"] == res["dccl-start"]["rounds"][r]["overall"]
    # ... while the upload session trained (3 steps): its models differ from the bundle they hold.
    assert res["dccl-upload"]["rounds"][0]["overall"] != res["bundle-in"]["rounds"][0]["overall"]
    assert tiny_config(tune=False).bundle_device().steps == tiny_config(tune=False).device.steps


def test_metapatch_devices_continue_from_their_own_phi_on_the_bundle_they_keep(tiny_ds, monkeypatch):
    """MetaPatch alone never gets a new bundle: round 0 starts from the encoder's cold φ, round 1 from
    the φ each device ended round 0 with, whatever start policy DCCL's new bundles use."""
    import cloud_trainer.strategies as S

    starts, ends = [], []

    def recording(model, phi0, train, val, cfg, **kw):
        out = personalize_all(model, phi0, train, val, cfg, **kw)
        starts.append(phi0.clone())
        ends.append(out[0].clone())
        return out

    personalize_all = S.personalize_all
    monkeypatch.setattr(S, "personalize_all", recording)
    cfg = tiny_config(strategies=["metapatch"], tune=False, **{"device.steps": 3, "start.warm": "encoder"})
    run_experiment(cfg, tiny_ds, progress=False)
    assert len(starts) == 2 * cfg.seeds
    for seed in range(cfg.seeds):
        r0_start, r0_end, r1_start = starts[2 * seed], ends[2 * seed], starts[2 * seed + 1]
        assert r0_start.abs().sum() > 0 and not torch.equal(r0_start, r0_end)  # encoder start, then trained
        assert torch.equal(r1_start, r0_end)


@pytest.mark.parametrize("strategy", ["metapatch", "full-patch"])
def test_device_only_strategies_train_on_every_interaction_since_the_bundle_they_keep(tiny_ds, strategy, monkeypatch):
    """A device-only strategy keeps round 0's bundle, so — as a board's agent does with the bundle's
    `local_data.since` unchanged — round 1 trains on round 0's and round 1's fresh windows, the newest
    part held out for validation (`split.since_round0`), not on round 1's window alone."""
    import cloud_trainer.strategies as S
    from cloud_trainer.context import build_context

    cfg = tiny_config(strategies=[strategy], tune=False, **{"device.steps": 2, "full_patch_device.steps": 2})
    ctx = build_context(tiny_ds, cfg, 0)
    seen = []

    def recording(model, phi0, train, val, dcfg, **kw):
        seen.append((train, val))
        return personalize_all(model, phi0, train, val, dcfg, **kw)

    personalize_all = S.personalize_all
    s = S.REGISTRY[strategy]()
    s.setup(ctx)
    monkeypatch.setattr(S, "personalize_all", recording)
    for r in range(2):
        s.run_round(ctx, r, lambda key, scorer: None)
    assert len(seen) == 2
    assert seen[0][0] is ctx.rounds[0].fresh_train and seen[0][1] is ctx.rounds[0].val

    def positives(batch):   # {user: [items]} of the positive rows, in row order
        out = {}
        for u, i, y in zip(batch["owner"].tolist(), batch["item"].tolist(), batch["label"].tolist()):
            if y == 1:
                out.setdefault(u, []).append(i)
        return out

    kw = ctx.split.since_round0(1)
    train, val = map(positives, seen[1])
    warm = np.flatnonzero(ctx.split.warm)
    assert sorted(train) == sorted(warm.tolist())
    for u in warm:
        seq = tiny_ds.sequences[u]
        assert train[u] == list(seq[kw.fresh_train[u, 0]:kw.fresh_train[u, 1]])
        assert val.get(u, []) == list(seq[kw.val[u, 0]:kw.val[u, 1]])
        # round 0's whole window first, then round 1's
        assert (train[u] + val.get(u, []))[: ctx.split.fresh_len[u]] == list(seq[ctx.split.round(0).fresh[u, 0]:
                                                                                  ctx.split.round(0).fresh[u, 1]])
    assert sum(map(len, train.values())) > len(positives(ctx.rounds[1].fresh_train)) and ctx.cfg.data.val_frac > 0


def _record_device_configs(monkeypatch, what) -> list:
    """`what(cfg)` of every device session the strategies run (strategies.personalize_all), in order."""
    import cloud_trainer.strategies as S

    seen, real = [], S.personalize_all

    def recording(model, phi0, train, val, cfg, **kw):
        seen.append(what(cfg))
        return real(model, phi0, train, val, cfg, **kw)

    monkeypatch.setattr(S, "personalize_all", recording)
    return seen


def test_the_upload_session_on_a_momodistill_bundle_has_its_own_budget(tiny_ds, monkeypatch):
    """`upload_steps` is the upload session's budget from round 1 on (devices on a MoMoDistill
    bundle); round 0's upload session, on the stale model, keeps `device.steps`."""
    budgets = _record_device_configs(monkeypatch, lambda cfg: cfg.steps)
    cfg = tiny_config(strategies=["dccl"], tune=False, upload_steps=0, bundle_steps=2, **{"device.steps": 3})
    run_experiment(cfg, tiny_ds, progress=False)
    assert budgets == [3, 2, 0, 2]          # round 0: upload, new bundle; round 1: upload, new bundle
    # Tuning leaves it alone unless asked (tune_upload_steps).
    res = run_experiment(tiny_config(strategies=["dccl"], tune_steps=[0, 1]), tiny_ds, progress=False)
    assert "upload_device.steps" not in res["tuning"] and res["config"]["upload_steps"] is None
    c = tiny_config(tune=False, upload_steps=5)
    assert (c.upload_device(0).steps, c.upload_device(1).steps, tiny_config(tune=False).upload_device(1).steps) == \
        (c.device.steps, 5, c.device.steps)


def test_a_budget_per_bracket_of_training_positives_is_chosen_on_that_brackets_slices(tiny_ds, monkeypatch):
    """`tune_steps_by_positives`: the budget sweep's per-user validation scores choose a budget per
    bracket of training-positive counts, each on its own devices (one-SE rule), and MetaPatch's and
    the uploads' devices train with that table while a new bundle keeps its single budget."""
    import cloud_trainer.strategies as S
    from cloud_trainer.context import build_context
    from dccl.protocol.manifest import step_budget

    ctx = build_context(tiny_ds, tiny_config(tune=False), 0)
    rd = ctx.rounds[0]
    users = np.unique(rd.val_eval.user)
    owner, label = rd.fresh_train["owner"].numpy(), rd.fresh_train["label"].numpy()
    pos = np.bincount(owner, weights=(label > 0), minlength=ctx.n_users)[users].astype(np.int64)
    base = 0.7 + 0.01 * np.random.default_rng(0).normal(size=len(users))
    _, brackets = S.choose_steps_by_positives(ctx, {0: base, 8: base})   # no difference: 0 everywhere
    mins = [int(k.split()[-1]) for k in brackets]                          # each bracket's ">= min"
    assert len(mins) >= 2 and sum(b["devices"] for b in brackets.values()) == len(users)
    few = pos < mins[1]
    # The lowest bracket's devices gain from 8 steps, every other device loses: each bracket sees its own.
    table, _ = S.choose_steps_by_positives(ctx, {0: base, 8: base + np.where(few, 0.05, -0.05)})
    assert table == [[0, 8], [mins[1], 0]]
    assert (step_budget(0, table, pos) == np.where(few, 8, 0)).all()

    seen = _record_device_configs(monkeypatch, lambda cfg: cfg.steps_by_positives)
    res = run_experiment(tiny_config(strategies=["metapatch", "dccl"], tune_steps_by_positives=True), tiny_ds,
                         progress=False)
    chosen = res["tuning"]["device.steps_by_positives"]["chosen"]
    assert res["config"]["device"]["steps_by_positives"] == chosen
    assert chosen in seen and all(t is None or t == chosen for t in seen)
    c = tiny_config(tune=False, bundle_steps=2, upload_steps=1, **{"device.steps_by_positives": [[0, 3], [5, 1]]})
    assert c.device.steps_by_positives == [[0, 3], [5, 1]]
    assert c.bundle_device().steps_by_positives is None and c.upload_device(1).steps_by_positives is None


def test_momodistill_each_round_chooses_on_that_rounds_validation_slices(tiny_ds, monkeypatch):
    """With `momodistill_each_round`, DCCL's round r >= 1 chooses MoMoDistill's setting on round r's
    validation slices (step 1 replayed on the fresh windows minus those slices, taught by the uploads)
    and its step 1 then runs with that setting; round 0 keeps tuning's choice."""
    import cloud_trainer.strategies as S
    from cloud_trainer.context import build_context

    grid = [{"lam": 0.0, "kd_extra": 0}, {"lam": 4.0, "kd_extra": 1, "kd_balance": 1.0}]
    runs = []

    def recording(model, data, phi, m, n_items, seed, label_balance=0.0):
        runs.append((len(data["label"]), m.lam, m.kd_extra, m.kd_balance))
        return step1(model, data, phi, m, n_items, seed=seed, label_balance=label_balance)

    step1 = S.step1
    monkeypatch.setattr(S, "step1", recording)
    step2_runs = []

    def recording2(model, encoder, data, teacher, phi, profile, seq, m, seed=0, before=None):
        step2_runs.append((len(data["label"]), m.step2_target, before is not None))
        return step2(model, encoder, data, teacher, phi, profile, seq, m, seed=seed, before=before)

    step2 = S.step2
    monkeypatch.setattr(S, "step2", recording2)
    cfg = tiny_config(strategies=["dccl"], tune_momodistill=grid, momodistill_each_round=True)
    res = run_experiment(cfg, tiny_ds, progress=False)
    ctx = build_context(tiny_ds, cfg, 0)
    fresh_train, fresh = (len(ctx.rounds[1].fresh_train["label"]), len(ctx.rounds[1].fresh["label"]))
    chosen = res["tuning"]["momodistill_each_round"]["0"]["1"]
    assert set(chosen["val_gauc"]) == {json.dumps(c, sort_keys=True) for c in cfg.tune_momodistill}
    # Round 1: both candidates replayed on the fresh windows minus the validation slices, then the
    # real step 1 on the whole fresh windows with the chosen one.
    setting = (chosen["chosen"]["lam"], chosen["chosen"]["kd_extra"], chosen["chosen"].get("kd_balance", 0.0))
    # Round 0: tuning's two replays, then DCCL's step 1; round 1: the two replays, then step 1.
    assert len(runs) == 6 and runs[-3:] == [(fresh_train, 0.0, 0, 0.0), (fresh_train, 4.0, 1, 1.0), (fresh, *setting)]
    best = max(chosen["val_gauc"], key=chosen["val_gauc"].get)
    assert list(chosen["val_gauc"]).index(json.dumps(chosen["chosen"], sort_keys=True)) <= list(chosen["val_gauc"]).index(best)
    # Step 2's target is chosen the same way after step 1's setting: both targets replayed on the
    # chosen step-1 replay, then the real step 2 with the chosen one (a "delta" step 2 gets the cloud
    # logits from before step 1). Round 0: tuning's 4 (balance, target) replays and DCCL's step 2.
    target = chosen["step2_target"]
    assert list(target["val_gauc"]) == ["device", "delta"]
    best = max(target["val_gauc"], key=target["val_gauc"].get)
    assert ["device", "delta"].index(target["chosen"]) <= ["device", "delta"].index(best)
    assert len(step2_runs) == 8 and step2_runs[-3:] == [
        (fresh_train, "device", False), (fresh_train, "delta", True), (fresh, target["chosen"], target["chosen"] == "delta")]
    assert [r[1:] for r in step2_runs[:4]] == [("device", False), ("delta", True)] * 2
    # Off: no choice after round 0.
    runs.clear()
    res = run_experiment(tiny_config(strategies=["dccl"], tune_momodistill=grid, momodistill_each_round=False),
                         tiny_ds, progress=False)
    assert "momodistill_each_round" not in res["tuning"] and len(runs) == 4
    # momodistill_keep_incumbent: round 1 lists round 0's setting first (it wins near-ties), here the
    # grid's last candidate (round 0's tuning is given only that one), where grid order lists it last.
    import cloud_trainer.experiment as E
    choose = E.choose_momodistill
    monkeypatch.setattr(E, "choose_momodistill", lambda ctx, model, r, phi, g, seed: choose(ctx, model, r, phi, g[-1:], seed))
    for keep, first in ((True, grid[-1]), (False, grid[0])):
        res = run_experiment(tiny_config(strategies=["dccl"], tune_momodistill=grid, momodistill_keep_incumbent=keep),
                             tiny_ds, progress=False)
        assert res["tuning"]["momodistill"]["chosen"] == grid[-1]
        assert json.loads(list(res["tuning"]["momodistill_each_round"]["0"]["1"]["val_gauc"])[0]) == first


def test_choices_on_validation_slices_are_taught_by_device_models_blind_to_them(tiny_ds, monkeypatch):
    """The keep-if-worse check reads the validation slices' labels, so the deployed uploads have seen
    them; the device models that teach (and start) the replays judged on those slices must not have:
    `blind_uploads` trains as the upload session does and keeps every trained φ (a device without a
    slice still keeps its start). Flipping the slices' labels moves the deployed uploads, never the
    blind ones — and every MoMoDistill choice, round 0's and round 1's, is taught by the blind ones."""
    import dataclasses

    import cloud_trainer.experiment as E
    import cloud_trainer.strategies as S
    from cloud_trainer.context import build_context

    cfg = tiny_config(strategies=["dccl"], tune=False, **{"device.steps": 4, "device.lr": 0.5})
    ctx = build_context(tiny_ds, cfg, 0)
    rd = ctx.rounds[0]
    flipped = dataclasses.replace(rd, val={**rd.val, "label": 1.0 - rd.val["label"]})
    phi0 = torch.zeros(ctx.n_users, ctx.model.phi_dim)
    deployed = [S.personalize_all(ctx.model, phi0, d.fresh_train, d.val, cfg.device)[0] for d in (rd, flipped)]
    blind = [S.blind_uploads(ctx.model, phi0, d, cfg.device) for d in (rd, flipped)]
    assert not torch.equal(*deployed) and torch.equal(*blind)
    has_val = torch.zeros(ctx.n_users, dtype=torch.bool)
    has_val[rd.val["owner"]] = True
    assert (~has_val).any() and (blind[0][~has_val] == 0).all() and (blind[0][has_val] != 0).any()

    blinds, taught = [], []
    blind_uploads, choose = S.blind_uploads, S.choose_momodistill

    def recording_blind(*a, **kw):
        blinds.append(blind_uploads(*a, **kw))
        return blinds[-1]

    def recording_choose(ctx, model, r, phi, *a, **kw):
        taught.append(any(phi is b for b in blinds))
        return choose(ctx, model, r, phi, *a, **kw)

    monkeypatch.setattr(S, "blind_uploads", recording_blind)
    monkeypatch.setattr(S, "choose_momodistill", recording_choose)
    monkeypatch.setattr(E, "choose_momodistill", recording_choose)
    run_experiment(tiny_config(strategies=["dccl"], momodistill_each_round=True), tiny_ds, progress=False)
    assert taught == [True, True] and len(blinds) == 2  # round 0's tuning, round 1's choice


def test_choices_on_validation_slices_never_read_the_slices_items_as_history(tiny_ds, monkeypatch):
    """A device's history at the end of its fresh window (`RoundData.seq`, what the deployed devices'
    encoder reads) ends with its validation slice's items — the positives every choice is scored on.
    Choices must start devices from the history before the slice (`RoundData.val_seq`, via
    `blind_start_phi`): replacing `seq` changes the deployed starting φ but no score of round 0's tuning, nor of round 1's
    MoMoDistill choice, nor any starting φ of the device models those choices train (a rank metric
    on a tiny model can miss a small change of φ; the tensors cannot)."""
    import cloud_trainer.experiment as E
    import cloud_trainer.strategies as S
    from cloud_trainer.context import build_context
    from cloud_trainer.strategies import DCCL, start_phi

    phi0s: list[torch.Tensor] = []
    blind_uploads, tune_device_steps = S.blind_uploads, E.tune_device_steps

    def recording_blind(model, phi0, *a, **kw):
        phi0s.append(phi0.clone())
        return blind_uploads(model, phi0, *a, **kw)

    def recording_steps(ctx, model, phi0, *a, **kw):
        phi0s.append(phi0.clone())
        return tune_device_steps(ctx, model, phi0, *a, **kw)

    monkeypatch.setattr(S, "blind_uploads", recording_blind)
    monkeypatch.setattr(E, "tune_device_steps", recording_steps)
    monkeypatch.setattr(S, "tune_device_steps", recording_steps)

    def scrambled(seq):
        return torch.randint(1, tiny_ds.n_items + 1, seq.shape, generator=torch.Generator().manual_seed(5))

    def scores(record):   # every "val_gauc" in a tuning record, in order
        if isinstance(record, dict):
            return [v for k in sorted(record) for v in ([record[k]] if k == "val_gauc" else scores(record[k]))]
        return []

    def context(which):    # with round `which`'s history at the end of its fresh windows replaced
        cfg = tiny_config(strategies=["dccl"], momodistill_each_round=True, **{"device.steps": 2})
        ctx = build_context(tiny_ds, cfg, 0)
        if which is not None:
            ctx.rounds[which].seq = scrambled(ctx.rounds[which].seq)
        return ctx, cfg

    def same_starts(runs, n):
        assert len(runs[0]) == len(runs[1]) == n
        assert all(torch.equal(x, y) for x, y in zip(*runs))

    tuned, starts, runs = [], [], []
    for which in (None, 0):     # round 0's tuning
        ctx, cfg = context(which)
        starts.append(start_phi(ctx.encoder, ctx, 0, torch.zeros(ctx.n_users, ctx.model.phi_dim)))
        phi0s.clear()
        tuned.append(scores(E.tune(ctx, cfg)))
        runs.append(list(phi0s))
    assert not torch.equal(*starts)             # the deployed start does read that history
    assert len(tuned[0]) >= 4 and tuned[0] == tuned[1]
    same_starts(runs, 4)        # device steps from each first-bundle start, round 0's teachers, the budget on a new bundle
    chosen, runs = [], []
    for which in (None, 1):     # round 1's MoMoDistill choice (the config's settings otherwise)
        ctx, cfg = context(which)
        s = DCCL()
        s.setup(ctx)
        s.run_round(ctx, 0, lambda key, scorer: None)
        phi0s.clear()
        s.run_round(ctx, 1, lambda key, scorer: None)
        chosen.append(s.choices["1"]["val_gauc"])
        runs.append(list(phi0s))                # round 1's teachers
    assert chosen[0] == chosen[1]
    same_starts(runs, 1)


@pytest.mark.parametrize("balance", [0.0, 1.0])
def test_momodistill_without_distillation_is_model_over_data(tiny_ds, balance):
    """λ = 0 and no unlabelled candidates: step 1 is exactly the model-over-data update, whatever
    the cloud update's balance (both updates weigh the labels the same way)."""
    cfg = tiny_config(strategies=["model-over-data", "dccl"], tune=False,
                      **{"momodistill.lam": 0.0, "cloud.update_balance": balance})
    res = run_experiment(cfg, tiny_ds, progress=False)["strategies"]
    for r in range(2):
        a, b = res["momodistill"]["rounds"][r]["overall"], res["model-over-data"]["rounds"][r]["overall"]
        for m in ("auc", "gauc", "ndcg@10"):
            assert a[m]["mean"] == pytest.approx(b[m]["mean"], abs=1e-4)


@pytest.mark.parametrize("each_round", [False, True])
def test_the_update_balance_is_chosen_on_validation_and_reaches_both_cloud_updates(tiny_ds, monkeypatch, each_round):
    """tune_update_balance: each value replays model-over-data's update on the fresh windows minus the
    validation slices (the slices' rows never trained on) and is scored on them; round 0's choice is
    written to cloud.update_balance and recorded in the tuning. Model-over-data and every MoMoDistill
    step 1 (the replays behind MoMoDistill's own choices included) use it — and with
    update_balance_each_round, each later round's choice, made by each strategy from its own model."""
    from cloud_trainer import strategies, train

    fits, steps, scored = [], [], []
    real_fit, real_step1, real_choose = train.fit_cloud, strategies.step1, strategies.choose_within_noise

    def fit(model, data, *a, balance=0.0, **kw):
        fits.append((len(data["label"]), balance))
        return real_fit(model, data, *a, balance=balance, **kw)

    def step1(*a, label_balance=0.0, **kw):
        steps.append(label_balance)
        return real_step1(*a, label_balance=label_balance, **kw)

    def choose(scores):
        if set(scores) == {"0", "1"}:
            scored.append(scores)
            return "1" if len(scored) == 1 else "0"  # round 0: balanced; later rounds: back to the pooled loss
        return real_choose(scores)

    monkeypatch.setattr(strategies, "fit_cloud", fit)
    monkeypatch.setattr(strategies, "step1", step1)
    monkeypatch.setattr(strategies, "choose_within_noise", choose)
    cfg = tiny_config(strategies=["model-over-data", "dccl"], tune_update_balance=[0.0, 1.0],
                      update_balance_each_round=each_round)
    res = run_experiment(cfg, tiny_ds, progress=False)
    tuning = res["tuning"]
    assert tuning["cloud.update_balance"]["chosen"] == 1.0 and cfg.cloud.update_balance == 1.0
    assert set(tuning["cloud.update_balance"]["val_gauc"]) == {"0", "1"}
    ctx = build_context(tiny_ds, cfg, 0)
    n_train = [len(ctx.rounds[r].fresh_train["label"]) for r in range(2)]
    n_fresh = [len(ctx.rounds[r].fresh["label"]) for r in range(2)]
    assert fits[:2] == [(n_train[0], 0.0), (n_train[0], 1.0)]  # round 0's replays, never the slices' rows
    if not each_round:
        assert len(scored) == 1 and fits[2:] == [(n_fresh[0], 1.0), (n_fresh[1], 1.0)]  # model-over-data's rounds
        assert steps and all(b == 1.0 for b in steps)  # every step 1: tuning's replays and DCCL's rounds
        assert not any(k.endswith("_each_round") and k != "momodistill_each_round" for k in tuning)
        return
    # Round 1: model-over-data replays both values on round 1's rows and its own model, then trains
    # with its choice; DCCL does the same before MoMoDistill's choice, whose replays use that balance.
    assert len(scored) == 3
    assert fits[2:] == [(n_fresh[0], 1.0), (n_train[1], 0.0), (n_train[1], 1.0), (n_fresh[1], 0.0),
                        (n_train[1], 0.0), (n_train[1], 1.0)]
    assert tuning["model-over-data_each_round"]["0"]["1"]["update_balance"]["chosen"] == 0.0
    assert tuning["momodistill_each_round"]["0"]["1"]["update_balance"]["chosen"] == 0.0
    k = len(cfg.tune_momodistill)
    assert steps[:k + 1] == [1.0] * (k + 1)  # round 0: tuning's replays and DCCL's step 1
    assert steps[k + 1:] == [0.0] * (k + 1)  # round 1: its replays and DCCL's step 1
    md = res["table_md"]
    assert "model-over-data, chosen anew (seed 0): round 2: update balance 0" in md
    assert "momodistill, chosen anew (seed 0): round 2: update balance 0, " in md


def test_same_seed_same_results(tiny_ds):
    cfg = tiny_config(strategies=["stale", "metapatch"], tune=False)
    a = run_experiment(cfg, tiny_ds, progress=False)["strategies"]
    b = run_experiment(tiny_config(strategies=["stale", "metapatch"], tune=False), tiny_ds, progress=False)["strategies"]
    # Equal up to last-bit float differences between runs (BLAS kernels may sum in a different order),
    # not bit for bit: on this near-random tiny model those can swap a near-tied pair of scores, and
    # the pooled AUC over ~2e6 (positive, negative) pairs moves by ~5e-7 per swapped pair (measured: 2
    # swaps in 1 of 6 runs). A seed that is not honoured moves every metric by ~1e-2.
    x, y = a["metapatch"]["rounds"][1]["overall"], b["metapatch"]["rounds"][1]["overall"]
    for m in ("auc", "gauc", "hr@10", "ndcg@10"):
        assert x[m]["mean"] == pytest.approx(y[m]["mean"], abs=1e-5 if m == "auc" else 1e-9)


@pytest.mark.parametrize("each_seed", [False, True])
def test_tune_each_seed_makes_every_seed_choose_on_its_own_slices(tiny_ds, monkeypatch, each_seed):
    """tune_each_seed: every seed tunes its own copy of the configured (untuned) values on its own
    validation slices and its strategies run with them; without it, later seeds run with seed 0's."""
    from cloud_trainer import experiment

    real_steps, real_build, ctxs, tuned = experiment.tune_device_steps, experiment.build_context, [], []

    def steps(ctx, *a, **kw):  # seed 0 picks 2 steps, seed 1 picks 0 (both in the grid)
        best, scores = real_steps(ctx, *a, **kw)
        tuned.append((ctx.seed, ctx.cfg.device.steps))
        return (2 if ctx.seed == 0 else 0), scores

    def build(ds, cfg, seed, *a, **kw):
        ctxs.append(real_build(ds, cfg, seed, *a, **kw))
        return ctxs[-1]

    monkeypatch.setattr(experiment, "tune_device_steps", steps)
    monkeypatch.setattr(experiment, "build_context", build)
    cfg = tiny_config(seeds=2, strategies=["stale", "metapatch"], tune_each_seed=each_seed, **{"device.steps": 5})
    res = run_experiment(cfg, tiny_ds, progress=False)
    assert res["tuning"]["device.steps"]["chosen"] == 2 == ctxs[0].cfg.device.steps == res["config"]["device"]["steps"]
    if not each_seed:
        assert tuned == [(0, 5)] * 2 and ctxs[1].cfg is ctxs[0].cfg and "per_seed" not in res["tuning"]
        return
    # (one budget sweep per first-bundle start) seed 1 starts from the configured budget, not seed 0's choice
    assert tuned == [(0, 5)] * 2 + [(1, 5)] * 2
    assert ctxs[1].cfg is not ctxs[0].cfg and ctxs[1].cfg.device.steps == 0
    assert res["tuning"]["per_seed"]["1"]["device.steps"]["chosen"] == 0
    assert re.search(r"seed 1, its own round-0 choices: (start.first \w+; )?device.steps 0", res["table_md"])
    assert all("tune" in t for t in res["timings"]["per_seed"])


@pytest.mark.parametrize("forced", ["sampled", "device"])
def test_the_meta_training_episodes_are_chosen_on_validation_and_the_choice_is_what_seeds_train(tiny_ds, monkeypatch,
                                                                                                 forced):
    """tune_meta_episodes: Θ and g meta-trained with each kind of episode from the same start, each
    judged by its devices' best step budget on round 0's slices (one-SE rule over both); the chosen
    kind is written to cfg, and the seed's context then holds exactly the Θ, g and W_f that a seed
    meta-trained with it from the start holds (the other kind's Θ differs)."""
    from cloud_trainer import experiment

    real, judged = experiment.choose_within_noise, []

    def choose(scores):
        if set(scores) == {"sampled", "device"}:
            judged.append(scores)
            return forced
        return real(scores)

    monkeypatch.setattr(experiment, "choose_within_noise", choose)
    cfg = tiny_config(strategies=["metapatch"], tune_meta_episodes=["sampled", "device"])
    ctx = build_context(tiny_ds, cfg, 0)
    out = experiment.tune(ctx, cfg)
    rec = out["meta.episodes"]
    assert rec["chosen"] == forced == cfg.meta.episodes and len(judged) == 1
    assert set(rec["val_gauc"]) == set(rec["device_steps"]) == {"sampled", "device"}
    assert all(len(v) == len(judged[0]["sampled"]) for v in judged[0].values())  # per user, paired

    def state(ctx):
        return {**{f"m.{k}": v for k, v in ctx.model.state_dict().items()},
                **{f"g.{k}": v for k, v in ctx.encoder.state_dict().items()}}

    other = "device" if forced == "sampled" else "sampled"
    direct, rival = (state(build_context(tiny_ds, tiny_config(**{"meta.episodes": e}), 0)) for e in (forced, other))
    mine = state(ctx)
    assert mine.keys() == direct.keys() and all(torch.equal(mine[k], direct[k]) for k in mine)
    assert not all(torch.equal(mine[k], rival[k]) for k in mine)


@pytest.mark.parametrize("forced", [8, 4])
def test_the_size_of_phi_is_chosen_on_validation_and_the_choice_is_what_seeds_train(tiny_ds, monkeypatch, forced):
    """tune_phi_dim: Θ and g of each size initialised as the seed would have and meta-trained on the
    same pretrained W_f, each judged by its devices' best step budget on round 0's slices; the chosen
    size is written to cfg, and the seed's context then holds exactly the model and g of a seed built
    with that size from the start (so later seeds, which build it directly, match seed 0)."""
    from cloud_trainer import experiment

    real, judged = experiment.choose_within_noise, []

    def choose(scores):
        if set(scores) == {8, 4}:
            judged.append(scores)
            return forced
        return real(scores)

    monkeypatch.setattr(experiment, "choose_within_noise", choose)
    cfg = tiny_config(strategies=["metapatch"], tune_phi_dim=[8, 4])
    ctx = build_context(tiny_ds, cfg, 0)
    out = experiment.tune(ctx, cfg)
    rec = out["metapatch.phi_dim"]
    assert rec["chosen"] == forced == cfg.metapatch.phi_dim == ctx.model.phi_dim and len(judged) == 1
    assert set(rec["val_gauc"]) == set(rec["device_steps"]) == {"8", "4"} and ctx.meta_inputs is None

    def state(ctx):
        return {**{f"m.{k}": v for k, v in ctx.model.state_dict().items()},
                **{f"g.{k}": v for k, v in ctx.encoder.state_dict().items()}}

    direct, mine = state(build_context(tiny_ds, tiny_config(**{"metapatch.phi_dim": forced}), 0)), state(ctx)
    assert mine.keys() == direct.keys() and all(torch.equal(mine[k], direct[k]) for k in mine)
    res = experiment.run_experiment(tiny_config(strategies=["metapatch"], tune_phi_dim=[8, 4]), tiny_ds, progress=False)
    assert "- metapatch.phi_dim: **" in res["table_md"]


@pytest.mark.parametrize("favoured", ["zero", "encoder"])
def test_the_first_bundle_start_and_its_budget_are_chosen_together(tiny_ds, monkeypatch, favoured):
    """The first bundle's start (cfg.start.first) is chosen with the devices' budget on it: a budget per
    start, then the start whose budget scores best; that start is what round 0's devices (the teachers
    of the later choices) train from and what the first bundle's encoder ships, whatever policy is
    chosen for new MoMoDistill bundles; DCCL's encoder takes that one after step 2."""
    from cloud_trainer import experiment, strategies

    real_steps, real_start, real_uploads, seen = (experiment.tune_device_steps, experiment.tune_start,
                                                  strategies.blind_uploads, {})

    def steps(ctx, model, phi0, *a, **kw):
        best, scores = real_steps(ctx, model, phi0, *a, **kw)
        if model is ctx.model:  # the first bundle: make the favoured start clearly better at every budget
            start = "zero" if phi0.abs().sum() == 0 else "encoder"
            seen[start] = best
            scores = {k: v + (1.0 if start == favoured else 0.0) for k, v in scores.items()}
        return best, scores

    def start(ctx, cfg, *a, **kw):  # new bundles get the other policy
        rec = real_start(ctx, cfg, *a, **kw)
        cfg.start.cold = "encoder" if favoured == "zero" else "zero"
        strategies.ship_as_new_bundle(a[0][1], cfg.start)
        return rec

    def uploads(model, phi0, *a, **kw):
        seen["uploads from"] = "zero" if phi0.abs().sum() == 0 else "encoder"
        return real_uploads(model, phi0, *a, **kw)

    monkeypatch.setattr(experiment, "tune_device_steps", steps)
    monkeypatch.setattr(experiment, "tune_start", start)
    monkeypatch.setattr(strategies, "blind_uploads", uploads)
    cfg = tiny_config(strategies=["dccl"], tune_steps=[0, 1, 2])
    ctx = build_context(tiny_ds, cfg, 0)
    out = experiment.tune(ctx, cfg)
    assert set(seen) == {"zero", "encoder", "uploads from"}  # a budget chosen from each start
    assert cfg.start.first == out["start.first"]["chosen"] == favoured == seen["uploads from"]
    assert set(out["start.first"]["val_gauc"]) == {f"{o} ({seen[o]} steps)" for o in ("encoder", "zero")}
    assert cfg.device.steps == out["device.steps"]["chosen"] == seen[favoured]
    assert cfg.start.cold != favoured and ctx.encoder.config.start_cold == favoured  # the first bundle keeps its own
    # A seed built from the tuned config ships the chosen first start; DCCL's encoder switches after step 2.
    ctx = build_context(tiny_ds, cfg, 1, tunes=False)
    assert ctx.encoder.config.start_cold == favoured
    dccl = strategies.DCCL()
    dccl.setup(ctx)
    dccl.run_round(ctx, 0, lambda *_: None)
    assert dccl.encoder.config.start_cold == cfg.start.cold != favoured


def test_the_first_bundle_start_is_chosen_only_for_strategies_that_start_from_the_encoder(tiny_ds):
    from cloud_trainer.experiment import tune

    cfg = tiny_config(strategies=["stale", "fedavg-patches"], tune_steps=[0, 1], **{"start.first": "zero"})
    ctx = build_context(tiny_ds, cfg, 0)
    out = tune(ctx, cfg)
    assert "start.first" not in out and cfg.start.first == ctx.encoder.config.start_cold == "zero"


def test_only_a_seed_that_tunes_keeps_the_copy_meta_episodes_are_chosen_from(tiny_ds):
    """The pre-meta-training copy `tune_meta_episodes` chooses from is kept only for a seed that makes
    round-0 choices; a seed running on seed 0's choices trains the same Θ and g without it."""
    cfg = tiny_config(strategies=["metapatch"], tune_meta_episodes=["sampled", "device"])
    tuning, running = build_context(tiny_ds, cfg, 1), build_context(tiny_ds, cfg, 1, tunes=False)
    assert tuning.meta_inputs is not None and running.meta_inputs is None
    a, b = tuning.model.state_dict(), running.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, needle", [
    (["--dataset", "netflix"], "invalid choice: 'netflix'"),
    (["--rounds", "0"], "rounds = 0"),
    (["--set", "device.lr=-1"], "device.lr"),
    (["--set", "bundle_steps=-2"], "bundle_steps = -2"),
    (["--set", "upload_steps=-1"], "upload_steps = -1"),
    (["--set", 'tune_momodistill=[{"kd_extra":1}]'], "candidate 0 ({\"kd_extra\": 1.0}) has no lam"),
    (["--set", 'tune_momodistill=[{"lam":1,"kd_extra":1,"kd_balance":2}]'], "kd_balance = 2.0: must be in [0, 1]"),
    (["--set", "momodistill.kd_balance=-0.5"], "kd_balance = -0.5"),
    (["--set", "tune_step2_balance=[0, 1.5]"], "value 1 = 1.5 must be in [0, 1]"),
    (["--set", "momodistill.step2_balance=2"], "step2_balance = 2"),
    (["--set", "tune_update_balance=[0, -1]"], "value 1 = -1 must be in [0, 1]"),
    (["--set", "cloud.update_balance=3"], "cloud.update_balance"),
    (["--set", 'tune_step2_target=["device", "x"]'], 'tune_step2_target.1 = "x": Input should be'),
    (["--set", 'momodistill.step2_target="x"'], "step2_target = 'x': must be one of device, delta"),
    (["--set", "meta.encoder_from_cloud=3"], "encoder_from_cloud"),
    (["--set", 'meta.episodes="newest"'], "meta.episodes"),
    (["--set", 'tune_meta_episodes=["sampled", "all"]'], 'tune_meta_episodes.1 = "all"'),
    (["--set", "tune_phi_dim=[64, 0]"], "tune_phi_dim.1 = 0"),
    (["--set", "data.bogus=1"], "data.bogus"),
    (["--set", "nonsense"], "KEY=VALUE"),
    (["--dataset", "ml-100k", "--data", "/nonexistent/ml"], "/nonexistent/ml"),
    (["--config", "/nonexistent.json"], "/nonexistent.json"),
])
def test_cli_bad_input_is_one_clear_line(args, needle, tmp_path):
    p = subprocess.run(DCCL + ["experiment", "--out", str(tmp_path / "o"), "--quiet", *args], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr and "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], p.stderr  # one line names what is wrong


def test_garbled_dataset_file_names_file_and_line(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text("1\t2\t5\t881250949\nthis is not a rating\n")
    p = subprocess.run(DCCL + ["experiment", "--dataset", "ml-100k", "--data", str(d), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "u.data" in p.stderr


def test_config_errors_name_field_and_value():
    with pytest.raises(DcclError) as e:
        build_config({"rounds": 0, "data.neg": -1, "metapatch.phi_dim": 0})
    msg = str(e.value)
    assert "rounds = 0" in msg and "data.neg = -1" in msg and "phi_dim" in msg
    with pytest.raises(DcclError, match=r"start.warm = \"bogus\""):
        build_config({"start.warm": "bogus"})
    with pytest.raises(DcclError, match=r"start.first = \"previous\""):  # no device has a φ on the first bundle
        build_config({"start.first": "previous"})


def test_cloud_train_writes_a_checkpoint_that_exports(tmp_path):
    ckpt = tmp_path / "cloud.pt"
    tiny = ["--set", "data.synthetic_users=60", "--set", "data.synthetic_items=100", "--set", "meta.epochs=1",
            "--set", "data.eval_negatives=20",
            "--set", "cloud.pretrain_epochs=1", "--set", "cloud.emb_dim=8", "--set", "metapatch.phi_dim=8"]
    p = subprocess.run(DCCL + ["cloud", "train", "--out", str(ckpt), *tiny], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    from cloud_trainer.checkpoint import load_checkpoint
    model, encoder, meta = load_checkpoint(ckpt)
    assert encoder is not None and model.phi_dim == 8 and meta["extra"]["dataset"] == "synthetic"
    p = subprocess.run(DCCL + ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "bundle")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["trainable"] == {"metapatch_phi": {"shape": [1, 8], "dtype": "float32"}}
    # The bundle carries the device training settings the checkpoint was trained for (experiment config).
    assert manifest["optimizer"]["lr"] == pytest.approx(0.1)
    # ... with the step budget chosen on the validation slices, not the config's untuned 20.
    tuned = meta["extra"]["tuning"]["device.steps"]
    assert tuned["chosen"] in tuned["val_gauc"] or str(tuned["chosen"]) in tuned["val_gauc"]
    assert manifest["optimizer"]["steps"] == tuned["chosen"] == meta["extra"]["config"]["device"]["steps"]
    # ... and the start policy chosen there, inside encoder.onnx (named in the manifest).
    # The first bundle's own start for devices without a φ (all of them, on it), chosen with the budget.
    chosen = {"warm": meta["extra"]["tuning"]["start"]["chosen"]["warm"],
              "cold": meta["extra"]["tuning"]["start.first"]["chosen"]}
    assert (encoder.config.start_warm, encoder.config.start_cold) == (chosen["warm"], chosen["cold"])
    assert manifest["source"]["start_phi"] == chosen


def test_choose_within_noise_keeps_the_first_option_unless_another_is_clearly_better():
    from cloud_trainer.evaluate import choose_within_noise

    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.9, 400)
    noise = rng.normal(0, 0.02, 400)
    # A near-tie (0.0005 better on average, well inside one standard error of the paired difference):
    # the first option listed wins.
    assert choose_within_noise({0: base, 3: base + 0.0005 + noise}) == 0
    # A clear gain wins, even listed second; a NaN user (no pairs) is ignored.
    better = base + 0.02 + noise
    better[5] = np.nan
    assert choose_within_noise({0: base, 3: better}) == 3
    # Among several, the first within noise of the best: not the best itself.
    assert choose_within_noise({0: base, 2: base + 0.02, 3: base + 0.0201 + noise}) == 2


def test_a_later_round_keeps_the_incumbent_momodistill_setting_unless_another_is_clearly_better(monkeypatch):
    """choose_momodistill with an incumbent (the setting the previous round used) puts it first: a
    near-tie keeps it, where without one the candidate listed first would win; a clearly better
    candidate still replaces it. (Amazon Beauty: round 0 chose labels only, listed last; round 1's
    near-ties then fell to the first-listed distillation setting, which lost on the future window.)"""
    import types

    import cloud_trainer.strategies as S
    from cloud_trainer.momodistill import MoMoDistillConfig

    rng = np.random.default_rng(1)
    base = rng.uniform(0.6, 0.9, 400)
    distil, labels = {"lam": 1.0, "kd_extra": 0}, {"lam": 0.0, "kd_extra": 0}
    key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    for val in ({key(distil): base + 0.0005 + rng.normal(0, 0.02, 400), key(labels): base},
                {key(distil): base + 0.02 + rng.normal(0, 0.02, 400), key(labels): base}):
        # Each candidate's replayed model is its MoMoDistillConfig; its validation scores come from `val`.
        monkeypatch.setattr(S, "replay_step1", lambda ctx, model, r, up, m_cfg, seed, balance=None: (m_cfg, None))
        monkeypatch.setattr(S, "cloud_scorer", lambda m_cfg, profile: m_cfg)
        monkeypatch.setattr(S, "validation_gauc", lambda ctx, r, val=val: lambda m_cfg: val[key(
            {"lam": m_cfg.lam, "kd_extra": m_cfg.kd_extra})])
        ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(momodistill=MoMoDistillConfig()),
                                    ds=types.SimpleNamespace(profile=None))
        fresh = S.choose_momodistill(ctx, None, 1, None, [distil, labels], seed=0)["chosen"]
        kept = S.choose_momodistill(ctx, None, 1, None, [distil, labels], seed=0, incumbent=labels)["chosen"]
        clear = val[key(distil)].mean() - base.mean() > 0.01
        assert (fresh, kept) == ((distil, distil) if clear else (distil, labels))
    assert S.grid_candidate([distil, labels], MoMoDistillConfig(lam=0.0, kd_extra=0)) == labels
    assert S.grid_candidate([distil], MoMoDistillConfig(lam=2.0)) is None


def test_training_repeats_bit_for_bit():
    """Two builds of the same seed's context train identical models (cloud W_f, meta-trained Θ, encoder):
    without deterministic algorithms the multi-threaded backward of advanced indexing made them differ
    from run to run (train.reproducible)."""
    import torch

    from cloud_trainer.context import build_context

    ds = make_synthetic(n_users=200, n_items=300, seed=5)
    cfg = build_config({"dataset": "synthetic", "rounds": 1, "seeds": 1, "meta": {"epochs": 1},
                        "cloud": {"pretrain_epochs": 1}})
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = build_context(ds, cfg, 0), build_context(ds, cfg, 0)
    finally:
        torch.set_num_threads(threads)
    for x, y in ((a.model, b.model), (a.encoder, b.encoder)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k], sy[k]) for k in sx), [k for k in sx if not torch.equal(sx[k], sy[k])]
