"""The patch message: a compact, versioned binary envelope signed with HMAC-SHA256.

Layout (little-endian; ``str8`` = u8 length + utf-8 bytes)::

    magic      2s   b"DP"
    version    u8   ENVELOPE_VERSION
    flags      u8   0 (reserved)
    message_id 16s  random per patch; the idempotency key of the patch store
    timestamp  u64  milliseconds since the Unix epoch, device clock
    round      u32  training round the patch belongs to
    samples    u32  local samples the patch was trained on
    device_id  str8
    bundle     str8 bundle version the patch was trained against
    n_metrics  u8, then per metric: name str8, value f32
    n_tensors  u8, then per tensor: name str8, dtype u8 (1 = float32), ndim u8,
               dims u32 x ndim, data (prod(dims) x 4 bytes, float32 little-endian)
    signature  32s  HMAC-SHA256(device key, every byte above)

A 64-float φ with three metrics is ~400 bytes. ``decode`` reads only the device id before
verifying the signature, checks every length against the bytes actually present, and
never uses pickle: the bytes become numpy arrays through ``np.frombuffer`` only.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from dccl.protocol.errors import ProtocolError

MAGIC = b"DP"
ENVELOPE_VERSION = 1
SIG_BYTES = 32
MAX_MESSAGE_BYTES = 1 << 20     # a φ is kilobytes; anything near a megabyte is not a patch
MAX_TENSORS = 32
MAX_METRICS = 32
MAX_NDIM = 4
DTYPE_FLOAT32 = 1

_HEAD = struct.Struct("<2sBB16sQII")   # magic, version, flags, message id, timestamp, round, samples
_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")

KeyLookup = Callable[[str], "bytes | None"]


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Patch:
    """One device's φ for one round. ``tensors`` maps names to float32 arrays."""

    device_id: str
    bundle_version: str
    round: int
    sample_count: int
    tensors: Mapping[str, np.ndarray]
    metrics: Mapping[str, float] = field(default_factory=dict)
    message_id: bytes = field(default_factory=lambda: os.urandom(16))
    timestamp_ms: int = field(default_factory=_now_ms)


def _str8(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if not raw or len(raw) > 255:
        raise ValueError(f"{what} must be 1..255 utf-8 bytes, got {len(raw)}")
    return bytes([len(raw)]) + raw


def encode(patch: Patch, key: bytes) -> bytes:
    """Serialise and sign ``patch`` with the device's key. Raises ValueError on a bad patch."""
    if len(patch.message_id) != 16:
        raise ValueError("message_id must be 16 bytes")
    if len(patch.metrics) > MAX_METRICS or len(patch.tensors) > MAX_TENSORS:
        raise ValueError("too many metrics or tensors")
    out = bytearray(
        _HEAD.pack(MAGIC, ENVELOPE_VERSION, 0, bytes(patch.message_id), int(patch.timestamp_ms),
                   int(patch.round), int(patch.sample_count))
    )
    out += _str8(patch.device_id, "device_id")
    out += _str8(patch.bundle_version, "bundle_version")
    out.append(len(patch.metrics))
    for name, value in patch.metrics.items():
        out += _str8(name, "metric name") + _F32.pack(float(value))
    out.append(len(patch.tensors))
    for name, tensor in patch.tensors.items():
        arr = np.ascontiguousarray(tensor, dtype="<f4")
        if arr.ndim > MAX_NDIM:
            raise ValueError(f"tensor {name!r} has {arr.ndim} dims > {MAX_NDIM}")
        out += _str8(name, "tensor name") + bytes([DTYPE_FLOAT32, arr.ndim])
        out += b"".join(_U32.pack(d) for d in arr.shape)
        out += arr.tobytes()
    out += hmac.new(key, bytes(out), hashlib.sha256).digest()
    if len(out) > MAX_MESSAGE_BYTES:
        raise ValueError(f"patch message of {len(out)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return bytes(out)


class _Reader:
    """Bounds-checked cursor over the signed body: every read fails with ``truncated``."""

    def __init__(self, data: bytes | memoryview, pos: int = 0):
        self.data, self.pos = memoryview(data), pos

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("truncated", f"needs {n} bytes at offset {self.pos}, has {len(self.data) - self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def str8(self, what: str) -> str:
        n = self.u8()
        if n == 0:
            raise ProtocolError("bad_field", f"empty {what}")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_field", f"{what} is not utf-8") from None


def _split(data: bytes) -> tuple[memoryview, bytes, str]:
    """Check size, magic and version; return (body, signature, device id)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_field", f"payload is {type(data).__name__}, not bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError("too_large", f"{len(data)} bytes > {MAX_MESSAGE_BYTES}")
    if len(data) < 2 or bytes(data[:2]) != MAGIC:
        raise ProtocolError("bad_magic" if len(data) >= 2 else "truncated", "not a DCCL patch envelope")
    if len(data) < 3:
        raise ProtocolError("truncated", "no version byte")
    if data[2] != ENVELOPE_VERSION:
        raise ProtocolError("bad_version", f"envelope version {data[2]}, this code reads {ENVELOPE_VERSION}")
    if len(data) < _HEAD.size + 2 + SIG_BYTES:
        raise ProtocolError("truncated", f"{len(data)} bytes is shorter than the smallest envelope")
    body, sig = memoryview(data)[:-SIG_BYTES], bytes(data[-SIG_BYTES:])
    device_id = _Reader(body, _HEAD.size).str8("device_id")
    return body, sig, device_id


def peek_device_id(data: bytes) -> str:
    """The claimed (not yet verified) device id, to choose the key. Raises ProtocolError."""
    return _split(data)[2]


def decode(data: bytes, key: bytes | KeyLookup, *, verify: bool = True) -> Patch:
    """Verify and parse a patch message.

    ``key`` is the device's key, or a function ``device_id -> key | None`` (None means an
    unknown device). ``verify=False`` is for re-reading bytes already verified and stored.
    Raises ``ProtocolError`` with a reason; never anything else for any input bytes.
    """
    body, sig, device_id = _split(data)
    if verify:
        k = key(device_id) if callable(key) else key
        if k is None:
            raise ProtocolError("unknown_device", f"no key for device {device_id!r}")
        if not hmac.compare_digest(hmac.new(k, body, hashlib.sha256).digest(), sig):
            raise ProtocolError("bad_signature", f"HMAC does not verify for device {device_id!r}")
    magic, version, flags, message_id, ts, rnd, samples = _HEAD.unpack_from(body, 0)
    if flags != 0:
        raise ProtocolError("bad_field", f"reserved flags {flags} != 0")
    r = _Reader(body, _HEAD.size)
    r.str8("device_id")
    bundle = r.str8("bundle_version")
    n_metrics = r.u8()
    if n_metrics > MAX_METRICS:
        raise ProtocolError("bad_field", f"{n_metrics} metrics > {MAX_METRICS}")
    metrics: dict[str, float] = {}
    for _ in range(n_metrics):
        name = r.str8("metric name")
        if name in metrics:
            raise ProtocolError("bad_field", f"metric {name!r} twice")
        metrics[name] = _F32.unpack(r.take(4))[0]
    n_tensors = r.u8()
    if n_tensors > MAX_TENSORS:
        raise ProtocolError("bad_field", f"{n_tensors} tensors > {MAX_TENSORS}")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        name = r.str8("tensor name")
        if name in tensors:
            raise ProtocolError("bad_field", f"tensor {name!r} twice")
        dtype, ndim = r.u8(), r.u8()
        if dtype != DTYPE_FLOAT32:
            raise ProtocolError("bad_dtype", f"tensor {name!r} dtype code {dtype}, only float32 (1)")
        if ndim > MAX_NDIM:
            raise ProtocolError("bad_field", f"tensor {name!r} ndim {ndim} > {MAX_NDIM}")
        shape = tuple(_U32.unpack(r.take(4))[0] for _ in range(ndim))
        count = math.prod(shape)
        # take() bounds the size against the bytes present before any allocation
        raw = r.take(count * 4)
        tensors[name] = np.frombuffer(bytes(raw), dtype="<f4").reshape(shape).astype(np.float32, copy=False)
    if r.pos != len(body):
        raise ProtocolError("trailing_bytes", f"{len(body) - r.pos} bytes after the last tensor")
    return Patch(device_id=device_id, bundle_version=bundle, round=rnd, sample_count=samples,
                 tensors=tensors, metrics=metrics, message_id=bytes(message_id), timestamp_ms=ts)
