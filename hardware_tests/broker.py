"""The controller's side of the MQTT checks: a private Mosquitto it can stop and restart (a broker
outage on demand) and a cloud-side observer client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class PrivateBroker:
    """``mosquitto -c CONF`` on a free loopback port, anonymous, with persistence (so a restart
    keeps sessions and retained messages, as the fleet's broker does)."""

    def __init__(self, workdir: Path):
        if not shutil.which("mosquitto") and not Path("/usr/sbin/mosquitto").exists():
            raise FileNotFoundError("mosquitto")
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        body = (f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {self.dir}/\nautosave_interval 1\n")
        if os.geteuid() == 0:
            body = "user root\n" + body
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(body)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "PrivateBroker":
        log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _listening(self.port) or self.proc.poll() is not None, 10, "mosquitto to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-1000:]}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


class Observer:
    """The cloud's view: subscribes with a persistent session and records every message."""

    def __init__(self, url_port: int, topics: list[str], client_id: str = "hil-observer"):
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.msgs: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.topics = topics
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        c.on_message = lambda cl, u, m: self._add(m.topic, bytes(m.payload), bool(m.retain))
        c.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", url_port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        wait_for(self.connected.is_set, 10, "observer connection")

    def _on_connect(self, client, userdata, flags, rc, props):
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])
            time.sleep(0.2)
            self.connected.set()

    def _add(self, topic: str, payload: bytes, retain: bool) -> None:
        with self.lock:
            self.msgs.append((topic, payload, retain))

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.msgs if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
