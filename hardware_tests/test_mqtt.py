"""MQTT on the board: the last will marks it offline, the outbox redelivers after a broker outage,
a model update applies and rolls back. The broker is a private Mosquitto on the controller
(reached from an SSH board through a reverse tunnel), so the suite can take it down."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from dccl.protocol import payloads
from dccl.protocol.bundle_transfer import bundle_messages
from dccl.protocol.topics import Topics
from hardware_tests.broker import Observer, PrivateBroker, wait_for

T = Topics("dccl")


@pytest.fixture
def broker(tmp_path):
    try:
        b = PrivateBroker(tmp_path / "broker").start()
    except FileNotFoundError:
        pytest.skip("mosquitto is not installed on the controller")
    yield b
    b.stop()


@pytest.fixture
def device_id():
    return f"hil-{uuid.uuid4().hex[:8]}"


def _probe(target, mode, broker, device_id, tmp_path, *extra):
    args = [mode, "--broker", target.broker_for_board(broker.url), "--device-id", device_id,
            "--workdir", target.workdir(mode, tmp_path / mode), *extra]
    return target.start(args)


def test_last_will_marks_the_board_offline(target, broker, device_id, tmp_path):
    obs = Observer(broker.port, [T.availability(device_id)])
    probe = _probe(target, "mqtt-will", broker, device_id, tmp_path)
    try:
        probe.expect("connected", timeout=120)
        wait_for(lambda: b"online" in obs.on(T.availability(device_id)), 10, "retained online")
        probe.send("die")            # the board's agent dies without DISCONNECT
        wait_for(lambda: obs.on(T.availability(device_id))[-1] == b"offline", 15, "last will 'offline'")
    finally:
        probe.kill()
        obs.close()


def test_outbox_redelivers_after_a_broker_outage(target, broker, device_id, tmp_path):
    obs = Observer(broker.port, [T.patch(device_id)], client_id=f"cloud-{device_id}")
    probe = _probe(target, "mqtt-outbox", broker, device_id, tmp_path, "--timeout", "60")
    try:
        probe.expect("connected", timeout=120)
        broker.stop()                # outage: the patch can only go to the board's outbox
        probe.send("send")
        queued = probe.expect("queued", timeout=60)
        assert queued["depth"] == 1
        broker.start()               # same port, persistent sessions: the observer's subscription survives
        assert probe.expect("delivered", timeout=90)["depth"] == 0
        wait_for(lambda: obs.on(T.patch(device_id)), 15, "the patch at the cloud")
        from dccl.protocol import envelope
        got = envelope.decode(obs.on(T.patch(device_id))[0], bytes(32))
        assert got.message_id.hex() == queued["message_id"]
        probe.send("quit")
    finally:
        probe.close()
        obs.close()


def test_model_update_applies_and_rolls_back(target, broker, device_id, bundle, tmp_path):
    obs = Observer(broker.port, [T.report(device_id)])
    bad = tmp_path / "bad-bundle"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    # a bundle that arrives intact but disagrees with its own reference on this board: must not switch
    manifest["reference"]["phi_after"] = [[v + 1.0 for v in row] for row in manifest["reference"]["phi_after"]] \
        if isinstance(manifest["reference"]["phi_after"][0], list) else \
        [v + 1.0 for v in manifest["reference"]["phi_after"]]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    probe = _probe(target, "model-update", broker, device_id, tmp_path)

    def publish(src, version):
        (ann_topic, ann), chunks = bundle_messages(src, version, T)
        for topic, data in chunks:
            obs.publish(topic, data, retain=True)
        obs.publish(ann_topic, ann, retain=True)

    def update(**want):
        msg = probe.expect("update", timeout=180)
        assert {k: msg.get(k) for k in want} == want, msg
        return msg

    try:
        probe.expect("connected", timeout=120)
        publish(bundle, "hil-a")
        update(outcome="switched", version="hil-a", current="hil-a")
        publish(bundle, "hil-b")
        update(outcome="switched", version="hil-b", previous="hil-a", current="hil-b")
        publish(bad, "hil-c")
        rejected = update(outcome="rolled_back", version="hil-c", current="hil-b")
        assert "self-check" in rejected["error"]
        obs.publish(T.command(device_id), payloads.dump_command("rollback"))
        update(outcome="rolled_back", version="hil-b", current="hil-a")
        # every outcome also reached the cloud as a report
        wait_for(lambda: len(obs.on(T.report(device_id))) >= 4, 10, "model update reports")
        kinds = [payloads.load_report(p)["outcome"] for p in obs.on(T.report(device_id))]
        assert kinds == ["switched", "switched", "rolled_back", "rolled_back"]
    finally:
        probe.close()
        obs.close()
