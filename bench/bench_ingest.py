"""Ingest throughput into SQLite and PostgreSQL vs a bare paho subscriber, and patch latency.

    .venv/bin/python -m bench.bench_ingest [--broker mqtt://127.0.0.1:1883] [--n 5000]
        [--pg postgresql://postgres@127.0.0.1:5432/test] [--batch 256] [--rounds 5] [--latency 300 --rate 100]

One run, one broker (the real Mosquitto), the same N signed 64-float patches for every consumer:

- **bare**: a paho subscriber (MQTT 5, QoS 1, auto-ack) that only counts messages;
- **ingest**: ``IngestService`` as ``dccl cloud ingest`` runs it (validate: HMAC, spec, finite,
  norm; store in a transaction; ack after commit) into a SQLite file and into PostgreSQL,
  batched (``--batch``), and once with one transaction per message (``max_batch=1``).

Every consumer subscribes through a shared subscription, like ingest. A publisher in its own
process sends QoS 1 as fast as the broker takes it, but keeps at most ``--window`` messages
beyond what the consumer has finished (the broker's default queue is 1000 per client; past
it Mosquitto drops messages). Throughput = N / (first publish -> N-th message counted or
committed). Bare and batched ingest run interleaved for ``--rounds`` rounds (the machine is
shared; drift hits all alike); the ratio is of the medians.

Latency: an ``EdgeMqttClient`` (the device's real path: SQLite outbox with fsync, QoS 1,
PUBACK) sends ``--latency`` patches at ``--rate``/s; latency = commit time in the store minus
the patch's timestamp, taken when the device made it. p50 / p99 per store.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud_trainer.ingest.service import IngestService
from cloud_trainer.ingest.store import open_store
from cloud_trainer.ingest.validate import Validator
from dccl.protocol import envelope
from dccl.protocol.broker import parse_broker_url
from dccl.protocol.topics import Topics

DEVICES = [f"bench-{i:02d}" for i in range(10)]
KEYS = {d: (d * 4).encode()[:32].ljust(32, b"\0") for d in DEVICES}
SPEC = {"metapatch_phi": ((64,), "float32")}


def _client(broker: str, client_id: str = "", inflight: int | None = None) -> mqtt.Client:
    a = parse_broker_url(broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if inflight:
        c.max_inflight_messages_set(inflight)
    c.connect(a.host, a.port, keepalive=30)
    return c


def _encode(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(device id, signed envelope) x n; topics are added per consumer (own prefix)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        d = DEVICES[i % len(DEVICES)]
        p = envelope.Patch(device_id=d, bundle_version="bench-1", round=i, sample_count=100,
                           tensors={"metapatch_phi": rng.normal(0, 0.1, 64).astype(np.float32)},
                           metrics={"loss": 0.5, "steps": 20.0})
        out.append((d, envelope.encode(p, KEYS[d])))
    return out


# ---- the publisher process -------------------------------------------------------------
def _publisher(broker: str, messages: list[tuple[str, bytes]], jobs, done, consumed, window: int) -> None:
    """Waits for a prefix on ``jobs``, publishes every message under it with flow control,
    reports (t_first_publish) on ``done``. ``consumed`` is set by the consumer's process."""
    c = _client(broker, f"bench-pub-{uuid.uuid4().hex[:6]}", inflight=1000)
    c.loop_start()
    while True:
        prefix = jobs.get()
        if prefix is None:
            break
        topics = Topics(prefix)
        t0 = time.perf_counter()
        infos = []
        for i, (d, raw) in enumerate(messages):
            while i - consumed.value >= window:
                time.sleep(0.0005)
            infos.append(c.publish(topics.patch(d), raw, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        done.put(t0)
    c.disconnect()
    c.loop_stop()


class Publisher:
    def __init__(self, broker: str, messages: list[tuple[str, bytes]], window: int):
        ctx = mp.get_context("spawn")
        self.consumed = ctx.RawValue("q", 0)
        self.jobs, self.done = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_publisher, args=(broker, messages, self.jobs, self.done, self.consumed,
                                                         window), daemon=True)
        self.proc.start()

    def run(self, prefix: str) -> None:
        self.consumed.value = 0
        self.jobs.put(prefix)

    def first_publish(self, timeout: float) -> float:
        return self.done.get(timeout=timeout)

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(10)


# ---- consumers ---------------------------------------------------------------------------
class Bare:
    """Counts messages, nothing else (paho acks QoS 1 itself)."""

    def __init__(self, broker: str, prefix: str, on_count: Callable[[int], None]):
        self.n = 0
        self.subscribed = threading.Event()
        self.c = _client(broker)
        topics = Topics(prefix)

        def on_message(c, u, m):
            self.n += 1
            on_count(self.n)

        self.c.on_message = on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.subscribe(topics.shared("bench", topics.all_devices("patch")), qos=1)
        self.c.loop_start()
        self.subscribed.wait(10)

    def count(self) -> int:
        return self.n

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Ingest:
    def __init__(self, broker: str, prefix: str, store_url: str, on_count: Callable[[int], None],
                 max_batch: int, schema: str | None = None, on_latency: Callable[[float], None] | None = None):
        self.store = open_store(store_url, schema=schema)
        self.n = 0

        self.commits = 0

        def on_commit(outcomes):
            now = time.time()
            self.n += len(outcomes)
            self.commits += 1
            on_count(self.n)
            if on_latency:
                for kind, patch in outcomes:
                    if kind == "accepted":
                        on_latency(now - patch.timestamp_ms / 1000)

        v = Validator(keys=KEYS, topics=Topics(prefix), spec=SPEC, norm_bound=1e3)
        self.svc = IngestService(broker, self.store, v, group="bench", client_id=f"bench-ing-{uuid.uuid4().hex[:8]}",
                                 session_expiry_s=0, follow_fleet=False, max_batch=max_batch,
                                 on_commit=on_commit).start()
        self.svc.connected.wait(10)

    def count(self) -> int:
        return self.n

    def close(self) -> None:
        self.svc.stop()
        self.store.close()


def _probe(broker: str, prefix: str, consumer, timeout: float) -> None:
    """Publish valid probe patches until the consumer has seen one: the subscription is live."""
    c = _client(broker)
    c.loop_start()
    topics = Topics(prefix)
    deadline = time.monotonic() + timeout
    try:
        while consumer.count() == 0:
            if time.monotonic() > deadline:
                raise TimeoutError("consumer never received a probe")
            d = DEVICES[0]
            p = envelope.Patch(device_id=d, bundle_version="bench-1", round=0, sample_count=1,
                               tensors={"metapatch_phi": np.zeros(64, np.float32)})
            c.publish(topics.patch(d), envelope.encode(p, KEYS[d]), qos=1).wait_for_publish(5)
            t = time.monotonic()
            while consumer.count() == 0 and time.monotonic() - t < 0.3:
                time.sleep(0.01)
    finally:
        c.disconnect()
        c.loop_stop()


def measure(name: str, make, pub: Publisher, broker: str, n: int, timeout: float) -> float:
    prefix = f"bench-{uuid.uuid4().hex[:8]}/dccl"
    base = [0]

    def on_count(k: int) -> None:
        pub.consumed.value = k - base[0]

    consumer = make(prefix, on_count)
    try:
        _probe(broker, prefix, consumer, 10)
        time.sleep(0.2)                         # a second probe may still be in flight
        base[0] = consumer.count()
        pub.run(prefix)
        deadline = time.monotonic() + timeout
        while consumer.count() - base[0] < n:
            if time.monotonic() > deadline or not pub.proc.is_alive():
                raise TimeoutError(f"{name}: {consumer.count() - base[0]} of {n} in {timeout} s"
                                   + ("" if pub.proc.is_alive() else " (the publisher process died)"))
            time.sleep(0.001)
        t1 = time.perf_counter()
        t0 = pub.first_publish(timeout)
        rate = n / (t1 - t0)
        per_commit = f", {consumer.n / consumer.commits:.0f} msg/commit" if getattr(consumer, "commits", 0) else ""
        print(f"  {name:<26} {rate:9.0f} msg/s  ({n} in {t1 - t0:.2f} s{per_commit})", flush=True)
        return rate
    finally:
        consumer.close()


def latency(name: str, broker: str, store_url: str, schema: str | None, n: int, rate: float, batch: int,
            workdir: Path, timeout: float) -> tuple[float, float]:
    from edge_agent.mqtt_client import EdgeMqttClient

    prefix = f"bench-{uuid.uuid4().hex[:8]}/dccl"
    lat: list[float] = []
    ing = Ingest(broker, prefix, store_url, lambda k: None, batch, schema, on_latency=lat.append)
    d = DEVICES[1]
    dev = EdgeMqttClient(d, broker, workdir / f"outbox-{uuid.uuid4().hex[:6]}.db", prefix=prefix).start()
    try:
        dev.connected.wait(10)
        _probe(broker, prefix, ing, 10)
        time.sleep(0.2)
        lat.clear()
        rng = np.random.default_rng(1)
        t_next = time.monotonic()
        for r in range(n):
            p = envelope.Patch(device_id=d, bundle_version="bench-1", round=r, sample_count=50,
                               tensors={"metapatch_phi": rng.normal(0, 0.1, 64).astype(np.float32)},
                               metrics={"loss": 0.5})
            dev.send_patch(p.message_id, envelope.encode(p, KEYS[d]))
            t_next += 1.0 / rate
            time.sleep(max(0.0, t_next - time.monotonic()))
        deadline = time.monotonic() + timeout
        while len(lat) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"latency {name}: {len(lat)} of {n} stored")
            time.sleep(0.01)
        ms = np.asarray(lat) * 1000
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        print(f"  {name:<26} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   max {ms.max():6.1f} ms  ({n} at {rate:g}/s)",
              flush=True)
        return p50, p99
    finally:
        dev.stop()
        ing.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL URL ('' to skip)")
    ap.add_argument("--n", type=int, default=5000, help="messages per consumer (default 5000)")
    ap.add_argument("--window", type=int, default=500, help="max messages ahead of the consumer (default 500)")
    ap.add_argument("--batch", type=int, default=256, help="ingest max_batch for the batched runs (default 256)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of bare + batched ingest (default 5)")
    ap.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                    help="skip the one-transaction-per-message runs (max_batch=1)")
    ap.add_argument("--latency", type=int, default=300, help="patches for the latency runs (0: skip)")
    ap.add_argument("--rate", type=float, default=100.0, help="patches per second in the latency runs")
    ap.add_argument("--timeout", type=float, default=120.0, help="per phase, seconds")
    args = ap.parse_args(argv)

    pg_schema = None
    if args.pg:
        import psycopg
        pg_schema = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            psycopg.connect(args.pg, connect_timeout=3).close()
        except psycopg.Error as exc:
            print(f"PostgreSQL not reachable ({exc}); skipping it")
            args.pg = ""
    messages = _encode(args.n)
    print(f"broker {args.broker}; {args.n} signed patches of {len(messages[0][1])} bytes from {len(DEVICES)} devices; "
          f"window {args.window}")
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dccl-bench-ingest-") as tmp:
        work = Path(tmp)
        pub = Publisher(args.broker, messages, args.window)
        rates: dict[str, list[float]] = {}
        try:
            print("throughput:")

            def run(name, make):
                rates.setdefault(name, []).append(measure(name, make, pub, args.broker, args.n, args.timeout))

            targets = [("sqlite", lambda: str(work / f"p-{uuid.uuid4().hex[:6]}.db"), None)]
            if args.pg:
                targets.append(("postgres", lambda: args.pg, pg_schema))

            def ingest(store_name, url, schema, batch):
                return (f"ingest {store_name} batch={batch}",
                        lambda p, cb, u=url(), b=batch, s=schema: Ingest(
                            args.broker, p, u, cb, b, None if s is None else f"{s}_{b}_{uuid.uuid4().hex[:4]}"))

            # bare and batched ingest interleaved, the order rotated each round: the machine is
            # shared, so drift hits all of them alike; medians over the rounds
            contenders = [("bare", lambda p, cb: Bare(args.broker, p, cb))]
            contenders += [ingest(name, url, schema, args.batch) for name, url, schema in targets]
            for r in range(args.rounds):
                for k in range(len(contenders)):
                    run(*contenders[(k + r) % len(contenders)])
            if args.unbatched:
                for name, url, schema in targets:
                    run(*ingest(name, url, schema, 1))
        finally:
            pub.close()
        bare = statistics.median(rates["bare"])
        print(f"ratio of medians vs bare ({bare:.0f} msg/s, median of {len(rates['bare'])}), goal >= 0.7x:")
        for name, rs in rates.items():
            if name.startswith("ingest"):
                r = statistics.median(rs)
                print(f"  {name:<26} {r:7.0f} msg/s  {r / bare:5.2f}x  {'ok' if r / bare >= 0.7 else 'MISSES the goal'}")
        if args.latency:
            print(f"latency device -> stored (EdgeMqttClient outbox -> broker -> ingest batch={args.batch} commit):")
            latency("sqlite", args.broker, str(work / "lat.db"), None, args.latency, args.rate, args.batch, work,
                    args.timeout)
            if args.pg:
                latency("postgres", args.broker, args.pg, f"{pg_schema}_lat", args.latency, args.rate, args.batch,
                        work, args.timeout)
    if args.pg:
        import psycopg
        with psycopg.connect(args.pg, autocommit=True) as c:
            names = c.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (pg_schema + "%",)).fetchall()
            for (name,) in names:
                c.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    print(f"done in {time.monotonic() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
