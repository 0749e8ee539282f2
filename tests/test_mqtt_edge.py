"""The device side against a real Mosquitto: outbox, delivery, reconnect, availability."""

from __future__ import annotations

import queue
import signal
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dccl.protocol import payloads
from dccl.protocol.topics import Topics
from edge_agent.heartbeat import TrainingStatus, collect, cpu_temperature_c
from edge_agent.mqtt_client import EdgeMqttClient
from edge_agent.outbox import Outbox
from tests.mqtt_fixtures import (  # noqa: F401
    BROKER, REPO, Mosquitto, make_patch, own_broker, prefix, spawn_device, wait_for,
)


class Sub:
    """A plain paho subscriber that records (topic, payload, retain)."""

    def __init__(self, port: int, topic_filter: str, client_id: str | None = None, persistent: bool = False):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        self.q: queue.Queue = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or "", protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.q.put((m.topic, bytes(m.payload), m.retain))
        ready = []
        self.c.on_subscribe = lambda *a: ready.append(1)
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300
        self.c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.c.loop_start()
        self.c.subscribe(topic_filter, 1)
        wait_for(lambda: ready, 5, what="subscribed")

    def drain(self, n: int, timeout: float = 10.0) -> list:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            out.append(self.q.get(timeout=max(0.01, deadline - time.monotonic())))
        return out

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_outbox_orders_dedups_and_survives_reopen(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    a = ob.put(b"a" * 16, "t", b"1")
    b = ob.put(b"b" * 16, "t", b"2")
    assert ob.put(b"a" * 16, "t", b"1") is None           # same message id: stored once
    assert [r.payload for r in ob.pending()] == [b"1", b"2"] and a < b
    ob.delete(a)
    ob.close()
    ob = Outbox(tmp_path / "o.db")
    assert [r.message_id for r in ob.pending()] == [b"b" * 16]
    assert ob._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_patches_made_before_start_are_delivered_in_order_then_deleted(tmp_path, prefix):
    topics = Topics(prefix)
    sub = Sub(1883, topics.patch("dev-a"))
    ob = Outbox(tmp_path / "o.db")
    made = [make_patch("dev-a", round_=r) for r in range(20)]
    for p, raw in made:            # as if the device rebooted with a full outbox
        ob.put(p.message_id, topics.patch("dev-a"), raw)
    dev = EdgeMqttClient("dev-a", BROKER, ob, prefix=prefix).start()
    try:
        got = sub.drain(20)
        assert [g[1] for g in got] == [raw for _, raw in made]
        wait_for(lambda: ob.depth() == 0, 5, what="outbox drained")
        assert dev.send_patch(made[0][0].message_id, made[0][1]) is not None   # new row after delete is fine
    finally:
        dev.stop()
        sub.close()


def test_patch_without_any_subscriber_stays_in_the_outbox_until_one_exists(tmp_path, prefix):
    topics = Topics(prefix)
    dev = EdgeMqttClient("dev-a", BROKER, tmp_path / "o.db", prefix=prefix).start()
    try:
        wait_for(dev.connected.is_set, 5)
        p, raw = make_patch("dev-a")
        dev.send_patch(p.message_id, raw)
        wait_for(lambda: dev.unrouted_publishes >= 1, 5, what="PUBACK 'no matching subscribers'")
        assert dev.outbox_depth() == 1
        sub = Sub(1883, topics.patch("dev-a"))
        assert sub.drain(1, timeout=10)[0][1] == raw
        wait_for(lambda: dev.outbox_depth() == 0, 5)
        sub.close()
    finally:
        dev.stop()


def test_reconnect_renews_subscriptions_after_broker_restart_without_persistence(tmp_path):
    port_broker = Mosquitto(tmp_path / "b", conf_body=None)
    port = port_broker.port
    port_broker.conf.write_text(port_broker.conf.read_text().replace("persistence true", "persistence false"))
    port_broker.start()
    dev = EdgeMqttClient("dev-a", port_broker.url, tmp_path / "o.db", prefix="p", backoff=(0.1, 0.5)).start()
    try:
        dev.subscribe(Topics("p").command("dev-a"))
        wait_for(dev.connected.is_set, 5)
        port_broker.stop()
        wait_for(lambda: not dev.connected.is_set(), 5)
        port_broker.start()               # a fresh broker: no session, no subscription
        wait_for(dev.connected.is_set, 10, what="reconnected")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        deadline = time.monotonic() + 5
        while dev.inbox.empty() and time.monotonic() < deadline:
            pub.publish(Topics("p").command("dev-a"), payloads.dump_command("report"), qos=1).wait_for_publish(2)
            time.sleep(0.1)
        msg = dev.inbox.get(timeout=1)
        assert payloads.load_command(msg.payload)["command"] == "report"
        pub.disconnect()
        pub.loop_stop()
    finally:
        dev.stop()
        port_broker.stop()


def test_a_subscription_made_while_the_client_connects_is_never_lost(tmp_path, prefix):
    """subscribe() from the application thread while on_connect (paho's thread) is renewing the
    remembered subscriptions: the new one must be renewed there or sent by subscribe() itself. The
    window is forced open: on_connect's availability publish — after it has walked the subscriptions,
    before the client counts as connected — waits until another thread has entered subscribe().
    (Unguarded, this window loses the subscription: the likely cause of a model announcement that never
    reached a device in one suite run.)"""
    import threading

    dev = EdgeMqttClient("dev-race", BROKER, tmp_path / "o.db", prefix=prefix)
    entered, done = threading.Event(), threading.Event()
    publish = dev._client.publish

    def slow_publish(topic, *a, **kw):
        if topic == Topics(prefix).availability("dev-race") and not done.is_set():
            entered.wait(5)          # the application thread is inside subscribe() now
            time.sleep(0.2)          # and, unguarded, has already found the client not connected
        return publish(topic, *a, **kw)

    dev._client.publish = slow_publish
    topic = Topics(prefix).command("dev-race")

    def app_subscribe():
        entered.set()
        dev.subscribe(topic)
        done.set()

    real_subscribe = dev._client.subscribe
    renewed: list[str] = []

    def recording_subscribe(topic_filter, *a, **kw):
        renewed.append(topic_filter)
        if topic_filter == "never/renewed" and not entered.is_set():
            threading.Thread(target=app_subscribe, daemon=True).start()
        return real_subscribe(topic_filter, *a, **kw)

    dev._client.subscribe = recording_subscribe
    dev.subscribe("never/renewed")     # on_connect renews it, and starts the application's subscribe
    dev.start()
    try:
        wait_for(dev.connected.is_set, 10)
        wait_for(done.is_set, 10, what="the application's subscribe() returned")
        assert topic in renewed
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", 1883)
        pub.loop_start()
        pub.publish(topic, payloads.dump_command("report"), qos=1).wait_for_publish(2)
        msg = dev.inbox.get(timeout=5)
        assert msg.topic == topic and payloads.load_command(msg.payload)["command"] == "report"
        pub.disconnect()
        pub.loop_stop()
    finally:
        dev.stop()


def _availability(prefix, device_id):
    sub = Sub(1883, Topics(prefix).availability(device_id))
    return sub


def test_availability_online_then_stopped_on_clean_shutdown(tmp_path, prefix):
    sub = _availability(prefix, "dev-a")
    dev = EdgeMqttClient("dev-a", BROKER, tmp_path / "o.db", prefix=prefix).start()
    assert sub.drain(1)[0][1] == b"online"
    dev.stop()
    assert sub.drain(1)[0][1] == b"stopped"
    sub.close()
    late = _availability(prefix, "dev-a")          # retained: a late subscriber sees it too
    t, payload, retain = late.drain(1)[0]
    assert payload == b"stopped" and retain
    late.close()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_device_process_gone_is_offline_in_time(tmp_path, prefix, how):
    """SIGKILL: the OS closes the socket, the broker publishes the will: the bar is 1.5 x
    keepalive. SIGSTOP: the socket stays open and silent, like a board that lost power or
    network; only the broker's keepalive timeout notices. Mosquitto 2.0.11 measured here
    (whole-second keepalive bookkeeping, a shared 2-core machine) took 2.1-3.5 x keepalive
    for that (2 s -> 4.3-6.9 s, 6 s -> 11.3 s), and more when other jobs load the machine,
    so that case only proves the broker's keepalive notices (bound 4 x keepalive + 2 s);
    the 1.5 x bar is asserted for a killed process, not for a frozen one."""
    keepalive = 2
    sub = _availability(prefix, "dev-k")
    proc = spawn_device("dev-k", BROKER, prefix, tmp_path / "o.db", keepalive=keepalive)
    bound = 1.5 * keepalive if how == "SIGKILL" else 4 * keepalive + 2.0
    try:
        assert sub.drain(1)[0][1] == b"online"
        t0 = time.monotonic()
        proc.send_signal(getattr(signal, how))
        topic, payload, _ = sub.drain(1, timeout=bound + 2)[0]
        elapsed = time.monotonic() - t0
        assert payload == b"offline"
        print(f"{how}: offline after {elapsed:.2f} s (keepalive {keepalive} s)")
        assert elapsed <= bound, elapsed
    finally:
        proc.kill()
        proc.wait()
        sub.close()


def test_heartbeat_has_the_fleet_fields(tmp_path):
    hb = collect("dev-a", TrainingStatus(bundle_version="v1", last_loss=0.3), outbox_depth=4, data_dir=tmp_path)
    parsed = payloads.load_heartbeat(payloads.dump_heartbeat(**hb))
    assert parsed["outbox_depth"] == 4 and parsed["bundle_version"] == "v1" and parsed["agent_version"]
    for k in ("mem_total_mb", "load1", "disk_free_mb", "uptime_s"):
        assert parsed[k] is not None and parsed[k] >= 0, k
    zone = tmp_path / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("48250\n")
    assert cpu_temperature_c(tmp_path / "thermal") == pytest.approx(48.25)
    assert cpu_temperature_c(tmp_path / "nothing") is None


def test_edge_agent_never_imports_torch_or_cloud_code():
    code = ("import sys, edge_agent.mqtt_client, edge_agent.outbox, edge_agent.heartbeat, edge_agent.model_update;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','pydantic','cloud_trainer','onnx_export')];"
            "print(bad); sys.exit(1 if bad else 0)")
    for exe in [REPO / ".venv/bin/python", REPO / ".venv-edge/bin/python"]:
        if exe.exists():
            r = subprocess.run([str(exe), "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
            assert r.returncode == 0, (exe, r.stdout, r.stderr[-1000:])


# ---- model distribution over MQTT ------------------------------------------------------
def _bundle(d, version_seed: int):
    import hashlib
    import json
    import os
    d.mkdir(parents=True)
    files = {"model.onnx": os.urandom(10_000 + version_seed), "sub/extra.bin": bytes([version_seed]) * 300}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    (d / "manifest.json").write_text(json.dumps(
        {"version": f"v{version_seed}", "files": {r: {"sha256": hashlib.sha256(b).hexdigest()} for r, b in files.items()}}))
    return files


class Cloud:
    """Publishes a bundle retained, as the cloud would; clears the retained topics at the end."""

    def __init__(self, prefix):
        self.topics, self.retained = Topics(prefix), set()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.connect("127.0.0.1", 1883)
        self.c.loop_start()

    def publish(self, topic, payload):
        self.retained.add(topic)
        self.c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    def publish_bundle(self, bundle_dir, version, chunk_size=4096, corrupt=None):
        from dccl.protocol.bundle_transfer import bundle_messages
        (ann_topic, ann), chunks = bundle_messages(bundle_dir, version, self.topics, chunk_size)
        for t, data in chunks:
            self.publish(t, (b"X" + data[1:]) if t == corrupt else data)
        self.publish(ann_topic, ann)
        return chunks

    def close(self):
        for t in self.retained:
            self.c.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
        self.c.disconnect()
        self.c.loop_stop()


def _pump(dev, updater, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not until():
        try:
            updater.handle(dev.inbox.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError("model update did not finish") from None


def test_bundle_over_mqtt_is_verified_switched_atomically_and_resumable(tmp_path, prefix):
    from edge_agent.model_update import ModelUpdater
    cloud = Cloud(prefix)
    files = _bundle(tmp_path / "b1", 1)
    chunks = cloud.publish_bundle(tmp_path / "b1", "v1")
    # resume: a previous attempt already holds the first three chunks of file 1
    root = tmp_path / "agent"
    part = root / "partial" / "v1"
    part.mkdir(parents=True)
    import json

    from dccl.protocol import payloads as pl
    from dccl.protocol.bundle_transfer import bundle_messages
    ann = pl.load_announcement(bundle_messages(tmp_path / "b1", "v1", Topics(prefix), 4096)[0][1])
    (part / "announcement.json").write_text(json.dumps(ann))
    model = (tmp_path / "b1" / "model.onnx").read_bytes()
    file_index = [e["path"] for e in ann["files"]].index("model.onnx")
    for c in range(3):
        (part / f"{file_index}.{c}").write_bytes(model[c * 4096:(c + 1) * 4096])
    reports = Sub(1883, Topics(prefix).report("dev-a"))
    dev = EdgeMqttClient("dev-a", BROKER, tmp_path / "o.db", prefix=prefix).start()
    switched = []
    up = ModelUpdater(root, dev, check=lambda new, old: (new / "model.onnx").exists(),
                      on_switch=lambda v, p: switched.append(v)).start()
    try:
        _pump(dev, up, lambda: up.current_version == "v1")
        assert up.chunks_received == len(chunks) - 3          # only the missing chunks travelled
        for rel, data in files.items():
            assert (up.bundle_path() / rel).read_bytes() == data
        assert switched == ["v1"] and not part.exists()
        rep = pl.load_report(reports.drain(1)[0][1])
        assert rep["kind"] == "model_update" and rep["outcome"] == "switched" and rep["version"] == "v1"

        # v2 arrives with one corrupted chunk: refused, then the cloud republishes it
        _bundle(tmp_path / "b2", 2)
        bad_topic = Topics(prefix).model_chunk("v2", 1, 0)
        cloud.publish_bundle(tmp_path / "b2", "v2", corrupt=bad_topic)
        _pump(dev, up, lambda: any(r["outcome"] == "verify_failed" for r in up.reports))
        assert up.current_version == "v1"
        cloud.publish_bundle(tmp_path / "b2", "v2")        # fixed chunk, re-fetched on its own
        _pump(dev, up, lambda: up.current_version == "v2")
        assert json.loads((root / "state.json").read_text()) == {"current": "v2", "previous": "v1"}
        assert up.bundle_path("v1").exists()               # previous kept for rollback

        assert up.rollback() and up.current_version == "v1"
    finally:
        dev.stop()
        reports.close()
        cloud.close()


def test_bundle_that_fails_the_check_is_rolled_back(tmp_path, prefix):
    from edge_agent.model_update import ModelUpdater
    cloud = Cloud(prefix)
    _bundle(tmp_path / "b1", 1)
    _bundle(tmp_path / "b2", 2)
    dev = EdgeMqttClient("dev-a", BROKER, tmp_path / "o.db", prefix=prefix).start()

    def check(new, old):
        if new.name == "v2":
            raise RuntimeError("InferenceSession failed to load")
        return True

    up = ModelUpdater(tmp_path / "agent", dev, check=check).start()
    try:
        cloud.publish_bundle(tmp_path / "b1", "v1")
        _pump(dev, up, lambda: up.current_version == "v1")
        cloud.publish_bundle(tmp_path / "b2", "v2")
        _pump(dev, up, lambda: any(r["outcome"] == "rolled_back" for r in up.reports))
        assert up.current_version == "v1"
        assert "failed to load" in up.reports[-1]["error"]
    finally:
        dev.stop()
        cloud.close()
