"""Hypothesis strategies for hostile patch messages, shared by tests/test_fuzz.py and
bench/fuzz_ingest.py (the >= 10,000-case run).

Every strategy draws a ``Case(kind, topic, payload, expect)``: what an attacker, a broken
network or a buggy device could put on a device's patch topic. ``expect`` is the reason the
ingest Validator must give, or None where any ProtocolError reason is right (random bytes,
mutations). Nothing drawn here may be accepted: the one strategy whose messages *can* be
valid (re-signed mutations, a compromised key) lives apart in ``resigned_mutations`` and its
property is weaker (rejected, or valid in every checked respect).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from cloud_trainer.ingest.validate import Validator
from dccl.protocol import envelope
from dccl.protocol.topics import Topics

PREFIX = "fuzz/dccl"
TOPICS = Topics(PREFIX)
DEVICES = ("dev-0", "dev-1", "dev-2")
KEYS = {d: hashlib.sha256(d.encode()).digest() for d in DEVICES}
PHI = "metapatch_phi"
SPEC = {PHI: ((64,), "float32")}
BUNDLE = "v1"
NORM_BOUND = 100.0


def validator() -> Validator:
    return Validator(keys=KEYS, topics=TOPICS, spec=SPEC, accepted_bundles=frozenset({BUNDLE}),
                     norm_bound=NORM_BOUND, max_age_s=3600.0)


@dataclass(frozen=True)
class Case:
    kind: str               # which strategy made it (for counts)
    topic: str
    payload: bytes
    expect: str | None      # the reason the Validator must give; None = any ProtocolError


def sign(body: bytes, key: bytes) -> bytes:
    return body + hmac.new(key, body, hashlib.sha256).digest()


# ---- valid messages (the raw material) ------------------------------------------------
@st.composite
def patches(draw, device: str | None = None) -> envelope.Patch:
    d = device or draw(st.sampled_from(DEVICES))
    # φ values from a drawn seed: 64 drawn floats cost hypothesis ~10x more per case
    phi = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-1, 1, 64).astype(np.float32)
    metrics = draw(st.dictionaries(st.sampled_from(["loss", "auc", "steps", "val_loss"]),
                                   st.floats(0, 10, width=32), max_size=4))
    return envelope.Patch(
        device_id=d, bundle_version=BUNDLE, round=draw(st.integers(0, 2**32 - 1)),
        sample_count=draw(st.integers(0, 2**32 - 1)), tensors={PHI: phi}, metrics=metrics,
        message_id=draw(st.binary(min_size=16, max_size=16)),
        timestamp_ms=int(time.time() * 1000) - draw(st.integers(0, 60_000)))


@st.composite
def valid_messages(draw) -> tuple[str, bytes, envelope.Patch]:
    p = draw(patches())
    return TOPICS.patch(p.device_id), envelope.encode(p, KEYS[p.device_id]), p


# ---- hostile messages ------------------------------------------------------------------
@st.composite
def random_bytes(draw) -> Case:
    """Noise, and noise behind a correct magic + version so the parser goes further."""
    head = draw(st.sampled_from([b"", b"DP", b"DP\x01", b"DP\x01\x00"]))
    body = draw(st.binary(max_size=1024))
    return Case("random", TOPICS.patch(draw(st.sampled_from(DEVICES))), head + body, None)


@st.composite
def truncated(draw) -> Case:
    topic, raw, _ = draw(valid_messages())
    cut = draw(st.integers(0, len(raw) - 1))
    return Case("truncated", topic, raw[:cut], None)


@st.composite
def mutated(draw) -> Case:
    """Bit flips, byte overwrites, insertions and deletions anywhere, signature not redone."""
    topic, raw, _ = draw(valid_messages())
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and b:
            b[i] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif b:
            del b[i:i + draw(st.integers(1, 8))]
    if bytes(b) == raw:                      # a no-op mutation is a valid message, not a case
        b = b[:-1]
    return Case("mutated", topic, bytes(b), None)


@st.composite
def forged(draw) -> Case:
    """Someone without the device's key, or a message moved to another device's topic."""
    topic, raw, p = draw(valid_messages())
    how = draw(st.sampled_from(["wrong_key", "other_topic", "unknown_device", "splice"]))
    if how == "wrong_key":
        key = draw(st.binary(min_size=1, max_size=64).filter(lambda k: k != KEYS[p.device_id]))
        return Case("forged", topic, envelope.encode(p, key), "bad_signature")
    if how == "other_topic":
        other = draw(st.sampled_from([d for d in DEVICES if d != p.device_id]))
        return Case("forged", TOPICS.patch(other), raw, "topic_mismatch")
    if how == "unknown_device":
        ghost = draw(st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z").filter(lambda d: d not in KEYS))
        q = envelope.Patch(**{**p.__dict__, "device_id": ghost})
        return Case("forged", TOPICS.patch(ghost), envelope.encode(q, draw(st.binary(min_size=16, max_size=32))),
                    "unknown_device")
    # splice: a signed body from one message with the signature of another
    _, raw2, _ = draw(valid_messages())
    if raw2[-envelope.SIG_BYTES:] == raw[-envelope.SIG_BYTES:]:
        raw2 = raw2[:-1] + bytes([raw2[-1] ^ 1])
    return Case("forged", topic, raw[:-envelope.SIG_BYTES] + raw2[-envelope.SIG_BYTES:], "bad_signature")


@st.composite
def insider(draw) -> Case:
    """Correctly signed by the device's own key, and still wrong: the checks after decoding."""
    p = draw(patches())
    key, topic = KEYS[p.device_id], TOPICS.patch(p.device_id)
    how = draw(st.sampled_from(["bundle", "shape", "name", "extra", "nan", "inf", "norm", "future",
                                "old", "metric_nan"]))
    kw: dict = {}
    expect = {"bundle": "bundle_rejected", "shape": "spec_mismatch", "name": "spec_mismatch",
              "extra": "spec_mismatch", "nan": "non_finite", "inf": "non_finite", "norm": "norm_bound",
              "future": "stale", "old": "stale", "metric_nan": "non_finite"}[how]
    phi = np.array(p.tensors[PHI])
    if how == "bundle":
        kw["bundle_version"] = draw(st.from_regex(r"\A[a-z0-9.]{1,12}\Z").filter(lambda v: v != BUNDLE))
    elif how == "shape":
        n = draw(st.integers(0, 128).filter(lambda n: n != 64))
        kw["tensors"] = {PHI: np.zeros(n, np.float32) if draw(st.booleans()) else np.zeros((1, 64), np.float32)}
    elif how == "name":
        kw["tensors"] = {draw(st.text("abcdefgh_", min_size=1, max_size=10).filter(lambda s: s != PHI)): phi}
    elif how == "extra":
        kw["tensors"] = {PHI: phi, "metapatch_x": phi}
    elif how in ("nan", "inf"):
        phi[draw(st.integers(0, 63))] = np.nan if how == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
        kw["tensors"] = {PHI: phi}
    elif how == "norm":
        kw["tensors"] = {PHI: np.full(64, draw(st.floats(13.0, 2.0 ** 100, width=32)), np.float32)}
    elif how == "future":
        kw["timestamp_ms"] = int(time.time() * 1000) + draw(st.integers(600_000, 2**40))
    elif how == "old":
        # strategy bounds must not depend on the clock (hypothesis replays draws): draw the age
        kw["timestamp_ms"] = max(0, int(time.time() * 1000) - draw(st.integers(7_200_000, 2**48)))
    else:
        kw["metrics"] = {**p.metrics, "loss": math.nan}
    q = envelope.Patch(**{**p.__dict__, **kw})
    return Case("insider", topic, envelope.encode(q, key), expect)


def hostile() -> st.SearchStrategy[Case]:
    """Everything that must be rejected."""
    return st.one_of(random_bytes(), truncated(), mutated(), forged(), insider())


STRATEGIES = {"random": random_bytes, "truncated": truncated, "mutated": mutated, "forged": forged,
              "insider": insider}


@st.composite
def resigned_mutations(draw) -> tuple[str, bytes]:
    """A compromised key: the body mutated, then signed correctly, so the parser and the
    semantic checks see arbitrary structure behind a valid signature."""
    topic, raw, p = draw(valid_messages())
    body = bytearray(raw[:-envelope.SIG_BYTES])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "set":
            body[i] = draw(st.integers(0, 255))
        elif op == "insert":
            body[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del body[i:i + draw(st.integers(1, 4))]
    return topic, sign(bytes(body), KEYS[p.device_id])
