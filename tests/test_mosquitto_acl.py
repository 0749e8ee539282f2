"""deploy/mosquitto with a real Mosquitto: passwords, the ACL both ways, TLS, persistence."""

from __future__ import annotations

import shutil
import subprocess
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dccl.protocol.topics import Topics
from tests.mqtt_fixtures import REPO, Mosquitto, free_port, make_patch, wait_for

DEPLOY = REPO / "deploy" / "mosquitto"
T = Topics("dccl")
USERS = {"dccl-cloud": "cloud-secret", "pi-a": "a-secret", "pi-b": "b-secret"}

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto_passwd") or not shutil.which("openssl"),
                                reason="needs mosquitto_passwd and openssl")


def _certs(d):
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=dccl-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
        "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "ext.cnf", "-out", "server.crt")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    d = tmp_path_factory.mktemp("mosq")
    etc, var = d / "etc", d / "var"
    etc.mkdir()
    var.mkdir()
    _certs(etc)
    shutil.copy(DEPLOY / "acl", etc / "acl")
    for i, (user, pw) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(etc / "passwd"), user, pw],
                       check=True, capture_output=True)
    plain, tls = free_port(), free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    conf = conf.replace("/etc/mosquitto/dccl/", f"{etc}/").replace("/var/lib/mosquitto/", f"{var}/")
    conf = conf.replace("listener 1883 127.0.0.1", f"listener {plain} 127.0.0.1")
    conf = conf.replace("listener 8883", f"listener {tls} 127.0.0.1")
    assert str(plain) in conf and str(tls) in conf, "deploy config changed shape: update this test"
    m = Mosquitto(d / "run", conf_body=conf, port=plain).start()
    m.tls_port, m.ca = tls, str(etc / "ca.crt")
    yield m
    m.stop()


class Conn:
    def __init__(self, broker, user, pw, *, tls=False):
        self.msgs, self.pubacks, self.subacks = [], {}, {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, pw)
        if tls:
            self.c.tls_set(ca_certs=broker.ca)
        self.rc = None
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "rc", rc)
        self.c.on_message = lambda c, u, m: self.msgs.append((m.topic, bytes(m.payload)))
        self.c.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, rcs)
        self.c.connect("127.0.0.1", broker.tls_port if tls else broker.port)
        self.c.loop_start()
        wait_for(lambda: self.rc is not None, 5, what="CONNACK")

    def publish(self, topic, payload):
        info = self.c.publish(topic, payload, qos=1)
        return wait_for(lambda: self.pubacks.get(info.mid), 5, what="PUBACK")

    def subscribe(self, topic):
        _, mid = self.c.subscribe(topic, 1)
        return wait_for(lambda: self.subacks.get(mid), 5, what="SUBACK")[0]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_acl_device_publishes_only_as_itself(broker):
    cloud = Conn(broker, "dccl-cloud", USERS["dccl-cloud"])
    a = Conn(broker, "pi-a", USERS["pi-a"])
    try:
        assert not cloud.subscribe(T.shared("ingest", T.all_devices("patch"))).is_failure
        _, own = make_patch("pi-a")
        _, forged = make_patch("pi-b")
        assert not a.publish(T.patch("pi-a"), own).is_failure
        refused = a.publish(T.patch("pi-b"), forged)          # A publishing as B
        assert refused.is_failure and refused.value == 0x87, refused
        assert a.publish(T.heartbeat("pi-b"), b"{}").is_failure
        wait_for(lambda: cloud.msgs, 5, what="own patch delivered")
        time.sleep(0.3)
        assert [t for t, _ in cloud.msgs] == [T.patch("pi-a")], "a patch as pi-b was delivered"
    finally:
        cloud.close()
        a.close()


def test_acl_device_reads_only_model_and_its_commands(broker):
    a = Conn(broker, "pi-a", USERS["pi-a"])
    cloud = Conn(broker, "dccl-cloud", USERS["dccl-cloud"])
    try:
        assert not a.subscribe(T.model_announce()).is_failure
        assert not a.subscribe(T.command("pi-a")).is_failure
        assert not a.subscribe(T.command_all()).is_failure
        # Mosquitto 2.0's acl_file grants these SUBSCRIBEs and applies `read` per message:
        # what matters, and what is asserted, is that nothing outside the ACL is delivered
        for forbidden in (T.command("pi-b"), T.all_devices("patch"), "dccl/#"):
            a.subscribe(forbidden)
        assert not cloud.publish(T.command("pi-b"), b"y").is_failure
        assert not cloud.publish(T.patch("pi-b"), b"z").is_failure
        assert not cloud.publish(T.command("pi-a"), b"x").is_failure
        wait_for(lambda: a.msgs, 5)
        time.sleep(0.3)
        assert set(a.msgs) == {(T.command("pi-a"), b"x")}   # overlapping filters may repeat it
        assert a.publish(T.model_announce(), b"evil").is_failure    # devices cannot announce models
    finally:
        a.close()
        cloud.close()


def test_no_anonymous_and_no_wrong_password(broker):
    c = Conn(broker, "pi-a", "wrong")
    assert c.rc.is_failure
    c.close()
    anon = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    rc = []
    anon.on_connect = lambda c, u, f, r, p: rc.append(r)
    anon.connect("127.0.0.1", broker.port)
    anon.loop_start()
    wait_for(lambda: rc, 5)
    assert rc[0].is_failure
    anon.loop_stop()


def test_tls_listener_with_device_credentials(broker, tmp_path):
    from edge_agent.mqtt_client import EdgeMqttClient
    cloud = Conn(broker, "dccl-cloud", USERS["dccl-cloud"])
    cloud.subscribe(T.patch("pi-a"))
    dev = EdgeMqttClient("pi-a", f"mqtts://127.0.0.1:{broker.tls_port}", tmp_path / "o.db", tls_ca=broker.ca,
                         username="pi-a", password=USERS["pi-a"]).start()
    try:
        wait_for(dev.connected.is_set, 10, what="TLS connection")
        p, raw = make_patch("pi-a")
        dev.send_patch(p.message_id, raw)
        wait_for(lambda: cloud.msgs, 5, what="patch over TLS")
        assert cloud.msgs[0][1] == raw
        wait_for(lambda: dev.outbox_depth() == 0, 5)
    finally:
        dev.stop()
        cloud.close()
    # plain MQTT to the TLS port does not get a session
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain.username_pw_set("pi-a", USERS["pi-a"])
    rc = []
    plain.on_connect = lambda c, u, f, r, p: rc.append(r)
    try:
        plain.connect("127.0.0.1", broker.tls_port)
        plain.loop_start()
        time.sleep(0.5)
        assert not rc or rc[0].is_failure
    except OSError:
        pass
    finally:
        plain.loop_stop()
