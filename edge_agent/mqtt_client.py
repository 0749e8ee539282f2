"""The device's MQTT connection: durable patch delivery, availability, subscriptions.

paho-mqtt 2.x, callback API v2, MQTT 5 with a persistent session (``clean_start=False``
and a session expiry), so QoS 1 messages for the device survive a reconnect. paho's own
network thread (``loop_start``) reconnects; we set a fresh exponential delay with jitter
after every failure so a fleet that lost its broker does not reconnect in lockstep.

Callbacks only hand work to queues. ``connected`` is set only on a *successful* CONNACK.
Patches go through the SQLite outbox: stored first, published only while connected,
deleted on PUBACK (mid -> outbox row), republished in order after a restart.

A PUBACK with reason 0x10 "no matching subscribers" means the broker took the patch
but nobody (no cloud ingest) was subscribed: the patch would be gone. The row stays and
is published again later, with backoff. This also covers a Mosquitto 2.0.11 behaviour
measured here: shared subscriptions are not restored from persistence after a broker
restart, so until ingest reconnects, patches have no subscriber.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from dccl.protocol.broker import BrokerAddress, parse_broker_url
from dccl.protocol.payloads import dump_availability
from dccl.protocol.topics import (
    OFFLINE, ONLINE, QOS_AVAILABILITY, QOS_PATCH, STOPPED, Topics, check_id,
)
from edge_agent.outbox import Outbox

log = logging.getLogger("dccl.edge.mqtt")

NO_MATCHING_SUBSCRIBERS = 0x10


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool


class EdgeMqttClient:
    def __init__(
        self,
        device_id: str,
        broker: str | BrokerAddress,
        outbox: Outbox | str | Path,
        *,
        prefix: str = "dccl",
        keepalive: int = 30,
        session_expiry_s: int = 7 * 24 * 3600,
        backoff: tuple[float, float] = (0.5, 60.0),
        tls_ca: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ):
        self.device_id = check_id(device_id)
        self.broker = parse_broker_url(broker) if isinstance(broker, str) else broker
        self.topics = Topics(prefix)
        self.outbox = outbox if isinstance(outbox, Outbox) else Outbox(outbox)
        self.keepalive = keepalive
        self._backoff_min, self._backoff_max = backoff
        self._attempt = 0
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.connected = threading.Event()
        self.last_connect_error: str | None = None
        self.refused_publishes = 0          # PUBACKs with a failure reason code (e.g. not authorized)
        self._subs: dict[str, int] = {}
        # Guards _subs with the connected flag: a subscribe() that lands while on_connect (network thread)
        # renews the subscriptions must be either renewed by it or sent by subscribe() itself, never neither.
        self._subs_lock = threading.Lock()
        self._events: queue.Queue[tuple] = queue.Queue()
        self._inflight: dict[int, int] = {}   # paho mid -> outbox seq (worker thread only)
        self._sent: set[int] = set()          # outbox seqs handed to paho in this process
        self._refused: set[int] = set()       # refused by the broker: retried on the next connection
        self._unrouted: set[int] = set()      # no subscriber at the broker: retried after a delay
        self._unrouted_delay = 0.0
        self._retry_at: float | None = None
        self.unrouted_publishes = 0
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dccl-dev-{self.device_id}",
                        protocol=mqtt.MQTTv5)
        user = username or self.broker.username
        if user:
            c.username_pw_set(user, password or self.broker.password)
        if self.broker.tls or tls_ca:
            c.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
        # last will: retained "offline", sent by the broker if we vanish without DISCONNECT
        c.will_set(self.topics.availability(self.device_id), dump_availability(OFFLINE),
                   qos=QOS_AVAILABILITY, retain=True)
        c.reconnect_delay_set(self._backoff_min, self._backoff_min)
        c.on_connect = self._on_connect
        c.on_connect_fail = self._on_connect_fail
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self._client = c
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self._connect_props = props

    # ---- public API ----------------------------------------------------------------
    def start(self) -> "EdgeMqttClient":
        self._worker = threading.Thread(target=self._work, name=f"outbox-{self.device_id}", daemon=True)
        self._worker.start()
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self.keepalive,
                                   clean_start=False, properties=self._connect_props)
        self._client.loop_start()
        self._events.put(("kick",))
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Clean shutdown: retained ``stopped``, then DISCONNECT (so the will is not sent)."""
        self._stopping.set()
        if self.connected.is_set():
            info = self._client.publish(self.topics.availability(self.device_id), dump_availability(STOPPED),
                                        qos=QOS_AVAILABILITY, retain=True)
            try:
                info.wait_for_publish(timeout)
            except RuntimeError:
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self._events.put(("stop",))
        if self._worker:
            self._worker.join(timeout)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Remembered and renewed in on_connect; effective now if connected."""
        with self._subs_lock:
            self._subs[topic_filter] = qos
            if self.connected.is_set():
                self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._subs_lock:
            self._subs.pop(topic_filter, None)
            if self.connected.is_set():
                self._client.unsubscribe(topic_filter)

    def send_patch(self, message_id: bytes, payload: bytes) -> int | None:
        """Durably enqueue a signed patch; returns its outbox seq (None if already queued)."""
        seq = self.outbox.put(message_id, self.topics.patch(self.device_id), payload, QOS_PATCH)
        self._events.put(("kick",))
        return seq

    def publish_telemetry(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Best-effort (heartbeats, reports): returns False, not silently, when offline."""
        if not self.connected.is_set():
            return False
        return self._client.publish(topic, payload, qos=qos, retain=retain).rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def outbox_depth(self) -> int:
        return self.outbox.depth()

    # ---- paho callbacks (network thread): hand work to queues ------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_connect_error = str(reason_code)
            log.warning("broker refused connection: %s", reason_code)
            return
        self._attempt = 0
        client.reconnect_delay_set(self._backoff_min, self._backoff_min)
        with self._subs_lock:
            for topic_filter, qos in self._subs.items():
                client.subscribe(topic_filter, qos)
            client.publish(self.topics.availability(self.device_id), dump_availability(ONLINE),
                           qos=QOS_AVAILABILITY, retain=True)
            self.connected.set()
        self._events.put(("connected",))

    def _next_delay(self) -> None:
        # exponential backoff with jitter, applied to paho's next reconnect wait
        self._attempt += 1
        cap = min(self._backoff_max, self._backoff_min * 2 ** min(self._attempt, 20))
        delay = random.uniform(cap / 2, cap)
        self._client.reconnect_delay_set(delay, delay)

    def _on_connect_fail(self, client, userdata):
        self.last_connect_error = "connection failed"
        self._next_delay()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self._next_delay()
        self._events.put(("disconnected",))

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._events.put(("puback", mid, reason_code.is_failure, reason_code.value == NO_MATCHING_SUBSCRIBERS))

    def _on_message(self, client, userdata, message):
        self.inbox.put(Inbound(message.topic, bytes(message.payload), bool(message.retain)))

    # ---- worker thread: outbox -> broker, PUBACK -> delete -------------------------
    def _publish_pending(self) -> None:
        for row in self.outbox.pending():
            if row.seq in self._sent or row.seq in self._refused or row.seq in self._unrouted:
                continue   # paho holds it and resends it itself after a reconnect
            if not self.connected.is_set():
                return
            info = self._client.publish(row.topic, row.payload, qos=row.qos)
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._inflight[info.mid] = row.seq
                self._sent.add(row.seq)

    def _work(self) -> None:
        while True:
            timeout = None if self._retry_at is None else max(0.0, self._retry_at - time.monotonic())
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                ev = ("kick",)
            if self._retry_at is not None and time.monotonic() >= self._retry_at:
                self._unrouted.clear()          # time to offer the unrouted patches again
                self._retry_at = None
                self._events.put(("kick",))
            kind = ev[0]
            if kind == "stop":
                return
            if kind == "puback":
                self._on_puback(ev[1], failed=ev[2], unrouted=ev[3])
            elif kind in ("kick", "connected") and not self._stopping.is_set():
                if kind == "connected":
                    self._refused.clear()
                self._publish_pending()

    def _on_puback(self, mid: int, failed: bool, unrouted: bool) -> None:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return              # availability / telemetry, not an outbox row
        self._sent.discard(seq)
        if failed:
            self.refused_publishes += 1
            self._refused.add(seq)
            log.error("broker refused patch (outbox seq %d); kept for the next connection", seq)
        elif unrouted:
            self.unrouted_publishes += 1
            self._unrouted.add(seq)
            if self._retry_at is None:
                self._unrouted_delay = min(30.0, max(0.25, self._unrouted_delay * 2))
                self._retry_at = time.monotonic() + self._unrouted_delay
        else:
            self._unrouted_delay = 0.0
            self.outbox.delete(seq)
