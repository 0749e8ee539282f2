"""Batched ingest: one transaction per batch, per-message outcomes, duplicates inside a batch."""

from __future__ import annotations

import pytest

from cloud_trainer.ingest.service import IngestService
from cloud_trainer.ingest.store import open_store
from cloud_trainer.ingest.validate import Validator, load_spec
from dccl.protocol.topics import Topics
from tests.mqtt_fixtures import device_key, make_patch, pg_schema, store  # noqa: F401  (fixtures)


def test_write_batch_stores_once_and_reports_duplicates(store):
    a, raw_a = make_patch("dev-a", round_=1, seed=1)
    b, raw_b = make_patch("dev-b", round_=1, seed=2)
    assert store.add(a, raw_a)
    out = store.write_batch([(a, raw_a), (b, raw_b), (b, raw_b)], [("t", "bad_magic", "x", b"junk")])
    assert out == [False, True, False]          # stored before; new; repeated within the batch
    assert sorted(store.message_ids()) == sorted([a.message_id, b.message_id])
    assert store.quarantine_counts() == {"bad_magic": 1}
    assert store.write_batch([], []) == []


def test_service_batch_outcomes_in_arrival_order(tmp_path):
    from cloud_trainer.ingest.service import _Msg
    topics = Topics("batch/dccl")
    store = open_store(tmp_path / "p.db")
    v = Validator(keys={"dev-a": device_key("dev-a")}, topics=topics,
                  spec=load_spec({"metapatch_phi": ((64,), "float32")}))
    seen = []
    svc = IngestService("mqtt://127.0.0.1:1", store, v, follow_fleet=False, max_batch=8, on_commit=seen.append)
    p, raw = make_patch("dev-a", seed=3)
    msgs = [_Msg(topics.patch("dev-a"), raw, 1, 1, 0), _Msg(topics.patch("dev-a"), b"junk", 2, 1, 0),
            _Msg(topics.patch("dev-a"), raw, 3, 1, 0), _Msg(topics.heartbeat("dev-a"), b"{}", 4, 0, 0)]
    done = svc._process(msgs)
    assert [m.mid for m, _ in done] == [1, 2, 3, 4]
    assert [o[0] for _, o in done] == ["accepted", "bad_magic", "duplicate", "fleet"]
    assert store.message_ids() == [p.message_id] and store.quarantine_counts() == {"bad_magic": 1}
    with pytest.raises(ValueError):
        IngestService("mqtt://127.0.0.1:1", store, v, max_batch=0)
    store.close()
