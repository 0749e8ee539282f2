"""Small JSON payloads: heartbeat, availability, model announcement, commands, reports.

Each payload is a JSON object with ``"v": 1``. ``dump_*`` builds bytes to publish;
``load_*`` parses received bytes and raises ``ProtocolError("bad_payload", ...)`` on
anything malformed, so a broken peer never raises anything else in a receiver.
"""

from __future__ import annotations

import json
import math
from typing import Any

from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import OFFLINE, ONLINE, STOPPED

PAYLOAD_VERSION = 1
MAX_JSON_BYTES = 64 * 1024
AVAILABILITY = (ONLINE, OFFLINE, STOPPED)
COMMANDS = ("train_now", "rollback", "report")

# Heartbeat fields and their JSON types; every field may be null (unknown on this board).
HEARTBEAT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "device_id": str,
    "ts": (int, float),               # seconds since the epoch, device clock
    "agent_version": str,
    "bundle_version": str,
    "last_train_ts": (int, float),
    "last_loss": (int, float),
    "last_sample_count": int,
    "round": int,
    "outbox_depth": int,
    "cpu_temp_c": (int, float),
    "mem_total_mb": (int, float),
    "mem_available_mb": (int, float),
    "load1": (int, float),
    "disk_free_mb": (int, float),
    "uptime_s": (int, float),
}


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps({"v": PAYLOAD_VERSION, **obj}, separators=(",", ":"), allow_nan=False).encode()


def _load(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError("bad_payload", f"{what}: {len(data)} bytes > {MAX_JSON_BYTES}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), parse_constant=lambda c: math.nan)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad_payload", f"{what}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_payload", f"{what}: not a JSON object")
    if obj.get("v") != PAYLOAD_VERSION:
        raise ProtocolError("bad_payload", f"{what}: version {obj.get('v')!r}, expected {PAYLOAD_VERSION}")
    return obj


def dump_availability(state: str) -> bytes:
    """Availability is a bare word (Home Assistant / Frigate convention), not JSON."""
    if state not in AVAILABILITY:
        raise ValueError(f"availability {state!r} not in {AVAILABILITY}")
    return state.encode()


def load_availability(data: bytes) -> str:
    state = bytes(data).decode("utf-8", "replace").strip()
    if state not in AVAILABILITY:
        raise ProtocolError("bad_payload", f"availability {state[:20]!r} not in {AVAILABILITY}")
    return state


def dump_heartbeat(**fields: Any) -> bytes:
    unknown = set(fields) - set(HEARTBEAT_FIELDS)
    if unknown:
        raise ValueError(f"unknown heartbeat fields {sorted(unknown)}")
    return _dump(fields)


def load_heartbeat(data: bytes) -> dict[str, Any]:
    obj = _load(data, "heartbeat")
    out: dict[str, Any] = {}
    for name, typ in HEARTBEAT_FIELDS.items():
        value = obj.get(name)
        if value is None:
            out[name] = None
        elif isinstance(value, bool) or not isinstance(value, typ):
            raise ProtocolError("bad_payload", f"heartbeat.{name} = {value!r}: wrong type")
        else:
            out[name] = value
    return out


def dump_announcement(bundle_version: str, sha256: str, files: list[dict[str, Any]], chunk_size: int) -> bytes:
    """Retained model announcement. ``sha256`` is the sha256 of the bundle's manifest.json;
    ``files`` lists ``{"path", "size", "sha256", "chunks"}`` (manifest.json included);
    the bytes are fetched from ``Topics.model_chunk(version, file_index, chunk_index)``."""
    return _dump({"bundle_version": bundle_version, "sha256": sha256, "fetch": "mqtt-chunks",
                  "chunk_size": chunk_size, "files": files})


def load_announcement(data: bytes) -> dict[str, Any]:
    obj = _load(data, "announcement")
    try:
        assert isinstance(obj["bundle_version"], str) and obj["bundle_version"]
        assert isinstance(obj["sha256"], str) and len(obj["sha256"]) == 64
        assert obj.get("fetch") == "mqtt-chunks"
        assert isinstance(obj["chunk_size"], int) and 0 < obj["chunk_size"] <= 1 << 20
        assert isinstance(obj["files"], list) and 0 < len(obj["files"]) <= 1000
        for f in obj["files"]:
            assert isinstance(f["path"], str) and f["path"] and not f["path"].startswith("/")
            assert ".." not in f["path"].split("/") and "\\" not in f["path"]
            assert isinstance(f["size"], int) and f["size"] >= 0
            assert isinstance(f["sha256"], str) and len(f["sha256"]) == 64
            assert f["chunks"] == max(1, -(-f["size"] // obj["chunk_size"]))
    except (AssertionError, KeyError, TypeError) as exc:
        raise ProtocolError("bad_payload", f"announcement: malformed ({exc!r})") from None
    return obj


def dump_command(command: str, **args: Any) -> bytes:
    if command not in COMMANDS:
        raise ValueError(f"command {command!r} not in {COMMANDS}")
    return _dump({"command": command, "args": args})


def load_command(data: bytes) -> dict[str, Any]:
    obj = _load(data, "command")
    if obj.get("command") not in COMMANDS or not isinstance(obj.get("args", {}), dict):
        raise ProtocolError("bad_payload", f"command {obj.get('command')!r} not in {COMMANDS}")
    return obj


def dump_report(kind: str, **fields: Any) -> bytes:
    """Device reports: test results, model update outcomes (``kind`` says which)."""
    return _dump({"kind": kind, **fields})


def load_report(data: bytes) -> dict[str, Any]:
    obj = _load(data, "report")
    if not isinstance(obj.get("kind"), str):
        raise ProtocolError("bad_payload", "report: no kind")
    return obj
