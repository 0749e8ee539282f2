"""The torch-free contract: topics, the signed patch envelope, JSON payloads."""

from __future__ import annotations

import random
import struct
import subprocess
import sys

import numpy as np
import pytest

from dccl.protocol import envelope as env
from dccl.protocol import payloads
from dccl.protocol.errors import REASONS, ProtocolError
from dccl.protocol.topics import Topics

KEY = b"k" * 32


def make_patch(**kw):
    base = dict(device_id="pi-0001", bundle_version="b2026.11.30-1", round=3, sample_count=120,
                tensors={"metapatch_phi": np.arange(64, dtype=np.float32) / 64},
                metrics={"loss": 0.41, "auc": 0.77, "steps": 50.0})
    base.update(kw)
    return env.Patch(**base)


def test_round_trip_keeps_every_field():
    p = make_patch(tensors={"metapatch_a": np.ones((2, 3), np.float32), "metapatch_b": np.zeros(0, np.float32)})
    q = env.decode(env.encode(p, KEY), KEY)
    assert (q.device_id, q.bundle_version, q.round, q.sample_count) == (p.device_id, p.bundle_version, 3, 120)
    assert q.message_id == p.message_id and q.timestamp_ms == p.timestamp_ms
    assert set(q.tensors) == {"metapatch_a", "metapatch_b"}
    assert q.tensors["metapatch_a"].shape == (2, 3) and q.tensors["metapatch_a"].dtype == np.float32
    assert q.metrics["auc"] == pytest.approx(0.77)


def test_phi_of_64_float32_fits_512_bytes():
    data = env.encode(make_patch(), KEY)
    assert len(data) <= 512, len(data)


def test_key_lookup_and_unknown_device():
    data = env.encode(make_patch(), KEY)
    assert env.decode(data, {"pi-0001": KEY}.get).device_id == "pi-0001"
    with pytest.raises(ProtocolError) as e:
        env.decode(data, {}.get)
    assert e.value.reason == "unknown_device"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d[:-1], "bad_signature"),                     # signature cut
        (lambda d: d[:10], "truncated"),
        (lambda d: b"XX" + d[2:], "bad_magic"),
        (lambda d: d[:2] + b"\x07" + d[3:], "bad_version"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "bad_signature"),   # a flipped body bit
        (lambda d: b"x" * (env.MAX_MESSAGE_BYTES + 1), "too_large"),
        (lambda d: b"", "truncated"),
    ],
)
def test_rejections_carry_a_reason(mutate, reason):
    with pytest.raises(ProtocolError) as e:
        env.decode(mutate(env.encode(make_patch(), KEY)), KEY)
    assert e.value.reason == reason


def test_forged_with_another_key_is_bad_signature():
    with pytest.raises(ProtocolError) as e:
        env.decode(env.encode(make_patch(), b"other key"), KEY)
    assert e.value.reason == "bad_signature"


def _resign(body: bytes) -> bytes:
    import hashlib, hmac
    return body + hmac.new(KEY, body, hashlib.sha256).digest()


def test_validly_signed_but_lying_lengths_are_bounded():
    good = env.encode(make_patch(), KEY)[:-32]
    # a tensor claiming 2**32-1 elements: must fail as truncated, without allocating
    idx = good.index(b"metapatch_phi") + len(b"metapatch_phi") + 2
    huge = good[:idx] + struct.pack("<I", 0xFFFFFFFF) + good[idx + 4:]
    with pytest.raises(ProtocolError) as e:
        env.decode(_resign(huge), KEY)
    assert e.value.reason == "truncated"
    with pytest.raises(ProtocolError) as e:
        env.decode(_resign(good + b"\x00"), KEY)
    assert e.value.reason == "trailing_bytes"
    dtype_at = idx - 2
    with pytest.raises(ProtocolError) as e:
        env.decode(_resign(good[:dtype_at] + b"\x02" + good[dtype_at + 1:]), KEY)
    assert e.value.reason == "bad_dtype"


def test_random_fuzz_never_raises_anything_but_protocol_error():
    """Seeded random truncations / mutations / garbage; every failure is a ProtocolError
    with a known reason, and nothing mutated ever verifies (3000 cases, ~1 s)."""
    rng = random.Random(1234)
    good = env.encode(make_patch(), KEY)
    accepted = 0
    for i in range(3000):
        kind = i % 4
        if kind == 0:
            data = good[: rng.randrange(len(good))]
        elif kind == 1:
            b = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= rng.randint(1, 255)
            data = bytes(b)
        elif kind == 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600)))
        else:   # validly re-signed garbage body: exercises the parser past the signature
            body = bytearray(good[:-32])
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(3, len(body))] = rng.getrandbits(8)
            data = _resign(bytes(body))
        try:
            env.decode(data, KEY)
            accepted += 1
        except ProtocolError as exc:
            assert exc.reason in REASONS
    # only kind 3 (re-signed with the real key) may legitimately parse
    assert accepted < 750


def test_topics_live_under_one_prefix():
    t = Topics("farm1/dccl")
    assert t.patch("pi-1") == "farm1/dccl/device/pi-1/patch"
    assert t.shared("ingest", t.all_devices("patch")) == "$share/ingest/farm1/dccl/device/+/patch"
    assert t.parse_device_topic("farm1/dccl/device/pi-1/heartbeat") == ("pi-1", "heartbeat")
    assert t.parse_device_topic("farm1/dccl/device/a/b/patch") is None
    assert t.model_chunk("v1", 0, 7) == "farm1/dccl/model/v1/chunk/0/7"
    for bad in ["x/+", "#", "/a", "a/"]:
        with pytest.raises(ValueError):
            Topics(bad)
    with pytest.raises(ValueError):
        t.patch("a/b")


def test_json_payloads_round_trip_and_reject():
    hb = payloads.load_heartbeat(payloads.dump_heartbeat(device_id="d", outbox_depth=3, cpu_temp_c=51.5))
    assert hb["outbox_depth"] == 3 and hb["last_loss"] is None
    for bad in [b"{", b"[]", b'{"v":2}', b'{"v":1,"outbox_depth":"x"}', b"\xff"]:
        with pytest.raises(ProtocolError) as e:
            payloads.load_heartbeat(bad)
        assert e.value.reason == "bad_payload"
    assert payloads.load_availability(b"online") == "online"
    with pytest.raises(ProtocolError):
        payloads.load_availability(b"maybe")
    assert payloads.load_command(payloads.dump_command("rollback"))["command"] == "rollback"
    ann = payloads.dump_announcement("v1", "0" * 64, [{"path": "manifest.json", "size": 10, "sha256": "1" * 64, "chunks": 1}], 4096)
    assert payloads.load_announcement(ann)["bundle_version"] == "v1"
    evil = ann.replace(b"manifest.json", b"../etc/passwd")
    with pytest.raises(ProtocolError):
        payloads.load_announcement(evil)


def test_protocol_imports_neither_torch_nor_cloud():
    code = ("import sys, dccl.protocol.envelope, dccl.protocol.topics, dccl.protocol.payloads;"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','pydantic','cloud_trainer','onnx_export')];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_val_len_is_one_rule_for_the_cloud_split_and_the_device_store():
    """local_data.val_frac → positives held out: round(val_frac·n), at least one when there are two,
    never all of them, none of none; an int for an int, the same per element for an array."""
    from dccl.protocol.manifest import val_len

    assert [val_len(n, 0.3) for n in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    assert [val_len(n, 0.0) for n in range(4)] == [0, 0, 0, 0]
    assert [val_len(n, 0.9) for n in range(5)] == [0, 0, 1, 2, 3]
    assert val_len(5, 0.5) == 2                   # half to even, as Python's round and NumPy's
    assert isinstance(val_len(3, 0.3), int)
    assert val_len(np.arange(7), 0.3).tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_step_budget_by_training_positives_is_one_rule_for_cloud_and_device():
    """optimizer.steps_by_positives → a device's steps: the last bracket at or below its count of
    training positives (`steps` when there is no table); a malformed table is rejected by name."""
    from dccl.protocol.manifest import check_steps_by_positives, step_budget

    table = [[0, 20], [4, 2], [14, 0]]
    assert [step_budget(5, table, n) for n in (0, 1, 3, 4, 13, 14, 99)] == [20, 20, 20, 2, 2, 0, 0]
    assert step_budget(5, None, 7) == 5 and isinstance(step_budget(5, table, 3), int)
    assert step_budget(5, table, np.array([3, 4, 14])).tolist() == [20, 2, 0]
    assert check_steps_by_positives([(0, 1), (2, 3)]) == [[0, 1], [2, 3]]
    for bad, where in (([], "x: "), ([[1, 2]], "x[0]: "), ([[0, 2], [0, 3]], "x[1]: "), ([[0, -1]], "x[0]: "),
                       ([[0, 2.5]], "x[0]: "), ([[0, True]], "x[0]: "), ([[0]], "x[0]: "), ("0,2", "x: ")):
        with pytest.raises(ValueError) as exc:
            check_steps_by_positives(bad, "x")
        assert str(exc.value).startswith(where), (bad, str(exc.value))
