"""``dccl fleet status``: availability + last heartbeat of every device, as a table or JSON.

Both are retained on the broker, so a short subscription window sees the whole fleet;
the window also catches live updates (a will being published right now).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from dccl.errors import DcclError
from dccl.protocol import payloads
from dccl.protocol.broker import BrokerAddress, parse_broker_url
from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import Topics


@dataclass
class DeviceStatus:
    device_id: str
    state: str = "unknown"                 # online | offline | stopped | unknown
    last_seen: float | None = None         # heartbeat ts (device clock)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    patches_seen: int = 0                  # patch messages seen in this window (watch)
    last_round: int | None = None
    test_report: dict[str, Any] = field(default_factory=dict)  # latest retained HIL report (summary)


class FleetView:
    """Subscribes to availability + heartbeats (+ patch headers); thread-safe snapshot."""

    def __init__(self, broker: BrokerAddress, topics: Topics, *, patches: bool = False, tls_ca: str | None = None):
        self.broker, self.topics = broker, topics
        self.devices: dict[str, DeviceStatus] = {}
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self._patches = patches
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if broker.username:
            c.username_pw_set(broker.username, broker.password)
        if broker.tls or tls_ca:
            c.tls_set(ca_certs=tls_ca)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        self.client = c

    def start(self) -> "FleetView":
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError as exc:
            raise DcclError(f"cannot reach broker {self.broker.host}:{self.broker.port}: {exc}") from None
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        subs = [(self.topics.all_devices("availability"), 1), (self.topics.all_devices("heartbeat"), 0),
                (self.topics.all_devices("report"), 1)]
        if self._patches:
            subs.append((self.topics.all_devices("patch"), 0))
        client.subscribe(subs)

    def _on_message(self, client, userdata, msg):
        parsed = self.topics.parse_device_topic(msg.topic)
        if not parsed:
            return
        device_id, kind = parsed
        with self.lock:
            d = self.devices.setdefault(device_id, DeviceStatus(device_id))
            try:
                if kind == "availability":
                    d.state = payloads.load_availability(msg.payload)
                elif kind == "heartbeat":
                    d.heartbeat = payloads.load_heartbeat(msg.payload)
                    d.last_seen = d.heartbeat.get("ts")
                elif kind == "report":
                    rep = payloads.load_report(msg.payload)
                    if rep.get("kind") == "hil" and isinstance(rep.get("summary"), dict):
                        d.test_report = {"passed": bool(rep.get("passed")), "arch": rep.get("arch"),
                                         "profile": (rep.get("profile") or {}).get("name"),
                                         **{k: rep["summary"].get(k) for k in ("passed", "failed", "skipped")},
                                         "ts": rep.get("finished") or rep.get("ts")}
                elif kind == "patch" and not msg.retain:
                    from dccl.protocol import envelope   # header only, not verified: display
                    p = envelope.decode(msg.payload, b"", verify=False)
                    if d.last_round is None or p.round > d.last_round:
                        d.last_round, d.patches_seen = p.round, 0
                    if p.round == d.last_round:
                        d.patches_seen += 1
            except ProtocolError:
                pass

    def snapshot(self) -> list[DeviceStatus]:
        with self.lock:
            return [DeviceStatus(**asdict(d)) for _, d in sorted(self.devices.items())]


def collect(broker: str | BrokerAddress, prefix: str = "dccl", window: float = 1.0) -> list[DeviceStatus]:
    b = parse_broker_url(broker) if isinstance(broker, str) else broker
    view = FleetView(b, Topics(prefix)).start()
    try:
        if not view.subscribed.wait(5):
            raise DcclError(f"broker {b.host}:{b.port} did not confirm the subscription")
        time.sleep(window)
        return view.snapshot()
    finally:
        view.stop()


def _fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def _hil(rep: dict[str, Any]) -> str | None:
    """'pass 14/14 aarch64' / 'FAIL 2/14 x86_64' for the latest hardware-in-the-loop report."""
    if not rep:
        return None
    total = sum(int(rep.get(k) or 0) for k in ("passed", "failed"))
    word = "FAIL " + str(rep.get("failed")) if rep.get("failed") else "pass " + str(rep.get("passed"))
    return f"{word}/{total} {rep.get('arch') or '?'}"


def rows(devices: list[DeviceStatus], now: float | None = None) -> list[dict[str, Any]]:
    now = now or time.time()
    out = []
    for d in devices:
        hb = d.heartbeat
        out.append({
            "device": d.device_id, "state": d.state,
            "last_seen_s": None if d.last_seen is None else round(now - d.last_seen, 1),
            "bundle": hb.get("bundle_version"), "round": hb.get("round"),
            "temp_c": hb.get("cpu_temp_c"), "last_loss": hb.get("last_loss"),
            "outbox": hb.get("outbox_depth"), "agent": hb.get("agent_version"),
            "hil": _hil(d.test_report), "hil_report": d.test_report or None,
        })
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port (default: local)")
    p.add_argument("--prefix", default="dccl", help="topic prefix (default: dccl)")
    p.add_argument("--window", type=float, default=1.0, help="seconds to listen (default: 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        broker, topics = parse_broker_url(args.broker), Topics(args.prefix)
    except ValueError as exc:
        raise DcclError(str(exc)) from None
    table = rows(collect(broker, topics.prefix, args.window))
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    cols = ["device", "state", "last_seen_s", "bundle", "round", "temp_c", "last_loss", "outbox", "agent", "hil"]
    cells = [[_fmt(r[c], ".3g" if c == "last_loss" and r[c] is not None else "") for c in cols] for r in table]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if not table:
        print(f"(no devices under {topics.prefix}/device/)")
    return 0
