"""Architecture and runtime: what the board is, which training backend it has and chooses, and
numerical parity of a training round against the bundle's reference and the x86 run."""

from __future__ import annotations

import numpy as np
import pytest


def test_architecture_matches_the_profile(board_round, profile):
    assert board_round["runtime"]["machine"] == profile.arch, board_round["runtime"]


def test_agent_runtime_is_torch_free(board_round):
    assert board_round["runtime"]["torch_loaded"] is False


def test_training_backend_available_and_chosen(board_round, record):
    rt = board_round["runtime"]
    assert "portable" in rt["backends_available"]
    expected_auto = "ort-training" if "ort-training" in rt["backends_available"] else "portable"
    assert rt["backend_auto"] == expected_auto
    if rt["machine"] != "x86_64":
        assert rt["backend_auto"] == "portable", "no aarch64 build of onnxruntime-training exists"
    assert board_round["backend"] == "portable"
    record("backend", {"available": rt["backends_available"], "auto": rt["backend_auto"],
                       "used": board_round["backend"]})


def test_round_matches_the_bundle_reference(board_round, profile):
    # Trainer.self_check raised on the board if any value exceeded the manifest's tolerance
    check = board_round["self_check"]
    assert set(check) >= {"grad", "phi", "loss", "logit"}
    assert max(check.values()) <= profile.parity_tol, check


def test_phi_and_scores_agree_with_the_x86_run(request, board_round, profile, record):
    if request.config.getoption("--hil-target") == "host":
        pytest.skip("the host is the x86 reference")
    ref = request.getfixturevalue("reference_round")
    assert ref["runtime"]["machine"] == "x86_64"
    phi_diff = float(np.max(np.abs(np.asarray(board_round["phi"]) - np.asarray(ref["phi"]))))
    score_diff = float(np.max(np.abs(np.asarray(board_round["scores"]) - np.asarray(ref["scores"]))))
    loss_diff = float(np.max(np.abs(np.asarray(board_round["losses"]) - np.asarray(ref["losses"]))))
    record("x86_parity", {"phi_max_abs_diff": phi_diff, "score_max_abs_diff": score_diff,
                          "loss_max_abs_diff": loss_diff, "tolerance": profile.parity_tol,
                          "steps": board_round["steps"], "reference_machine": ref["runtime"]["machine"]})
    assert board_round["steps"] == ref["steps"] == profile.train_steps
    assert phi_diff <= profile.parity_tol
    assert score_diff <= profile.parity_tol
    # φ really moved: agreement is not two copies of the starting point
    assert np.max(np.abs(np.asarray(ref["phi"]) - np.asarray(ref["phi0"]))) > 10 * profile.parity_tol
