"""Shared fixtures for the MQTT tests: the machine's broker, private Mosquitto processes,
PostgreSQL schemas, and a device simulator. Import what you need from your test module::

    from tests.mqtt_fixtures import prefix, pg_url, Mosquitto, wait_for  # noqa: F401
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BROKER = "mqtt://127.0.0.1:1883"
PG = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Mosquitto:
    """A private ``mosquitto -c CONF`` on a free port; restartable, with persistence."""

    def __init__(self, workdir: Path, conf_body: str | None = None, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        body = conf_body if conf_body is not None else (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 1\n"
            "max_queued_messages 100000\nmax_inflight_messages 100\n"
        )
        if os.geteuid() == 0:
            body = "user root\n" + body   # otherwise it drops to 'mosquitto' and cannot write here
        self.conf.write_text(body)
        self.log = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 5, what="mosquitto to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # saves the persistence file
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def prefix() -> str:
    """A topic prefix of its own, so tests on the shared broker never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}/dccl"


@pytest.fixture
def own_broker(tmp_path):
    m = Mosquitto(tmp_path / "broker").start()
    yield m
    m.stop()


@pytest.fixture
def pg_schema():
    """A PostgreSQL schema of its own, dropped afterwards; yields (url, schema)."""
    psycopg = pytest.importorskip("psycopg")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        psycopg.connect(PG, connect_timeout=3).close()
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    yield PG, schema
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """The patch store on SQLite and on PostgreSQL (a schema of its own)."""
    from cloud_trainer.ingest import open_store

    if request.param == "sqlite":
        s = open_store(tmp_path / "patches.db")
    else:
        url, schema = request.getfixturevalue("pg_schema")
        s = open_store(url, schema=schema)
    yield s
    s.close()


# ---- devices ----------------------------------------------------------------------
def device_key(device_id: str) -> bytes:
    return ("key-" + device_id).encode().ljust(32, b"\0")


def write_keys(path: Path, devices: list[str]) -> Path:
    import json
    path.write_text(json.dumps({d: device_key(d).hex() for d in devices}))
    return path


def make_patch(device_id: str, round_: int = 0, bundle: str = "v1", m: int = 64, seed: int | None = None):
    from dccl.protocol import envelope
    rng = np.random.default_rng(seed)
    p = envelope.Patch(device_id=device_id, bundle_version=bundle, round=round_, sample_count=100 + round_,
                       tensors={"metapatch_phi": rng.normal(size=m).astype(np.float32)},
                       metrics={"loss": 0.5})
    return p, envelope.encode(p, device_key(device_id))


def spawn_python(code: str, *, edge: bool = False, env: dict | None = None) -> subprocess.Popen:
    """A real OS process running ``code`` with the repo importable (edge venv if asked)."""
    exe = str(REPO / ".venv-edge/bin/python") if edge and (REPO / ".venv-edge/bin/python").exists() else sys.executable
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([exe, "-c", code], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


DEVICE_SCRIPT = """
import sys, time
from edge_agent.mqtt_client import EdgeMqttClient
from edge_agent.heartbeat import HeartbeatPublisher, TrainingStatus
device_id, broker, prefix, outbox, keepalive = sys.argv[1:6]
c = EdgeMqttClient(device_id, broker, outbox, prefix=prefix, keepalive=int(keepalive), backoff=(0.2, 1.0)).start()
st = TrainingStatus(bundle_version="v1", round=2, last_loss=0.25, last_train_ts=time.time(), last_sample_count=40)
hb = HeartbeatPublisher(c, st, interval=0.5).start()
c.connected.wait(10)
print("connected", flush=True)
try:
    while True:
        time.sleep(0.2)
except KeyboardInterrupt:
    pass
"""


def spawn_device(device_id: str, broker_url: str, prefix: str, outbox: Path, keepalive: int = 2) -> subprocess.Popen:
    """A device agent in its own OS process, in the edge venv (no torch) when it exists."""
    exe = REPO / ".venv-edge/bin/python"
    exe = str(exe) if exe.exists() else sys.executable
    p = subprocess.Popen([exe, "-c", DEVICE_SCRIPT, device_id, broker_url, prefix, str(outbox), str(keepalive)],
                         env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "connected":
        p.kill()
        raise RuntimeError(f"device {device_id} did not connect: {line!r} {p.stderr.read()[-2000:]}")
    return p
