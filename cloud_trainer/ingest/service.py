"""``dccl cloud ingest``: MQTT patches -> validation -> patch store, acknowledged after commit.

One paho client (callback API v2, MQTT 5, persistent session, ``manual_ack=True``)
subscribes to ``$share/<group>/<prefix>/device/+/patch``: every ingest process of the
group gets a share of the stream. The network thread only queues messages; one worker
validates, writes in a transaction and only then sends the PUBACK. A crash before the
commit leaves the message unacknowledged in the broker session, so it is redelivered
when the process comes back with the same client id; storage is idempotent on the
message id, so a redelivery after the commit is counted as a duplicate and not stored.

A message from a previous connection is never acknowledged on the current one (packet
ids are per connection); it is left to the broker's redelivery instead.

The same process follows heartbeats and availability (a normal, non-shared
subscription) for the fleet gauges of the Prometheus endpoint.

Under load the worker takes what is already queued (up to ``max_batch`` messages, never
waiting for more, so a lone message is not delayed), validates each, writes the accepted
patches and the quarantine rows of the whole batch in one transaction, and acknowledges
the batch's messages, in arrival order, only after that commit. One fsync then covers many
messages; the guarantee stays "acknowledged only after committed". ``max_batch=1`` is one
transaction per message.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dccl.errors import DcclError
from dccl.protocol import payloads
from dccl.protocol.broker import BrokerAddress, parse_broker_url
from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import Topics
from cloud_trainer.ingest.store import PatchStore, open_store
from cloud_trainer.ingest.validate import Validator, load_keys, load_spec
from dccl.protocol.envelope import Patch

log = logging.getLogger("dccl.ingest")


class IngestMetrics:
    """Prometheus metrics, in their own registry so several services can live in one process."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.messages = Counter("dccl_ingest_messages_total", "Patch messages by outcome", ["outcome"], registry=r)
        self.rejected = Counter("dccl_ingest_rejected_total", "Rejected patch messages by reason", ["reason"], registry=r)
        self.store_errors = Counter("dccl_ingest_store_errors_total", "Store transactions that failed (retried)", registry=r)
        self.latency = Histogram("dccl_ingest_latency_seconds", "Device timestamp to committed in the store",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600), registry=r)
        self.queue_depth = Gauge("dccl_ingest_queue_depth", "Messages received and not yet stored", registry=r)
        self.connected = Gauge("dccl_ingest_connected", "1 while connected to the broker", registry=r)
        self.patches_by_device = Counter("dccl_fleet_patches_total", "Accepted patches per device", ["device"], registry=r)
        self.online = Gauge("dccl_fleet_device_online", "1 online, 0 offline or stopped", ["device"], registry=r)
        self.last_seen = Gauge("dccl_fleet_device_last_seen_timestamp_seconds", "Last heartbeat (cloud clock)", ["device"], registry=r)
        self.temp = Gauge("dccl_fleet_device_cpu_temp_celsius", "CPU temperature", ["device"], registry=r)
        self.outbox = Gauge("dccl_fleet_device_outbox_depth", "Patches waiting on the device", ["device"], registry=r)
        self.loss = Gauge("dccl_fleet_device_last_loss", "Last local training loss", ["device"], registry=r)


@dataclass
class _Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


# What happened to one message: "accepted", "duplicate", "fleet" (heartbeat / availability /
# other topic), or the ProtocolError reason it was quarantined with.
Outcome = tuple[str, "Patch | None"]
CommitHook = Callable[[list[Outcome]], None]


class IngestService:
    def __init__(
        self,
        broker: str | BrokerAddress,
        store: PatchStore,
        validator: Validator,
        *,
        group: str = "ingest",
        client_id: str | None = None,
        keepalive: int = 30,
        session_expiry_s: int = 24 * 3600,
        tls_ca: str | None = None,
        username: str | None = None,
        password: str | None = None,
        metrics: IngestMetrics | None = None,
        follow_fleet: bool = True,
        max_batch: int = 256,
        on_commit: CommitHook | None = None,
    ):
        self.broker = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.store = store
        self.validator = validator
        self.topics = validator.topics
        self.group = group
        self.metrics = metrics or IngestMetrics()
        self.follow_fleet = follow_fleet
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}: must be >= 1")
        self.max_batch = max_batch
        self.on_commit = on_commit        # called in the worker after each commit + acks
        self._queue: queue.Queue[_Msg | None] = queue.Queue()
        self._generation = 0
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.processed = 0
        client_id = client_id or f"dccl-ingest-{socket.gethostname()}-{group}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True)
        user = username or self.broker.username
        if user:
            c.username_pw_set(user, password or self.broker.password)
        if self.broker.tls or tls_ca:
            c.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        c.reconnect_delay_set(0.5, 10)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c
        self._props = Properties(PacketTypes.CONNECT)
        self._props.SessionExpiryInterval = session_expiry_s
        self._keepalive = keepalive
        self._worker = threading.Thread(target=self._work, name="ingest-worker", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> "IngestService":
        self._worker.start()
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self._keepalive,
                                   clean_start=False, properties=self._props)
        self._client.loop_start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._queue.put(None)
        self._worker.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def wait(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(0.5)

    # ---- paho callbacks: network thread, queue only --------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self._generation += 1
        client.subscribe(self.topics.shared(self.group, self.topics.all_devices("patch")), qos=1)
        if self.follow_fleet:
            client.subscribe(self.topics.all_devices("availability"), qos=1)
            client.subscribe(self.topics.all_devices("heartbeat"), qos=0)
        self.connected.set()
        self.metrics.connected.set(1)
        log.info("connected to %s:%d (session present: %s)", self.broker.host, self.broker.port,
                 flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.metrics.connected.set(0)
        log.warning("disconnected: %s", reason_code)

    def _on_message(self, client, userdata, message):
        self._queue.put(_Msg(message.topic, bytes(message.payload), message.mid, message.qos, self._generation))
        self.metrics.queue_depth.inc()

    # ---- worker ------------------------------------------------------------------
    def _ack(self, msg: _Msg) -> None:
        if msg.qos > 0 and msg.generation == self._generation and self.connected.is_set():
            self._client.ack(msg.mid, msg.qos)

    def _work(self) -> None:
        stop = False
        while not stop:
            msg = self._queue.get()
            if msg is None:
                return
            batch = [msg]
            while len(batch) < self.max_batch:      # only what is already queued: no lingering
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self.metrics.queue_depth.dec(len(batch))
            # unacknowledged on a dead connection: the broker redelivers them
            live = [m for m in batch if m.generation == self._generation]
            if not live:
                continue
            try:
                done = self._process(live)
            except Exception:       # a bug must not stop ingest; the batch stays unacked
                log.exception("unexpected error on a batch of %d; left for redelivery", len(live))
                continue
            for m, _ in done:
                self._ack(m)
            self.processed += len(done)
            if self.on_commit is not None:
                self.on_commit([outcome for _, outcome in done])

    def process(self, topic: str, payload: bytes) -> str:
        """Validate and store one message as the worker would (without the broker): returns
        "accepted", "duplicate", "fleet" or the rejection reason. For tests, fuzzing, replays."""
        done = self._process([_Msg(topic, bytes(payload), 0, 0, self._generation)])
        if not done:
            raise RuntimeError(f"message on {topic!r} was not processed (see the log)")
        return done[0][1][0]

    def _process(self, batch: list[_Msg]) -> list[tuple[_Msg, Outcome]]:
        """Validate a batch, commit it in one transaction, update metrics. Returns the messages
        that may now be acknowledged, in arrival order, with their outcomes."""
        accepted: list[tuple[_Msg, Patch]] = []
        rejected: list[tuple[_Msg, ProtocolError]] = []
        fleet: list[_Msg] = []
        for m in batch:
            parsed = self.topics.parse_device_topic(m.topic)
            try:
                if parsed and parsed[1] == "patch":
                    try:
                        accepted.append((m, self.validator.validate(m.topic, m.payload)))
                    except ProtocolError as exc:
                        rejected.append((m, exc))
                else:
                    self._handle_fleet(m, parsed)
                    fleet.append(m)
            except Exception:       # a bug on one message: it stays unacked, the rest go on
                log.exception("unexpected error on %s; left for redelivery", m.topic)
        if accepted or rejected:
            stored = self._with_retry(
                self.store.write_batch, [(p, m.payload) for m, p in accepted],
                [(m.topic, e.reason, e.detail, m.payload) for m, e in rejected])
        else:
            stored = []
        outcome: dict[int, Outcome] = {id(m): ("fleet", None) for m in fleet}
        now = time.time()
        for (m, patch), new in zip(accepted, stored):
            if new:
                self.metrics.messages.labels("accepted").inc()
                self.metrics.patches_by_device.labels(patch.device_id).inc()
                self.metrics.latency.observe(max(0.0, now - patch.timestamp_ms / 1000))
                outcome[id(m)] = ("accepted", patch)
            else:
                self.metrics.messages.labels("duplicate").inc()
                outcome[id(m)] = ("duplicate", patch)
        for m, exc in rejected:
            self.metrics.rejected.labels(exc.reason).inc()
            self.metrics.messages.labels("rejected").inc()
            outcome[id(m)] = (exc.reason, None)
        return [(m, outcome[id(m)]) for m in batch if id(m) in outcome]

    def _with_retry(self, fn, *args) -> object:
        delay = 0.2
        while True:
            try:
                return fn(*args)
            except Exception as exc:  # database down / locked: retry, never ack an unstored message
                if self._stop.is_set():
                    raise
                self.metrics.store_errors.inc()
                log.error("store failed (%s); retrying in %.1f s", str(exc).splitlines()[0] if str(exc) else exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _handle_fleet(self, msg: _Msg, parsed: tuple[str, str] | None) -> None:
        kind = parsed[1] if parsed else None
        if kind == "availability" and parsed:
            try:
                state = payloads.load_availability(msg.payload)
            except ProtocolError:
                return
            self.metrics.online.labels(parsed[0]).set(1 if state == "online" else 0)
        elif kind == "heartbeat" and parsed:
            try:
                hb = payloads.load_heartbeat(msg.payload)
            except ProtocolError:
                return
            d = parsed[0]
            self.metrics.last_seen.labels(d).set(time.time())
            for gauge, key in ((self.metrics.temp, "cpu_temp_c"), (self.metrics.outbox, "outbox_depth"),
                               (self.metrics.loss, "last_loss")):
                if hb.get(key) is not None:
                    gauge.labels(d).set(hb[key])


# ---- CLI ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://[user:pass@]host:port or mqtts://...")
    p.add_argument("--prefix", default="dccl", help="topic prefix (default: dccl)")
    p.add_argument("--group", default="ingest", help="shared-subscription group; processes of one group split the stream")
    p.add_argument("--client-id", help="MQTT client id; keep it stable across restarts so the session survives "
                                       "(default: dccl-ingest-<hostname>-<group>)")
    p.add_argument("--store", default="patches.db", help="SQLite file path or postgresql://user@host:port/db")
    p.add_argument("--pg-schema", help="PostgreSQL schema for the tables (default: the search_path)")
    p.add_argument("--keys", required=True, help="JSON file {device_id: hex HMAC key}; unknown devices are rejected")
    p.add_argument("--spec", help="trainable spec JSON {name: [shape, dtype]} or a bundle manifest with 'trainable'")
    p.add_argument("--accept-bundle", action="append", metavar="VERSION",
                   help="accepted bundle version (repeatable; default: any)")
    p.add_argument("--norm-bound", type=float, default=1e3, help="max L2 norm of a tensor (default: 1000)")
    p.add_argument("--max-age", type=float, help="reject patches older than this many seconds (replay window)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument("--max-batch", type=int, default=256,
                   help="messages committed per transaction under load, then acknowledged (default: 256)")
    p.add_argument("--tls-ca", help="CA certificate for mqtts://")
    p.add_argument("--password-env", default="DCCL_MQTT_PASSWORD",
                   help="environment variable holding the broker password (default: DCCL_MQTT_PASSWORD)")
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        broker = parse_broker_url(args.broker)
        topics = Topics(args.prefix)
    except ValueError as exc:
        raise DcclError(str(exc)) from None
    if args.max_batch < 1:
        raise DcclError(f"--max-batch = {args.max_batch}: must be >= 1")
    validator = Validator(
        keys=load_keys(args.keys), topics=topics, spec=load_spec(args.spec),
        accepted_bundles=frozenset(args.accept_bundle) if args.accept_bundle else None,
        norm_bound=args.norm_bound, max_age_s=args.max_age,
    )
    store = open_store(args.store, schema=args.pg_schema)
    svc = IngestService(broker, store, validator, group=args.group, client_id=args.client_id,
                        tls_ca=args.tls_ca, password=os.environ.get(args.password_env),
                        max_batch=args.max_batch)
    if args.metrics_port:
        start_http_server(args.metrics_port, registry=svc.metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    svc.start()
    log.info("ingesting %s into %s", topics.shared(args.group, topics.all_devices("patch")), args.store)
    while not stop.wait(0.5):
        pass
    svc.stop()
    store.close()
    return 0
