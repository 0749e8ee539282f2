"""Parity: the PyTorch reference, the ORT training API and the portable graph train φ alike.

Same data, same φ0, N steps on the ML-100K-sized model: φ agrees to max-abs 1e-4, gradients to
1e-5, the exported inference model's scores to 1e-5 — checked for both edge flavours in their own
environments (.venv-edge: plain onnxruntime; .venv-edge-ort: the training build), each a real
subprocess in which ``import torch`` fails, and for both bundle kinds: "cached" (patches in the MLP;
the device steps on trunk features computed once per call) and "raw" (an attention patch; the
device steps on item, hist, profile). The reference is always ``train_phi`` on the raw inputs. Then
the trainer's contract (budgets, early stopping, keeping the previous φ, bad input, the trunk run
once per call), for both backends.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.personalize import train_phi
from onnx_export.schema import example_batch
from onnx_fixtures import DEVICE_CFG, shared_bundle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "edge_scripts" / "run_edge.py"
N_STEPS = 8
BATCH = 32
PHI_TOL, GRAD_TOL, LOGIT_TOL = 1e-4, 1e-5, 1e-5
PHI = MetaPatchConfig().phi_dim  # the shared test bundles' φ size (the default)
KEYS = ("item", "hist", "profile", "label")


KINDS = ("cached", "raw")


@pytest.fixture(scope="module", params=KINDS)
def bundle(request):
    return shared_bundle(request.param)


@pytest.fixture(scope="module")
def case(bundle):
    """The job every backend runs, and what PyTorch computes for it."""
    model, _ = bundle
    rng = np.random.default_rng(7)
    phi0 = (rng.standard_normal((1, model.phi_dim)) * 0.3).astype(np.float32)
    batches = [example_batch(model, BATCH, seed=100 + i) for i in range(N_STEPS)]
    score = example_batch(model, 50, seed=200)
    tb = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
    p = torch.from_numpy(phi0).requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(model(tb[0]["item"], tb[0]["hist"], tb[0]["profile"], phi=p), tb[0]["label"])
    (grad0,) = torch.autograd.grad(loss, [p])
    phi_ref, losses = train_phi(model, torch.from_numpy(phi0), tb, DEVICE_CFG)
    with torch.no_grad():
        scores = model(*(torch.from_numpy(score[k]) for k in ("item", "hist", "profile")), phi=torch.from_numpy(phi0))
    job = {"phi0": phi0, "n_batches": np.array(N_STEPS),
           "score_item": score["item"], "score_hist": score["hist"], "score_profile": score["profile"]}
    for i, b in enumerate(batches):
        job.update({f"b{i}_{k}": b[k] for k in KEYS})
    ref = {"phi": phi_ref.numpy(), "losses": np.asarray(losses), "grad0": grad0.numpy(), "scores": scores.numpy()}
    # φ must actually move, or the comparison proves nothing.
    assert np.abs(ref["phi"] - phi0).max() > 0.05
    assert np.abs(ref["grad0"]).max() > 1e-3
    return job, ref


ENVS = [
    (".venv-edge", "portable"),
    (".venv-edge", "auto"),
    (".venv-edge-ort", "ort-training"),
    (".venv-edge-ort", "portable"),
]


@pytest.mark.parametrize("venv,backend", ENVS, ids=[f"{v[6:]}-{b}" for v, b in ENVS])
def test_edge_flavour_matches_pytorch(bundle, case, venv, backend, tmp_path):
    python = ROOT / venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{venv} not created")
    _, bundle_dir = bundle
    job, ref = case
    np.savez(tmp_path / "job.npz", **job)
    proc = subprocess.run([str(python), str(SCRIPT), str(bundle_dir), backend, str(tmp_path / "job.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    expected_backend = {"auto": "portable" if venv == ".venv-edge" else "ort-training"}.get(backend, backend)
    assert str(out["backend"]) == expected_backend
    # The path under test: a cached bundle steps on trunk features, the attention-patched one on raw inputs.
    model, _ = bundle
    assert bool(out["cached"]) is model.cacheable
    assert not bool(out["torch_loaded"])
    assert np.abs(out["grad0"] - ref["grad0"]).max() <= GRAD_TOL
    assert np.abs(out["phi"] - ref["phi"]).max() <= PHI_TOL
    assert np.abs(out["losses"] - ref["losses"]).max() <= PHI_TOL
    assert np.abs(out["scores"] - ref["scores"]).max() <= LOGIT_TOL
    assert out["self_check"].max() <= GRAD_TOL  # the manifest's reference, re-run on this runtime


def test_torch_is_really_blocked_in_the_edge_script(tmp_path):
    """The blocker in run_edge.py makes `import torch` fail (so a torch import would not go unnoticed)."""
    python = ROOT / ".venv-edge" / "bin" / "python"
    if not python.exists():
        pytest.skip(".venv-edge not created")
    code = ("import runpy, sys; sys.argv=['x']; g = runpy.run_path(%r, run_name='blocker');\n"
            "try:\n import torch\nexcept ImportError as e:\n print('blocked', e)\n") % str(SCRIPT)
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "blocked" in proc.stdout, proc.stderr[-2000:]


# -- the trainer's contract, for both backends (run here: the cloud env has the training build) -----

BACKENDS = ["ort-training", "portable"]


@pytest.fixture(scope="module")
def local_data(bundle):
    model, _ = bundle
    return example_batch(model, 96, seed=300), example_batch(model, 24, seed=301)


@pytest.mark.parametrize("backend", BACKENDS)
def test_budgets(bundle, local_data, backend):
    from edge_agent.trainer import Trainer

    trainer = Trainer(bundle[1], backend, threads=1)
    train, _ = local_data
    phi0 = np.zeros((1, PHI), np.float32)
    assert trainer.train(phi0, train, steps=3).steps == 3
    r = trainer.train(phi0, train, epochs=2, batch_size=32)
    assert (r.steps, r.stopped) == (6, "epochs")
    r = trainer.train(phi0, train, seconds=0.0)
    assert (r.steps, r.stopped) == (0, "seconds")
    np.testing.assert_array_equal(r.phi, phi0)
    assert trainer.train(phi0, train).steps == DEVICE_CFG.steps  # the manifest's default budget


@pytest.mark.parametrize("backend", BACKENDS)
def test_early_stopping_keeps_best_and_previous(bundle, local_data, backend):
    from edge_agent.trainer import Trainer

    trainer = Trainer(bundle[1], backend, threads=1)
    train, val = local_data
    phi0 = np.zeros((1, PHI), np.float32)
    r = trainer.train(phi0, train, epochs=50, batch_size=32, val=val, patience=2)
    assert r.val_loss_before is not None and r.val_loss_after <= r.val_loss_before
    assert math.isclose(r.val_loss_after, trainer.scorer.loss(r.phi, val), rel_tol=1e-6)
    assert r.stopped in ("early_stop", "epochs")
    # Training on labels opposite to the validation slice's can only make it worse: φ0 is kept.
    flipped = dict(val, label=1.0 - val["label"])
    r = trainer.train(phi0, flipped, steps=10, val=val)
    assert r.kept_previous and np.array_equal(r.phi, phi0)
    assert r.val_loss_after == r.val_loss_before
    assert r.trained_phi is None or not np.array_equal(r.trained_phi, phi0)


def _reference_rule(model, phi0, train, val, steps):
    """`personalize_all` (the cloud's rule) for one device: `steps` full-batch steps, φ0 kept if the
    validation loss got worse."""
    from cloud_trainer.personalize import DeviceTrainConfig, personalize_all

    def owned(b):
        t = {k: torch.from_numpy(np.ascontiguousarray(b[k])) for k in KEYS}
        return {**t, "owner": torch.zeros(len(b["item"]), dtype=torch.int64)}

    cfg = DeviceTrainConfig(**{**DEVICE_CFG.to_dict(), "steps": steps})
    phi, info = personalize_all(model, torch.from_numpy(phi0), owned(train), owned(val), cfg)
    return phi.numpy(), bool(info["kept_previous"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_final_rule_is_the_cloud_reference(bundle, local_data, backend):
    """select="final" (a board's train.rule "bundle", the simulated pools) computes what the cloud's
    `personalize_all` computes: the whole budget in full-batch steps, then φ0 when validation got
    worse. "best" may stop at an earlier step; "final" never does."""
    from edge_agent.trainer import Trainer

    model, bundle_dir = bundle
    trainer = Trainer(bundle_dir, backend, threads=1)
    train, val = local_data
    phi0 = (np.random.default_rng(3).standard_normal((1, PHI)) * 0.1).astype(np.float32)
    seen = set()
    for labels, steps in (("same", 6), ("flipped", 6), ("same", 40)):
        data = train if labels == "same" else dict(train, label=1.0 - train["label"])
        want, want_kept = _reference_rule(model, phi0, data, val, steps)
        seen.add(want_kept)
        r = trainer.train(phi0, data, steps=steps, val=val, select="final")
        assert r.steps == steps and r.kept_previous == want_kept, (labels, steps)
        assert np.abs(r.phi - want).max() <= PHI_TOL, (labels, steps)
        if want_kept:
            assert np.array_equal(r.phi, phi0) and r.best_step == 0
        else:
            assert r.best_step == steps and not np.array_equal(r.phi, phi0)
    assert seen == {True, False}, "both branches (trained φ kept, φ0 kept) must be exercised"
    with pytest.raises(Exception, match="select = 'last'"):
        trainer.train(phi0, train, steps=1, select="last")


def _board_round(tmp_path, items, t0, local_data: dict, window: str = "bundle"):
    """A board's agent on a copy of the cached bundle whose manifest carries `local_data` and a budget
    of 5 steps: it ingests one click per item (one a second from `t0`) and trains a round. Returns the
    round's report, the φ it saved, the samples the store builds for it (`since` as the window
    says) and the PyTorch reference rule's φ and keep decision on those samples."""
    import json
    import shutil

    from edge_agent.agent import Agent
    from edge_agent.config import config_from_dict

    model, src = shared_bundle("cached")
    shutil.copytree(src, tmp_path / "bundle")
    path = tmp_path / "bundle" / "manifest.json"
    m = json.loads(path.read_text())
    m["local_data"], m["optimizer"]["steps"] = local_data, 5
    path.write_text(json.dumps(m))
    cfg = config_from_dict({"device_id": "dev-1", "state_dir": "state", "bundle_dir": "bundle",
                            "train": {"backend": "portable", "window": window}}, base_dir=tmp_path)
    with Agent(cfg) as agent:
        agent.set_profile([3, 1, 7])
        agent.ingest([{"event_id": f"e{i}", "kind": "click", "item": int(it), "ts": t0 + i}
                      for i, it in enumerate(items)])
        phi0, _ = agent.current_phi()
        rep = agent.train_round()
        after = agent.state().phi
        arrays = agent.store.training_arrays(neg=local_data["neg"], max_len=m["schema"]["max_len"],
                                             val_frac=local_data["val_frac"], seed=0, n_items=1682, n_profile=3,
                                             since=local_data.get("since") if window == "bundle" else None)
    (name,) = phi0
    as_dict = lambda a: {"item": a.item, "hist": a.hist, "profile": a.profile, "label": a.label}  # noqa: E731
    want, kept = _reference_rule(model, phi0[name].reshape(1, -1), as_dict(arrays.train), as_dict(arrays.val), 5)
    return rep, after[name].reshape(1, -1), arrays, want, kept


def test_a_board_round_is_the_cloud_reference(tmp_path):
    """A board's agent with its default rule ("bundle") builds its samples as the bundle's
    local_data says, trains the bundle's budget full-batch and keeps φ0 if validation got worse:
    the φ it saves is what `personalize_all` computes on those samples."""
    import time

    items = np.random.default_rng(5).choice(np.arange(1, 1683), 24, replace=False)
    t0 = time.time() - 3600.0          # recent: older events fall to the store's retention
    rep, after, _, want, kept = _board_round(tmp_path, items, t0, {"neg": 2, "val_frac": 0.25})
    assert rep["steps"] == 5 and rep["positives"] == 24 and rep["val_samples"] == 6 * 3    # 25 % of 24, 2 negatives
    assert rep["kept_previous"] == kept
    assert np.abs(after - want).max() <= PHI_TOL


@pytest.mark.parametrize("window", ["bundle", "all"])
def test_a_board_trains_on_the_fresh_window_the_bundle_names(tmp_path, window):
    """A bundle whose local_data names where the devices' fresh window starts (``since``): the agent
    trains on its positives from then on — the older ones are history — and the φ it saves is the
    reference rule's on those samples; ``train.window: "all"`` takes every positive instead."""
    import time

    items = np.random.default_rng(6).choice(np.arange(1, 1683), 24, replace=False)
    t0 = time.time() - 3600.0
    rep, after, arrays, want, kept = _board_round(
        tmp_path, items, t0, {"neg": 2, "val_frac": 0.25, "since": t0 + 12}, window)
    fresh = 12 if window == "bundle" else 24
    assert rep["positives"] == fresh and rep["val_samples"] == fresh // 4 * 3 and rep["steps"] == 5
    assert arrays.train.item[arrays.train.label == 1][0] == items[24 - fresh]
    assert rep["kept_previous"] == kept
    assert np.abs(after - want).max() <= PHI_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_trunk_runs_once_per_call(bundle, local_data, backend):
    """A cached bundle computes the trunk features once per train() call (and once for the
    validation slice), however many steps and epochs follow; a raw bundle has no trunk."""
    from edge_agent.trainer import Trainer

    model, bundle_dir = bundle
    trainer = Trainer(bundle_dir, backend, threads=1)
    train, val = local_data
    phi0 = np.zeros((1, PHI), np.float32)
    if not model.cacheable:
        assert trainer.trunk is None and not trainer.bundle.cached
        assert trainer.train(phi0, train, epochs=3, batch_size=32, val=val).steps > 0
        return
    assert trainer.bundle.train_inputs == ("features", "label")
    runs = trainer.trunk.runs
    r = trainer.train(phi0, train, epochs=5, batch_size=32, val=val, patience=10)
    assert r.steps == 15 and trainer.trunk.runs - runs == 2  # the 96 training samples, the 24 validation samples
    runs = trainer.trunk.runs
    trainer.train(phi0, [train, train, val], steps=3)
    assert trainer.trunk.runs - runs == 2  # a batch given twice is featurised once
    runs = trainer.trunk.runs
    trainer.gradient(phi0, train)
    assert trainer.trunk.runs - runs == 1
    # What the steps see are the trunk's features of the samples (the PyTorch trunk, to float32 rounding).
    x = trainer.step_inputs(train)
    with torch.no_grad():
        want = model.features(*(torch.from_numpy(train[k]) for k in ("item", "hist", "profile"))).numpy()
    assert x["features"].shape == want.shape and np.abs(x["features"] - want).max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_a_clear_error(bundle, local_data, backend):
    from edge_agent.trainer import Trainer, TrainerError

    trainer = Trainer(bundle[1], backend, threads=1)
    train, _ = local_data
    ok = np.zeros((1, PHI), np.float32)
    with pytest.raises(TrainerError, match="phi0: contains NaN"):
        trainer.train(np.full((1, PHI), np.nan, np.float32), train, steps=1)
    with pytest.raises(TrainerError, match="phi0: 16 values"):
        trainer.train(np.zeros(16, np.float32), train, steps=1)
    with pytest.raises(TrainerError, match="no local training samples"):
        trainer.train(ok, {k: v[:0] for k, v in train.items()}, steps=1)
    with pytest.raises(TrainerError, match=r"data.hist: shape \[96, 19\]"):
        trainer.train(ok, dict(train, hist=train["hist"][:, 1:]), steps=1)
    with pytest.raises(TrainerError, match=r"data.item: ids must be in 0..1682"):
        trainer.train(ok, dict(train, item=train["item"] + 5000), steps=1)
    with pytest.raises(TrainerError, match=r"data.profile\[:, 1\]: values must be in 0..2"):
        bad = train["profile"].copy()
        bad[0, 1] = 3
        trainer.train(ok, dict(train, profile=bad), steps=1)
    with pytest.raises(TrainerError, match="backend 'gpu'"):
        Trainer(bundle[1], "gpu")


def test_loss_stays_finite_for_huge_logits(bundle):
    """The custom loss: logits of ±40 (where the built-in BCEWithLogits turns NaN) train fine."""
    from edge_agent.trainer import Trainer

    model, bundle_dir = bundle
    trainer = Trainer(bundle_dir, "ort-training", threads=1)
    batch = example_batch(model, 32, seed=400)
    # Find a φ that makes the logits huge, then train from there.
    phi = np.zeros((1, PHI), np.float32)
    for scale in (10, 30, 100, 300, 1000):
        phi = np.ones((1, PHI), np.float32) * scale
        if np.abs(trainer.scorer.score(phi, batch["item"], batch["hist"], batch["profile"])).min() > 17:
            break
    else:
        pytest.skip("could not drive the logits above 17 with this Θ")
    for backend in BACKENDS:
        r = Trainer(bundle_dir, backend, threads=1).train(phi, batch, steps=3)
        assert all(math.isfinite(x) for x in r.losses) and np.all(np.isfinite(r.phi)), backend
