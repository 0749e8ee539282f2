"""`dccl edge run` for real: an agent process (edge venv, torch blocked) against the real broker,
a `dccl cloud ingest` process storing its patches, bundles shipped with ``publish_bundle``.

One scenario, in order (each step waits on what the device reports over MQTT):
bundle v1 published -> switched, starting φ from the encoder -> ``train_now`` -> the signed
patch is stored by ingest -> a bundle that evaluates worse on local data is refused -> a bundle
whose graph does not load is refused -> an equally good v2 is taken -> ``rollback`` -> v1 again
-> another round -> SIGTERM -> retained ``stopped``, exit 0 -> restarted, the last round's patch
is offered again and the cloud counts it as a duplicate (stored once).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.ingest.store import open_store
from cloud_trainer.publish import publish_bundle
from dccl.protocol import payloads
from dccl.protocol.manifest import sha256_file
from dccl.protocol.topics import Topics
from tests.edge_fixtures import build_bundle, edge_python, events
from tests.mqtt_fixtures import BROKER, REPO, prefix, wait_for  # noqa: F401

DEVICE = "dev-run"
KEY = bytes(range(32))

# The agent as a user runs it, with `import torch` made to fail first.
AGENT = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "cloud_trainer", "onnx_export"):
                raise ImportError(f"{name} is blocked on the edge")
    sys.meta_path.insert(0, NoTorch())
    from dccl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _variant(src: Path, dst: Path, version: str, inference: bytes | None = None) -> Path:
    """A copy of a bundle under another version, optionally with another inference graph
    (manifest hashes rewritten, so it passes transfer verification and fails only later)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["bundle_version"] = version
    if inference is not None:
        (dst / "inference.onnx").write_bytes(inference)
        m["files"]["inference.onnx"] = {"sha256": sha256_file(dst / "inference.onnx"),
                                        "size": len(inference)}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _biased_inference(src: Path) -> bytes:
    """The inference graph with +6 added to every logit: it calls everything a click, so on a
    validation slice of 1 positive : 2 negatives its loss is far worse."""
    import onnx
    from onnx import helper
    model = onnx.load(str(src / "inference.onnx"))
    g = model.graph
    for node in g.node:
        node.output[:] = ["logit_raw" if o == "logit" else o for o in node.output]
    g.node.extend([helper.make_node("Constant", [], ["bias6"], value=helper.make_tensor("b", 1, [], [6.0])),
                   helper.make_node("Add", ["logit_raw", "bias6"], ["logit"])])
    return model.SerializeToString()


class Watch:
    """Reports, availability and heartbeats of the device, as the cloud sees them."""

    def __init__(self, topics: Topics):
        self.topics, self.q = topics, queue.Queue()
        self.availability: list[str] = []
        self.heartbeat: dict | None = None
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", 1883)
        self.c.loop_start()
        self.c.subscribe(topics.device(DEVICE, "#"), 1)

    def _on_message(self, c, u, m):
        kind = m.topic.rsplit("/", 1)[-1]
        if kind == "report":
            self.q.put(payloads.load_report(m.payload))
        elif kind == "availability" and m.payload:
            self.availability.append(payloads.load_availability(m.payload))
        elif kind == "heartbeat" and m.payload:
            self.heartbeat = payloads.load_heartbeat(m.payload)

    def report(self, pred, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                r = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching report in {timeout} s; saw {seen}") from None
            seen.append(r)
            if pred(r):
                return r

    def send(self, command: str) -> None:
        self.c.publish(self.topics.command(DEVICE), payloads.dump_command(command), qos=1).wait_for_publish(5)

    def close(self):
        for t in (self.topics.availability(DEVICE), self.topics.heartbeat(DEVICE), self.topics.model_announce()):
            self.c.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
        self.c.disconnect()
        self.c.loop_stop()


def _update(r: dict, outcome: str, version: str) -> bool:
    return r["kind"] == "model_update" and r["outcome"] == outcome and r.get("version") == version


@pytest.mark.timeout(300)
def test_edge_run_end_to_end(tmp_path, prefix):
    topics = Topics(prefix)
    b1 = build_bundle(tmp_path / "b1")
    v1 = json.loads((b1 / "manifest.json").read_text())["bundle_version"]
    trainable = json.loads((b1 / "manifest.json").read_text())["trainable"]
    worse = _variant(b1, tmp_path / "worse", "edge-test-worse", _biased_inference(b1))
    broken = _variant(b1, tmp_path / "broken", "edge-test-broken", b"this is not an onnx model")
    b2 = _variant(b1, tmp_path / "b2", "edge-test-2")

    dev = tmp_path / "device"
    dev.mkdir()
    cfg = dev / "agent.json"
    cfg.write_text(json.dumps({
        "device_id": DEVICE, "state_dir": "state", "bundle_dir": "models",
        "mqtt": {"broker": BROKER, "prefix": prefix, "hmac_key": "{TEST_DEVICE_KEY}"},
        "train": {"max_steps": 20, "max_seconds": 20, "neg": 2, "batch_size": 16}}))
    from edge_agent.store import Store
    with Store(dev / "state" / "store.sqlite") as s:
        now = time.time()
        assert s.ingest(events(40, start_ts=now - 1000, item0=1)).added == 40   # 40 clicks, items 1..40
        s.set_profile([2, 1])

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({DEVICE: KEY.hex()}))
    db = tmp_path / "patches.db"
    open_store(db).close()
    env = dict(os.environ, PYTHONPATH=str(REPO), TEST_DEVICE_KEY=KEY.hex())
    from tests.mqtt_fixtures import free_port
    metrics_port = free_port()
    ingest = subprocess.Popen([sys.executable, "-m", "dccl.cli", "cloud", "ingest", "--broker", BROKER,
                               "--store", str(db), "--keys", str(keys), "--spec", str(b1 / "manifest.json"),
                               "--prefix", prefix, "--client-id", f"ing-{prefix}", "--log-level", "WARNING",
                               "--metrics-port", str(metrics_port)],
                              cwd=REPO, env=env, stdout=open(tmp_path / "ingest.log", "wb"),
                              stderr=subprocess.STDOUT)
    watch = Watch(topics)

    def start_agent():
        p = subprocess.Popen([edge_python(), "-c", AGENT, "edge", "run", "--config", str(cfg),
                              "--heartbeat-interval", "1", "--keepalive", "5"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=open(tmp_path / "agent.log", "ab"), text=True)
        assert p.stdout.readline().startswith("dccl edge run: device dev-run"), (tmp_path / "agent.log").read_text()
        return p

    def duplicates() -> float:
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
        line = [x for x in text.splitlines() if x.startswith('dccl_ingest_messages_total{outcome="duplicate"}')]
        return float(line[0].split()[-1]) if line else 0.0

    agent = start_agent()
    store = open_store(db)
    try:
        wait_for(lambda: "online" in watch.availability, 10, what="online")

        # bundle v1: fetched, checked (nothing to compare with), switched; φ from the encoder
        publish_bundle(b1, BROKER, prefix, chunk_size=32 * 1024)
        check = watch.report(lambda r: r["kind"] == "bundle_check")
        assert check["accepted"] and check["new"]["version"] == v1 and check["new"]["loss"] > 0
        watch.report(lambda r: _update(r, "switched", v1))
        wait_for(lambda: watch.heartbeat and watch.heartbeat["bundle_version"] == v1, 10, what="heartbeat v1")

        # train_now: one round, the signed patch reaches ingest and is stored
        watch.send("train_now")
        r = watch.report(lambda r: r["kind"] == "command" and r["command"] == "train_now")
        assert r["ok"], r
        assert r["result"]["round"] == 1 and r["result"]["bundle_version"] == v1 and r["result"]["steps"] > 0
        wait_for(lambda: store.count() == 1, 20, what="patch stored by ingest")
        latest = store.latest(v1)
        assert latest.device_ids == [DEVICE] and latest.rounds.tolist() == [1]
        phi = latest.tensors["metapatch_phi"]
        assert phi.shape == (1, *trainable["metapatch_phi"]["shape"]) and np.isfinite(phi).all()
        assert store.quarantine_counts() == {}
        wait_for(lambda: watch.heartbeat and watch.heartbeat["round"] == 1
                 and watch.heartbeat["last_loss"] is not None, 10, what="heartbeat after training")

        # a bundle that evaluates worse on the device's own validation slice: refused
        publish_bundle(worse, BROKER, prefix, verify=True)
        check = watch.report(lambda r: r["kind"] == "bundle_check" and r["new"]["version"] == "edge-test-worse")
        assert not check["accepted"] and check["new"]["loss"] > check["current"]["loss"]
        r = watch.report(lambda r: _update(r, "rolled_back", "edge-test-worse"))
        assert r["current"] == v1 and "worse" in r["error"]

        # a bundle whose inference graph does not load: refused with the load error
        publish_bundle(broken, BROKER, prefix)
        r = watch.report(lambda r: _update(r, "rolled_back", "edge-test-broken"))
        assert r["current"] == v1 and r["error"]

        # an equally good v2: taken; then the rollback command returns to v1
        publish_bundle(b2, BROKER, prefix)
        watch.report(lambda r: _update(r, "switched", "edge-test-2"))
        watch.send("rollback")
        r = watch.report(lambda r: r["kind"] == "command" and r["command"] == "rollback")
        assert r["ok"] and r["current"] == v1
        wait_for(lambda: watch.heartbeat and watch.heartbeat["bundle_version"] == v1, 10, what="heartbeat back on v1")
        watch.send("report")
        r = watch.report(lambda r: r["kind"] == "command" and r["command"] == "report")
        assert r["result"]["current"] == v1 and r["result"]["outbox_depth"] == 0

        # round 2 on v1, then a clean shutdown
        watch.send("train_now")
        r = watch.report(lambda r: r["kind"] == "command" and r["command"] == "train_now")
        assert r["ok"] and r["result"]["round"] == 2 and r["result"]["bundle_version"] == v1
        wait_for(lambda: store.count() == 2, 20, what="second patch stored")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0, (tmp_path / "agent.log").read_text()[-3000:]
        wait_for(lambda: watch.availability[-1:] == ["stopped"], 5, what="retained stopped")
        assert "torch" not in (tmp_path / "agent.log").read_text().lower()

        # restarted: online again on v1 (nothing refetched), the round-2 patch offered again
        # under the same message id: the cloud counts a duplicate and stores nothing new
        assert duplicates() == 0
        agent = start_agent()
        wait_for(lambda: watch.availability[-1:] == ["online"], 10, what="online after restart")
        wait_for(lambda: duplicates() == 1, 20, what="re-offered patch counted as a duplicate")
        assert store.count() == 2
        watch.send("report")
        r = watch.report(lambda r: r["kind"] == "command" and r["command"] == "report")
        assert r["result"]["current"] == v1 and r["result"]["state"]["rounds"] == 2
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
    finally:
        for p in (agent, ingest):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        store.close()
        watch.close()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)     # retained model topics
        c.connect("127.0.0.1", 1883)
        c.loop_start()
        for b, v in ((b1, v1), (worse, "edge-test-worse"), (broken, "edge-test-broken"), (b2, "edge-test-2")):
            from dccl.protocol.bundle_transfer import bundle_messages
            for t, _ in bundle_messages(b, v, topics, 64 * 1024)[1]:
                c.publish(t, b"", qos=1, retain=True)
        c.disconnect()
        c.loop_stop()


def test_edge_run_refuses_bad_setups_in_one_line(tmp_path):
    from tests.edge_fixtures import run_edge_cli, write_config
    cfg = write_config(tmp_path)                                   # no hmac key
    r = run_edge_cli("edge", "run", "--config", str(cfg))
    assert r.returncode == 2 and "hmac_key" in r.stderr and r.stderr.strip().count("\n") == 0
    build_bundle(tmp_path / "bundle")                              # bundle_dir holds a bundle
    cfg = write_config(tmp_path, mqtt={"hmac_key": KEY.hex()})
    r = run_edge_cli("edge", "run", "--config", str(cfg))
    assert r.returncode == 2 and "model-update root" in r.stderr and r.stderr.strip().count("\n") == 0
