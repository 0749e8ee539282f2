"""``dccl model publish``: ship a device bundle to the fleet over MQTT (the cloud side of
model distribution).

    dccl model publish --bundle DIR [--broker mqtt://host:1883] [--prefix dccl] [--chunk-size 65536]

The bundle is checked first (manifest schema, size and sha256 of every file: a broken bundle
never leaves the cloud). Then every chunk is published retained (QoS 1) at
``P/model/{version}/chunk/{f}/{c}``, each acknowledged by the broker, and only then the
retained announcement at ``P/model/announce``: a device that sees the announcement finds every
chunk already there. The chunks of the bundle announced before are cleared afterwards (empty
retained messages), so the broker keeps one bundle, not every bundle ever published; a device
that was mid-transfer of the old one moves to the new announcement anyway.

``publish_bundle(...)`` is the same thing as a function, for the training loop and simulations.
Torch-free: it needs paho-mqtt and ``dccl.protocol`` only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dccl.errors import DcclError
from dccl.protocol import manifest as mf
from dccl.protocol import payloads
from dccl.protocol.broker import BrokerAddress, parse_broker_url
from dccl.protocol.bundle_transfer import bundle_messages
from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import QOS_MODEL, Topics, check_id

log = logging.getLogger("dccl.publish")

DEFAULT_CHUNK = 64 * 1024


@dataclass(frozen=True)
class PublishResult:
    version: str
    sha256: str                 # of manifest.json: what the announcement carries
    files: int
    chunks: int
    bytes: int
    seconds: float
    cleared_previous: str | None    # version whose retained chunks were cleared, if any


def _connect(broker: BrokerAddress, username: str | None, password: str | None, tls_ca: str | None,
             timeout: float):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dccl-publish-{uuid.uuid4().hex[:8]}",
                    protocol=mqtt.MQTTv5)
    user = username or broker.username
    if user:
        c.username_pw_set(user, password or broker.password)
    if broker.tls or tls_ca:
        c.tls_set(ca_certs=tls_ca, cert_reqs=ssl.CERT_REQUIRED)
    c.max_inflight_messages_set(32)
    connected, refused = threading.Event(), []

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    c.on_connect = on_connect
    try:
        c.connect(broker.host, broker.port, keepalive=30)
    except OSError as exc:
        raise DcclError(f"cannot reach the broker at {broker.host}:{broker.port} ({exc})") from None
    c.loop_start()
    if not connected.wait(timeout) or refused:
        c.loop_stop()
        raise DcclError(f"broker {broker.host}:{broker.port} refused the connection: "
                        f"{refused[0] if refused else 'no CONNACK within %g s' % timeout}")
    return c


def _retained_announcement(c, topics: Topics, wait: float) -> dict | None:
    """The announcement the broker holds now (retained messages arrive right after SUBACK)."""
    got: list[bytes] = []
    subscribed = threading.Event()
    c.on_message = lambda client, userdata, msg: got.append(bytes(msg.payload)) if msg.retain else None
    c.on_subscribe = lambda *a: subscribed.set()
    c.subscribe(topics.model_announce(), qos=1)
    subscribed.wait(wait)
    deadline = time.monotonic() + wait
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.unsubscribe(topics.model_announce())
    c.on_message = None
    if not got or not got[0]:
        return None
    try:
        return payloads.load_announcement(got[0])
    except ProtocolError:
        return None


def _publish_all(c, messages: list[tuple[str, bytes]], timeout: float) -> None:
    """QoS 1 retained; returns when the broker acknowledged every one (raises otherwise)."""
    deadline = time.monotonic() + timeout

    def acked(topic: str, info) -> None:
        try:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:      # connection lost / not queued
            raise DcclError(f"publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise DcclError(f"broker did not acknowledge {topic} within {timeout:g} s")

    pending = []
    for topic, payload in messages:
        info = c.publish(topic, payload, qos=QOS_MODEL, retain=True)
        if info.rc != 0:
            raise DcclError(f"publish to {topic} failed (paho rc {info.rc})")
        pending.append((topic, info))
        if len(pending) >= 32:                  # bounded memory for big bundles
            acked(*pending.pop(0))
    for topic, info in pending:
        acked(topic, info)


def publish_bundle(bundle_dir: str | os.PathLike, broker: str | BrokerAddress = "mqtt://127.0.0.1:1883",
                   prefix: str = "dccl", *, version: str | None = None, chunk_size: int = DEFAULT_CHUNK,
                   verify: bool = True, clear_previous: bool = True, username: str | None = None,
                   password: str | None = None, tls_ca: str | None = None, timeout: float = 60.0,
                   ) -> PublishResult:
    """Publish a bundle's chunks and then its announcement, all retained, on ``broker``.

    ``version`` defaults to the manifest's ``bundle_version``. ``verify`` checks the manifest
    schema and every file's size and sha256 before anything is sent (``False`` only for
    bundles in another layout, e.g. tests' toy bundles, which then need ``version``).
    Raises ``DcclError`` (bad bundle, unreachable broker, unacknowledged publish).
    """
    root = Path(bundle_dir)
    if not (root / mf.FILE).is_file():
        raise DcclError(f"bundle {root}: no {mf.FILE}")
    if verify:
        manifest = mf.load(root, verify=True)        # ManifestError (a DcclError) names the problem
        version = version or manifest["bundle_version"]
    if not version:
        raise DcclError(f"bundle {root}: no version given and the manifest is not verified")
    try:
        check_id(version, "bundle version")
        topics = Topics(prefix)
        addr = parse_broker_url(broker) if isinstance(broker, str) else broker
    except ValueError as exc:
        raise DcclError(str(exc)) from None
    if not 0 < chunk_size <= 1 << 20:
        raise DcclError(f"chunk size {chunk_size}: must be 1 .. {1 << 20} bytes")
    try:
        (ann_topic, announcement), chunks = bundle_messages(root, version, topics, chunk_size)
    except (OSError, ValueError, KeyError) as exc:
        raise DcclError(f"bundle {root}: {exc}") from None

    t0 = time.monotonic()
    c = _connect(addr, username, password, tls_ca, timeout)
    try:
        previous = _retained_announcement(c, topics, wait=1.0) if clear_previous else None
        _publish_all(c, chunks, timeout)
        _publish_all(c, [(ann_topic, announcement)], timeout)
        cleared = None
        if previous and previous["bundle_version"] != version:
            old = previous["bundle_version"]
            _publish_all(c, [(topics.model_chunk(old, f, k), b"")
                             for f, e in enumerate(previous["files"]) for k in range(e["chunks"])], timeout)
            cleared = old
    finally:
        c.disconnect()
        c.loop_stop()
    ann = json.loads(announcement)
    result = PublishResult(version=version, sha256=ann["sha256"], files=len(ann["files"]), chunks=len(chunks),
                           bytes=sum(len(p) for _, p in chunks), seconds=time.monotonic() - t0,
                           cleared_previous=cleared)
    log.info("published bundle %s: %d files, %d chunks, %d bytes in %.2f s", version, result.files,
             result.chunks, result.bytes, result.seconds)
    return result


# ---- CLI ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Publish a device bundle to the fleet over MQTT: every chunk retained, then the retained "
                     "announcement; devices fetch, verify and switch to it themselves.")
    p.add_argument("--bundle", required=True, metavar="DIR", help="bundle directory (manifest.json + files), "
                                                                  "as made by `dccl export`")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://[user@]host:port or mqtts://...")
    p.add_argument("--prefix", default="dccl", help="topic prefix (default: dccl)")
    p.add_argument("--version", help="bundle version to announce (default: the manifest's bundle_version)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help=f"bytes per chunk (default {DEFAULT_CHUNK})")
    p.add_argument("--keep-previous", action="store_true",
                   help="leave the previously announced bundle's chunks on the broker")
    p.add_argument("--tls-ca", help="CA certificate for mqtts://")
    p.add_argument("--password-env", default="DCCL_MQTT_PASSWORD",
                   help="environment variable holding the broker password (default: DCCL_MQTT_PASSWORD)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker (default 60)")


def run(args: argparse.Namespace) -> int:
    r = publish_bundle(args.bundle, args.broker, args.prefix, version=args.version, chunk_size=args.chunk_size,
                       clear_previous=not args.keep_previous, password=os.environ.get(args.password_env),
                       tls_ca=args.tls_ca, timeout=args.timeout)
    print(json.dumps({"published": r.version, "sha256": r.sha256, "files": r.files, "chunks": r.chunks,
                      "bytes": r.bytes, "seconds": round(r.seconds, 3), "cleared_previous": r.cleared_previous}))
    return 0
