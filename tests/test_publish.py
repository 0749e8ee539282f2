"""`dccl model publish` / publish_bundle against the real broker: a device's ModelUpdater gets
the bundle, a newer one replaces it and the old chunks are cleared, bad input is one line."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.publish import publish_bundle
from dccl.errors import DcclError
from dccl.protocol import payloads
from dccl.protocol.topics import Topics
from edge_agent.model_update import ModelUpdater
from edge_agent.mqtt_client import EdgeMqttClient
from tests.edge_fixtures import build_bundle
from tests.mqtt_fixtures import BROKER, REPO, prefix, wait_for  # noqa: F401


def retained(topic_filter: str, wait: float = 1.0) -> dict[str, bytes]:
    """Every retained message under ``topic_filter`` now (a fresh subscriber's view)."""
    got: dict[str, bytes] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: got.__setitem__(m.topic, bytes(m.payload)) if m.retain else None
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    c.subscribe(topic_filter, 1)
    time.sleep(wait)
    c.disconnect()
    c.loop_stop()
    return got


def clear(prefix: str) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    for t in retained(f"{prefix}/model/#", 0.5):
        c.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _pump(dev, up, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not until():
        try:
            up.handle(dev.inbox.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"model update did not finish; reports {up.reports}") from None


def _new_version(src, dst, version: str):
    """The same bundle under another version (the manifest lists file hashes, not itself)."""
    import shutil
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["bundle_version"] = version
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_publish_real_bundle_reaches_a_device_and_replaces_the_previous(tmp_path, prefix):
    b1 = build_bundle(tmp_path / "b1")
    v1 = json.loads((b1 / "manifest.json").read_text())["bundle_version"]
    b2 = _new_version(b1, tmp_path / "b2", "edge-test-2")
    dev = EdgeMqttClient("dev-p", BROKER, tmp_path / "o.db", prefix=prefix).start()
    up = ModelUpdater(tmp_path / "agent", dev).start()
    try:
        r1 = publish_bundle(b1, BROKER, prefix, chunk_size=16 * 1024)
        assert r1.version == v1 and r1.chunks > r1.files and r1.cleared_previous is None
        _pump(dev, up, lambda: up.current_version == v1)
        assert (up.bundle_path() / "manifest.json").read_bytes() == (b1 / "manifest.json").read_bytes()

        r2 = publish_bundle(b2, BROKER, prefix, chunk_size=16 * 1024)
        assert r2.cleared_previous == v1
        _pump(dev, up, lambda: up.current_version == "edge-test-2")
        held = retained(f"{prefix}/model/#")
        ann = payloads.load_announcement(held[Topics(prefix).model_announce()])
        assert ann["bundle_version"] == "edge-test-2" and ann["sha256"] == r2.sha256
        assert not [t for t in held if f"/model/{v1}/" in t]            # old chunks cleared
        assert len([t for t in held if "/model/edge-test-2/chunk/" in t]) == r2.chunks
    finally:
        dev.stop()
        clear(prefix)


def test_publish_refuses_a_broken_bundle_before_sending_anything(tmp_path, prefix):
    b = build_bundle(tmp_path / "b")
    victim = next(p for p in sorted(b.iterdir()) if p.suffix == ".onnx")
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(DcclError, match=victim.name):
        publish_bundle(b, BROKER, prefix)
    assert retained(f"{prefix}/model/#", 0.3) == {}
    with pytest.raises(DcclError, match="no manifest.json"):
        publish_bundle(tmp_path / "nothing", BROKER, prefix)
    with pytest.raises(DcclError, match="cannot reach"):
        publish_bundle(build_bundle(tmp_path / "ok"), "mqtt://127.0.0.1:1", prefix, timeout=2)


def test_cli_publishes_and_reports_json_and_fails_in_one_line(tmp_path, prefix):
    b = build_bundle(tmp_path / "b")
    try:
        r = subprocess.run([sys.executable, "-m", "dccl.cli", "model", "publish", "--bundle", str(b),
                            "--prefix", prefix, "--broker", BROKER], capture_output=True, text=True, cwd=REPO,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["published"] == json.loads((b / "manifest.json").read_text())["bundle_version"]
        assert Topics(prefix).model_announce() in retained(f"{prefix}/model/announce", 0.5)
    finally:
        clear(prefix)
    r = subprocess.run([sys.executable, "-m", "dccl.cli", "model", "publish", "--bundle", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr
