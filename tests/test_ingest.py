"""Cloud ingest against real parts: Mosquitto, SQLite files, PostgreSQL, OS processes."""

from __future__ import annotations

import signal
import sys
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.ingest.service import IngestService
from cloud_trainer.ingest.store import open_store
from cloud_trainer.ingest.validate import Validator, load_spec
from dccl.protocol import envelope
from dccl.protocol.topics import Topics
from tests.mqtt_fixtures import (  # noqa: F401  (fixtures)
    BROKER, REPO, Mosquitto, device_key, make_patch, own_broker, pg_schema, prefix, store, wait_for, write_keys,
)

SPEC = {"metapatch_phi": ((64,), "float32")}


def publisher(url_port: int | None = None, host="127.0.0.1", port=1883) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(host, url_port or port)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, items: list[tuple[str, bytes]]) -> None:
    infos = [c.publish(t, p, qos=1) for t, p in items]
    for i in infos:
        i.wait_for_publish(10)


# ---- store ---------------------------------------------------------------------------
def test_store_is_idempotent_and_returns_latest_phi_per_device(store):
    p1, raw1 = make_patch("dev-a", round_=1, seed=1)
    p2, raw2 = make_patch("dev-a", round_=2, seed=2)
    p3, raw3 = make_patch("dev-b", round_=1, seed=3)
    p4, raw4 = make_patch("dev-b", round_=5, bundle="v2", seed=4)
    assert store.add(p1, raw1) is True
    assert store.add(p1, raw1) is False          # redelivery: not stored twice
    for p, r in [(p2, raw2), (p3, raw3), (p4, raw4)]:
        assert store.add(p, r)
    assert store.count() == 4
    latest = store.latest("v1")
    assert latest.device_ids == ["dev-a", "dev-b"]
    assert latest.rounds.tolist() == [2, 1]
    assert latest.sample_counts.tolist() == [102, 101]
    phi = latest.tensors["metapatch_phi"]
    assert phi.shape == (2, 64) and phi.dtype == np.float32
    np.testing.assert_array_equal(phi[0], p2.tensors["metapatch_phi"])
    np.testing.assert_array_equal(phi[1], p3.tensors["metapatch_phi"])
    assert len(store.latest("v2")) == 1 and len(store.latest("nope")) == 0
    store.quarantine("t", "bad_signature", "x", b"\x00")
    assert store.quarantine_counts() == {"bad_signature": 1}


# ---- validation in a running service -------------------------------------------------
def _bad_messages(topics: Topics):
    good_topic = topics.patch("dev-a")
    p, raw = make_patch("dev-a", seed=0)

    def signed(**kw):
        q = envelope.Patch(**{**dict(device_id="dev-a", bundle_version="v1", round=0, sample_count=1,
                                     tensors={"metapatch_phi": np.ones(64, np.float32)}), **kw})
        return envelope.encode(q, device_key(q.device_id))

    return [
        (good_topic, envelope.encode(p, b"forged key"), "bad_signature"),
        (good_topic, raw[:50], "truncated"),
        (good_topic, b"garbage", "bad_magic"),
        (topics.patch("dev-a"), signed(device_id="ghost"), "unknown_device"),
        (topics.patch("dev-b"), raw, "topic_mismatch"),
        (good_topic, signed(bundle_version="v0"), "bundle_rejected"),
        (good_topic, signed(tensors={"metapatch_phi": np.ones(63, np.float32)}), "spec_mismatch"),
        (good_topic, signed(tensors={"other": np.ones(64, np.float32)}), "spec_mismatch"),
        (good_topic, signed(tensors={"metapatch_phi": np.full(64, np.nan, np.float32)}), "non_finite"),
        (good_topic, signed(tensors={"metapatch_phi": np.full(64, 1e4, np.float32)}), "norm_bound"),
        (good_topic, signed(timestamp_ms=10 ** 15), "stale"),
    ]


def test_service_validates_quarantines_and_survives_bad_input(tmp_path, prefix):
    topics = Topics(prefix)
    store = open_store(tmp_path / "p.db")
    v = Validator(keys={d: device_key(d) for d in ["dev-a", "dev-b"]}, topics=topics, spec=load_spec(SPEC),
                  accepted_bundles=frozenset({"v1"}), norm_bound=100.0)
    svc = IngestService(BROKER, store, v, group="g", client_id=f"ing-{prefix}", session_expiry_s=5).start()
    try:
        wait_for(svc.connected.is_set, 5, what="ingest connected")
        bad = _bad_messages(topics)
        good = [make_patch("dev-a", round_=r, seed=r) for r in range(3)]
        c = publisher()
        items = [(t, m) for t, m, _ in bad] + [(topics.patch("dev-a"), raw) for _, raw in good]
        items.append((topics.patch("dev-a"), good[0][1]))          # a redelivered duplicate
        publish_all(c, items)
        wait_for(lambda: svc.processed == len(items), 10, what="all messages processed")
        assert store.count() == 3
        expected: dict[str, int] = {}
        for _, _, reason in bad:
            expected[reason] = expected.get(reason, 0) + 1
        assert store.quarantine_counts() == expected
        reg = svc.metrics.registry
        for reason, n in expected.items():
            assert reg.get_sample_value("dccl_ingest_rejected_total", {"reason": reason}) == n
        assert reg.get_sample_value("dccl_ingest_messages_total", {"outcome": "accepted"}) == 3
        assert reg.get_sample_value("dccl_ingest_messages_total", {"outcome": "duplicate"}) == 1
        c.disconnect()
    finally:
        svc.stop()
        store.close()


def test_random_garbage_never_stops_the_service(tmp_path, prefix):
    """Fuzz through the broker: random / mutated / forged messages, then a good one still lands."""
    import random
    rng = random.Random(7)
    topics = Topics(prefix)
    store = open_store(tmp_path / "p.db")
    v = Validator(keys={"dev-a": device_key("dev-a")}, topics=topics, spec=load_spec(SPEC))
    svc = IngestService(BROKER, store, v, group="g", client_id=f"ing-{prefix}", session_expiry_s=5).start()
    try:
        wait_for(svc.connected.is_set, 5)
        _, raw = make_patch("dev-a", seed=1)
        items = []
        for i in range(300):
            b = bytearray(raw)
            if i % 3 == 0:
                b = b[: rng.randrange(len(b))]
            elif i % 3 == 1:
                for _ in range(rng.randint(1, 3)):
                    b[rng.randrange(len(b))] ^= rng.randint(1, 255)
            else:
                b = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(600)))
            items.append((topics.patch("dev-a"), bytes(b)))
        p_ok, raw_ok = make_patch("dev-a", seed=2)
        items.append((topics.patch("dev-a"), raw_ok))
        c = publisher()
        publish_all(c, items)
        wait_for(lambda: svc.processed == len(items), 15, what="all processed")
        assert store.message_ids() == [p_ok.message_id]
        assert sum(store.quarantine_counts().values()) == 300
        c.disconnect()
    finally:
        svc.stop()
        store.close()


# ---- the bars --------------------------------------------------------------------------
def _ingest_cmd(broker_url, store, keys, prefix, client_id, group="ingest", schema=None):
    return [sys.executable, "-m", "dccl.cli", "cloud", "ingest", "--broker", broker_url, "--store", str(store),
            "--keys", str(keys), "--prefix", prefix, "--client-id", client_id, "--group", group,
            "--log-level", "WARNING"] + (["--pg-schema", schema] if schema else [])


def _probe_until_stored(c, topics, stores, what):
    """Publish probe patches until every store holds one: the shared subscriptions exist."""
    probes: set[bytes] = set()

    def ready():
        p, raw = make_patch("dev-b", round_=100_000 + len(probes))
        probes.add(p.message_id)
        publish_all(c, [(topics.patch("dev-b"), raw)])
        return all(s.count() > 0 for s in stores)

    wait_for(ready, 20, interval=0.1, what=what)
    return probes


def _spawn(cmd, log):
    import os
    import subprocess
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def test_broker_outage_50_patches_from_outbox_stored_exactly_once(tmp_path, own_broker, prefix):
    from edge_agent.mqtt_client import EdgeMqttClient
    topics = Topics(prefix)
    store = open_store(tmp_path / "p.db")
    v = Validator(keys={"dev-a": device_key("dev-a")}, topics=topics, spec=load_spec(SPEC))
    svc = IngestService(own_broker.url, store, v, group="g", client_id="ing-outage").start()
    dev = EdgeMqttClient("dev-a", own_broker.url, tmp_path / "outbox.db", prefix=prefix, keepalive=5,
                         backoff=(0.1, 0.5)).start()
    try:
        wait_for(lambda: svc.connected.is_set() and dev.connected.is_set(), 5, what="both connected")
        own_broker.stop()
        wait_for(lambda: not dev.connected.is_set(), 5, what="device sees the outage")
        made = []
        for r in range(50):
            p, raw = make_patch("dev-a", round_=r, seed=r)
            dev.send_patch(p.message_id, raw)
            made.append(p.message_id)
        assert dev.outbox_depth() == 50 and store.count() == 0
        own_broker.start()
        wait_for(lambda: store.count() == 50, 20, what="50 patches stored")
        wait_for(lambda: dev.outbox_depth() == 0, 5, what="outbox drained by PUBACKs")
        ids = store.message_ids()
        assert sorted(ids) == sorted(made) and len(set(ids)) == 50
        # delivered in the order they were made
        rounds = [envelope.decode(r, b"", verify=False).round for r in
                  [row[0] for row in store._db.execute("SELECT raw FROM patches ORDER BY received_ms, rowid")]]
        assert rounds == list(range(50))
    finally:
        dev.stop()
        svc.stop()
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sigkill_ingest_mid_stream_then_restart_stores_every_patch_once(tmp_path, own_broker, prefix, backend,
                                                                        request):
    keys = write_keys(tmp_path / "keys.json", ["dev-a", "dev-b"])
    if backend == "sqlite":
        db, schema = tmp_path / "p.db", None
    else:
        db, schema = request.getfixturevalue("pg_schema")
    store = open_store(db, schema=schema)        # creates the tables before the ingest process starts
    cmd = _ingest_cmd(own_broker.url, db, keys, prefix, "ing-kill", schema=schema)
    proc = _spawn(cmd, tmp_path / "ingest.log")
    topics = Topics(prefix)
    c = publisher(own_broker.port)
    n = 800
    made = [make_patch("dev-a", round_=r, seed=r) for r in range(n)]
    try:
        probes = _probe_until_stored(c, topics, [store], "ingest subscribed")
        base = store.count()
        feeder = threading.Thread(target=publish_all, args=(c, [(topics.patch("dev-a"), raw) for _, raw in made]))
        feeder.start()
        wait_for(lambda: store.count() >= base + 20, 15, interval=0.005, what="ingest mid-stream")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        at_kill = store.count()
        feeder.join(30)
        assert at_kill < base + n, "the kill came too late to be mid-stream"
        proc = _spawn(cmd, tmp_path / "ingest.log")
        made_ids = {p.message_id for p, _ in made}
        wait_for(lambda: made_ids <= set(store.message_ids()), 30, interval=0.1, what=f"all {n} stored after restart")
        ids = store.message_ids()
        assert len(ids) == len(set(ids))
        assert set(ids) - probes == made_ids
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        c.disconnect()
        store.close()


def test_two_ingest_processes_split_a_shared_subscription(tmp_path, own_broker, prefix):
    """Separate stores: a doubled message would show in both, a lost one in neither."""
    keys = write_keys(tmp_path / "keys.json", ["dev-a", "dev-b"])
    topics = Topics(prefix)
    dbs = [tmp_path / "a.db", tmp_path / "b.db"]
    procs = [_spawn(_ingest_cmd(own_broker.url, db, keys, prefix, f"ing-{i}"), tmp_path / f"i{i}.log")
             for i, db in enumerate(dbs)]
    stores = [open_store(db) for db in dbs]
    c = publisher(own_broker.port)
    try:
        probes = _probe_until_stored(c, topics, stores, "both ingest processes subscribed")
        n = 300
        made = [make_patch("dev-a", round_=r, seed=r) for r in range(n)]
        publish_all(c, [(topics.patch("dev-a"), raw) for _, raw in made])
        made_ids = {p.message_id for p, _ in made}
        wait_for(lambda: made_ids <= set(stores[0].message_ids()) | set(stores[1].message_ids()), 20,
                 interval=0.1, what="all stored")
        a, b = (set(s.message_ids()) for s in stores)
        assert not (a & b), f"{len(a & b)} messages stored by both processes"
        assert (a | b) - probes == made_ids
        a, b = a - probes, b - probes
        assert min(len(a), len(b)) > n // 10, (len(a), len(b))   # actually split
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)
        c.disconnect()
        for s in stores:
            s.close()


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    r = subprocess.run([sys.executable, "-m", "dccl.cli", "cloud", "ingest", "--keys", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, cwd=REPO, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "missing.json" in r.stderr


def test_grafana_dashboard_uses_only_metrics_that_exist():
    import json
    import re
    from cloud_trainer.ingest.service import IngestMetrics
    m = IngestMetrics()
    m.messages.labels("accepted").inc()
    known = {s.name for fam in m.registry.collect() for s in fam.samples}
    dash = json.loads((REPO / "deploy/grafana/dccl-fleet.json").read_text())
    used = {name for p in dash["panels"] for t in p["targets"]
            for name in re.findall(r"\bdccl_[a-z_]+", t["expr"])}
    # labelled gauges without samples yet still register their family name
    families = {fam.name for fam in m.registry.collect()}
    missing = {u for u in used if u not in known and not {u, u.removesuffix("_bucket"), u.removesuffix("_total")} & families}
    assert used and not missing, missing


def test_cli_serves_prometheus_metrics(tmp_path, prefix):
    import urllib.request
    from tests.mqtt_fixtures import free_port
    keys = write_keys(tmp_path / "keys.json", ["dev-a"])
    port = free_port()
    proc = _spawn(_ingest_cmd(BROKER, tmp_path / "p.db", keys, prefix, f"ing-m-{prefix}") +
                  ["--metrics-port", str(port)], tmp_path / "ingest.log")
    c = publisher()
    try:
        def scrape():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
            except OSError:
                return None
        # publish garbage until the subscription exists and it shows up as a counted rejection
        def rejected():
            publish_all(c, [(Topics(prefix).patch("dev-a"), b"junk")])
            text = scrape()
            return text if text and 'dccl_ingest_rejected_total{reason="bad_magic"}' in text else None
        text = wait_for(rejected, 15, interval=0.1, what="rejection visible on /metrics")
        assert "dccl_ingest_connected 1.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0          # clean shutdown on SIGTERM
        c.disconnect()
