"""Property-based fuzzing of the patch envelope, the ingest Validator and the JSON payloads.

A few hundred cases per property, so the suite stays in seconds; bench/fuzz_ingest.py runs
the same strategies for >= 10,000 cases. The properties:

- random, truncated, mutated and forged messages, and correctly signed ones that break a
  rule (insider), are never accepted; decoding and validation raise nothing but
  ``ProtocolError`` with a reason from ``REASONS`` (the expected one where it is known);
- the ingest service quarantines and counts each rejection by reason (table == metrics ==
  what the cases produced), stores nothing, and still accepts a valid patch afterwards;
- re-signed mutations (a compromised key) get past the signature, and are still either
  rejected with a reason or valid in every checked respect;
- JSON payload loaders raise only ``ProtocolError("bad_payload")`` on anything.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_trainer.ingest.service import IngestService
from cloud_trainer.ingest.store import open_store
from dccl.protocol import envelope, payloads
from dccl.protocol.errors import REASONS, ProtocolError
from tests import fuzz_strategies as fs

FAST = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _reason(fn, *args) -> str | None:
    try:
        fn(*args)
    except ProtocolError as exc:
        assert exc.reason in REASONS
        return exc.reason
    return None


@FAST
@given(fs.hostile())
def test_hostile_messages_are_rejected_by_decode_and_validator(case):
    decoded = _reason(envelope.decode, case.payload, fs.KEYS.get)
    reason = _reason(fs.validator().validate, case.topic, case.payload)
    assert reason is not None, f"{case.kind} message accepted"
    if case.expect is not None:
        assert reason == case.expect
    if decoded is not None:
        assert reason == decoded          # the validator adds no reason to a decoding failure


@FAST
@given(fs.valid_messages())
def test_valid_messages_round_trip_and_are_accepted(msg):
    topic, raw, p = msg
    q = fs.validator().validate(topic, raw)
    assert (q.device_id, q.round, q.sample_count, q.message_id) == (p.device_id, p.round, p.sample_count,
                                                                   p.message_id)
    np.testing.assert_array_equal(q.tensors[fs.PHI], p.tensors[fs.PHI])


@FAST
@given(fs.resigned_mutations())
def test_resigned_mutations_are_rejected_or_valid_in_every_respect(msg):
    topic, raw = msg
    v = fs.validator()
    try:
        p = v.validate(topic, raw)
    except ProtocolError as exc:
        assert exc.reason in REASONS
        return
    assert fs.TOPICS.patch(p.device_id) == topic and p.bundle_version == fs.BUNDLE
    assert set(p.tensors) == {fs.PHI} and p.tensors[fs.PHI].shape == (64,)
    assert np.isfinite(p.tensors[fs.PHI]).all() and np.linalg.norm(p.tensors[fs.PHI]) <= fs.NORM_BOUND


def test_ingest_service_quarantines_and_counts_every_rejection(tmp_path):
    store = open_store(tmp_path / "patches.db")
    svc = IngestService("mqtt://127.0.0.1:1", store, fs.validator(), follow_fleet=False)  # never connects
    seen: Counter[str] = Counter()

    @FAST
    @given(fs.hostile())
    def feed(case):
        outcome = svc.process(case.topic, case.payload)
        assert outcome in REASONS, f"{case.kind} message got {outcome!r}"
        seen[outcome] += 1

    try:
        feed()
        assert store.count() == 0
        assert store.quarantine_counts() == dict(seen)
        reg = svc.metrics.registry
        for reason, n in seen.items():
            assert reg.get_sample_value("dccl_ingest_rejected_total", {"reason": reason}) == n
        assert len(seen) >= 8, seen       # the strategies reach deep into the checks
        # alive: a valid patch is stored, its replay is a duplicate and stored once
        p = envelope.Patch(device_id="dev-1", bundle_version=fs.BUNDLE, round=1, sample_count=5,
                           tensors={fs.PHI: np.zeros(64, np.float32)})
        raw = envelope.encode(p, fs.KEYS["dev-1"])
        assert svc.process(fs.TOPICS.patch("dev-1"), raw) == "accepted"
        assert svc.process(fs.TOPICS.patch("dev-1"), raw) == "duplicate"
        assert store.message_ids() == [p.message_id]
    finally:
        store.close()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                   max_size=4), max_leaves=12)
_keys = st.sampled_from(["v", "bundle_version", "sha256", "fetch", "chunk_size", "files", "command", "args",
                         "kind", "device_id", "ts", "path", "size", "chunks"])


@st.composite
def _payload_objects(draw):
    obj = draw(st.dictionaries(_keys, _json, max_size=8))
    if draw(st.booleans()):
        obj["v"] = 1
    return json.dumps(obj).encode()


@FAST
@given(st.one_of(st.binary(max_size=512), _payload_objects()))
def test_json_payload_loaders_raise_only_bad_payload(data):
    for load in (payloads.load_announcement, payloads.load_command, payloads.load_heartbeat,
                 payloads.load_report, payloads.load_availability):
        r = _reason(load, data)
        assert r in (None, "bad_payload")
