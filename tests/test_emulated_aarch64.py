"""The emulated aarch64 board: real aarch64 Python, numpy and plain onnxruntime (Debian arm64 +
PyPI aarch64 wheels) under qemu-aarch64-static. It trains φ with the portable backend and must
agree with the x86 run to 1e-4; its report says aarch64. The sysroot is built once into
.cache/aarch64 by scripts/aarch64_sysroot.sh (about 20 s, then cached)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.edge_fixtures import REPO, build_bundle, edge_python

CACHE = REPO / ".cache" / "aarch64"

pytestmark = pytest.mark.skipif(not shutil.which("qemu-aarch64-static"),
                                reason="needs qemu-user-static (scripts/bootstrap.sh installs it)")


@pytest.fixture(scope="module")
def sysroot():
    r = subprocess.run(["bash", str(REPO / "scripts" / "aarch64_sysroot.sh")], capture_output=True, text=True,
                       timeout=900, cwd=REPO)
    if r.returncode != 0:
        pytest.fail(f"scripts/aarch64_sysroot.sh failed: {r.stderr[-2000:]}")
    return CACHE / "sysroot"


@pytest.fixture(scope="module")
def report(sysroot, tmp_path_factory):
    d = tmp_path_factory.mktemp("emu")
    bundle = build_bundle(d / "bundle")
    r = subprocess.run([sys.executable, "-m", "dccl.cli", "hil", "run", "--target", "emulated-aarch64",
                        "--bundle", str(bundle), "--reference-python", edge_python(), "--out", str(d / "out")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return json.loads((d / "out" / "report.json").read_text())


def test_the_interpreter_is_a_real_aarch64_binary(sysroot):
    elf = (sysroot / "usr" / "bin" / "python3.11").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183   # EM_AARCH64
    ort = next((CACHE / "site" / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so")).read_bytes()[:20]
    assert int.from_bytes(ort[18:20], "little") == 183


def test_report_says_aarch64_with_plain_onnxruntime(report):
    assert report["arch"] == "aarch64" and report["board"]["machine"] == "aarch64"
    assert report["target"]["name"] == "emulated-aarch64"
    assert report["board"]["backends_available"] == ["portable"]        # no training build on aarch64
    assert report["backend"]["used"] == "portable" and report["backend"]["auto"] == "portable"
    assert report["board"]["torch_loaded"] is False
    assert report["passed"] and report["summary"]["failed"] == 0


def test_phi_and_scores_agree_with_x86_to_1e_4(report):
    par = report["x86_parity"]
    assert par["reference_machine"] == "x86_64" and par["steps"] == report["profile"]["train_steps"] >= 10
    assert par["phi_max_abs_diff"] <= 1e-4
    assert par["score_max_abs_diff"] <= 1e-4
    assert max(report["self_check"].values()) <= 1e-4     # and with the bundle's PyTorch reference
    outcomes = {t["test"]: t["outcome"] for t in report["tests"]}
    assert outcomes["test_phi_and_scores_agree_with_the_x86_run"] == "passed"


def test_mqtt_checks_ran_on_the_emulated_board(report):
    outcomes = {t["test"]: t["outcome"] for t in report["tests"]}
    for name in ("test_last_will_marks_the_board_offline", "test_outbox_redelivers_after_a_broker_outage",
                 "test_model_update_applies_and_rolls_back"):
        assert outcomes[name] == "passed", report["tests"]
