"""`dccl hil run --target host`: the hardware_tests suite on this machine, its JSON report, and the
report published on the device's report topic (a real Mosquitto on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dccl.protocol import payloads
from dccl.protocol.topics import Topics
from tests.edge_fixtures import REPO, build_bundle, edge_python
from tests.mqtt_fixtures import Mosquitto, wait_for

DCCL = [sys.executable, "-m", "dccl.cli"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("hil") / "bundle")


def hil(*args, timeout=300):
    return subprocess.run([*DCCL, "hil", "run", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_host_profile_passes_and_the_report_is_published(bundle, tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    got = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(Topics("dccl").report("pi-ci"), 1)
    sub.loop_start()
    try:
        r = hil("--target", "host", "--bundle", str(bundle), "--python", edge_python(), "--out", str(tmp_path / "out"),
                "--broker", broker.url, "--device-id", "pi-ci")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        report = json.loads((tmp_path / "out" / "report.json").read_text())
        assert report["passed"] and report["arch"] == "x86_64" and report["profile"]["name"] == "host"
        assert report["summary"]["failed"] == 0
        outcomes = {t["test"]: t["outcome"] for t in report["tests"]}
        for name in ("test_architecture_matches_the_profile", "test_training_backend_available_and_chosen",
                     "test_round_matches_the_bundle_reference", "test_round_within_latency_budget",
                     "test_round_within_memory_budget", "test_last_will_marks_the_board_offline",
                     "test_outbox_redelivers_after_a_broker_outage", "test_model_update_applies_and_rolls_back"):
            assert outcomes[name] == "passed", (name, report["tests"])
        assert report["backend"] == {"available": ["portable"], "auto": "portable", "used": "portable"}
        assert report["board"]["torch_loaded"] is False
        wait_for(lambda: got, 10, what="published report")
        pub = payloads.load_report(got[0][1])
        assert pub["kind"] == "hil" and pub["device_id"] == "pi-ci" and pub["passed"] is True
        assert pub["summary"] == report["summary"]
    finally:
        sub.loop_stop()
        broker.stop()


def test_failing_budget_fails_the_run_and_says_so(bundle, tmp_path, monkeypatch):
    # a Pi 4 profile on x86: the architecture check must fail, the report must say which
    r = hil("--target", "host", "--profile", "pi4", "--bundle", str(bundle), "--python", edge_python(),
            "--out", str(tmp_path), "-k", "architecture or memory")
    assert r.returncode == 1, r.stdout[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["passed"]
    failed = [t["test"] for t in report["tests"] if t["outcome"] == "failed"]
    assert failed == ["test_architecture_matches_the_profile"]


@pytest.mark.parametrize("args, words", [
    (["--target", "pi-over-carrier-pigeon"], "--target"),
    (["--target", "ssh://pi@board"], "--profile is required"),
    (["--profile", "pi9"], "unknown board profile"),
    (["--bundle", "/nonexistent"], "no manifest.json"),
])
def test_user_errors_are_one_line_exit_2(bundle, tmp_path, args, words):
    base = {"--bundle": str(bundle), "--out": str(tmp_path)}
    for k in list(base):
        if k in args:
            base.pop(k)
    r = hil(*[x for kv in base.items() for x in kv], *args, timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
