"""The device's interaction store: a real SQLite file, idempotent ingestion, retention, samples."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from dccl.errors import DcclError
from edge_agent.store import EmptyDataError, Store
from tests.edge_fixtures import events

NOW = 2_000_000.0


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "store.sqlite")
    yield s
    s.close()


def test_wal_mode_and_persistence(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as s:
        assert s.ingest(events(5), now=NOW).added == 5
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(path) as s:
        assert s.counts()["click"] == 5


def test_ingest_is_idempotent_on_event_id(store):
    first = store.ingest(events(4), now=NOW)
    again = store.ingest(events(4), now=NOW)
    assert (first.added, first.duplicates) == (4, 0)
    assert (again.added, again.duplicates, again.rejected) == (0, 4, [])
    assert store.counts()["total"] == 4


def test_resend_without_ts_is_a_duplicate(store):
    ev = {"event_id": "no-ts", "kind": "click", "item": 3}
    assert store.ingest([ev], now=NOW).added == 1
    assert store.ingest([ev], now=NOW + 5).duplicates == 1
    assert store.events()[0].ts == NOW


def test_conflicting_event_id_is_rejected_not_overwritten(store):
    store.ingest([{"event_id": "x", "kind": "click", "item": 3, "ts": 10.0}], now=NOW)
    r = store.ingest([{"event_id": "x", "kind": "click", "item": 4, "ts": 10.0}], now=NOW)
    assert r.added == 0 and len(r.rejected) == 1 and "different content" in r.rejected[0][1]
    assert [e.item for e in store.events()] == [3]


@pytest.mark.parametrize("bad, word", [
    ({"event_id": "", "kind": "click", "item": 1}, "event_id"),
    ({"event_id": "a", "kind": "like", "item": 1}, "kind"),
    ({"event_id": "a", "kind": "click", "item": 0}, "item"),
    ({"event_id": "a", "kind": "click", "item": "7"}, "item"),
    ({"event_id": "a", "kind": "click", "item": True}, "item"),
    ({"event_id": "a", "kind": "click", "item": 1, "ts": float("nan")}, "ts"),
    ({"event_id": "a", "kind": "click", "item": 1, "ts": NOW + 10 * 86400}, "future"),
    ({"event_id": "a", "kind": "click", "item": 1, "extra": 1}, "unknown field"),
    ("not an object", "JSON object"),
])
def test_bad_events_are_rejected_with_a_reason_and_good_ones_kept(store, bad, word):
    batch = events(2, start_ts=NOW - 100) + [bad] + events(1, start_ts=NOW - 50, prefix="z")
    r = store.ingest(batch, now=NOW)
    assert r.added == 3
    assert len(r.rejected) == 1 and r.rejected[0][0] == 2 and word in r.rejected[0][1]
    assert store.counts()["total"] == 3


def test_retention_max_rows_drops_oldest_first(tmp_path):
    with Store(tmp_path / "s.sqlite", max_rows=5) as s:
        s.ingest(events(4, start_ts=NOW - 100), now=NOW)
        r = s.ingest(events(3, start_ts=NOW - 10, prefix="n", item0=50), now=NOW)
        assert r.pruned == 2 and s.counts()["total"] == 5
        assert [e.event_id for e in s.events()] == ["e2", "e3", "n0", "n1", "n2"]


def test_retention_max_age(tmp_path):
    with Store(tmp_path / "s.sqlite", max_age_days=1.0) as s:
        s.ingest(events(3, start_ts=NOW - 3 * 86400) + events(2, start_ts=NOW - 60, prefix="new"), now=NOW)
        assert [e.event_id for e in s.events()] == ["new0", "new1"]
        assert s.apply_retention(now=NOW + 2 * 86400) == 2
        assert s.counts()["total"] == 0


def test_history_right_aligned_padded_and_ignores_impressions(store):
    store.ingest(events(6, click_every=2, item0=10), now=NOW)   # clicks on 10, 12, 14
    assert store.history(5).tolist() == [0, 0, 10, 12, 14]
    assert store.history(2).tolist() == [12, 14]
    assert store.history(5, n_items=12).tolist() == [0, 0, 0, 10, 12]


def test_time_order_is_by_timestamp_not_arrival(store):
    store.ingest([{"event_id": "late", "kind": "click", "item": 9, "ts": 30.0},
                  {"event_id": "early", "kind": "click", "item": 8, "ts": 20.0}], now=NOW)
    assert store.history(3).tolist() == [0, 8, 9]


def test_training_arrays_contract(store):
    # Positives 1..10 at increasing ts; catalogue of 40 items; profile of 2 features in a model with 3.
    store.ingest(events(10) + [{"event_id": "imp", "kind": "impression", "item": 33, "ts": 1.0}], now=NOW)
    store.set_profile([4, 7])
    ta = store.training_arrays(neg=3, max_len=4, val_frac=0.2, seed=5, n_items=40, n_profile=3)
    assert (ta.n_positives, ta.n_val_positives) == (10, 2)
    tr, va = ta.train, ta.val
    assert len(tr) == 8 * 4 and len(va) == 2 * 4
    for s in (tr, va):
        assert s.item.dtype == np.int64 and s.hist.dtype == np.int64 and s.profile.dtype == np.int64
        assert s.label.dtype == np.float32 and s.hist.shape == (len(s), 4) and s.profile.shape == (len(s), 3)
        assert (s.profile == [4, 7, 0]).all()
        assert s.label.reshape(-1, 4).tolist() == [[1, 0, 0, 0]] * (len(s) // 4)
        neg = s.item.reshape(-1, 4)[:, 1:]
        assert ((neg >= 11) & (neg <= 40)).all(), "negatives come from never-interacted items only"
    # hist of the k-th positive = the positives before it, right-aligned; shared by its negatives
    pos_hist = tr.hist[::4]
    assert pos_hist[0].tolist() == [0, 0, 0, 0] and pos_hist[2].tolist() == [0, 0, 1, 2]
    assert pos_hist[7].tolist() == [4, 5, 6, 7]
    assert (tr.hist.reshape(8, 4, 4) == pos_hist[:, None, :]).all()
    # validation = newest positives
    assert va.item[::4].tolist() == [9, 10] and va.hist[0].tolist() == [5, 6, 7, 8]


def test_training_arrays_seeded(store):
    store.ingest(events(6), now=NOW)
    a = store.training_arrays(neg=4, max_len=3, val_frac=0.0, seed=1, n_items=100)
    b = store.training_arrays(neg=4, max_len=3, val_frac=0.0, seed=1, n_items=100)
    c = store.training_arrays(neg=4, max_len=3, val_frac=0.0, seed=2, n_items=100)
    assert np.array_equal(a.train.item, b.train.item) and not np.array_equal(a.train.item, c.train.item)
    assert len(a.val) == 0 and a.val.hist.shape == (0, 3) and a.train.profile.shape == (30, 0)


def test_training_arrays_drops_items_outside_catalogue(store):
    store.ingest(events(5, item0=8), now=NOW)   # items 8..12
    ta = store.training_arrays(neg=1, max_len=2, val_frac=0.0, seed=0, n_items=10)
    assert ta.dropped_unknown == 2 and ta.train.item[::2].tolist() == [8, 9, 10]
    assert ta.train.hist.max() <= 10


def test_impression_negatives_optional(store):
    store.ingest(events(6, click_every=2), now=NOW)   # clicks on 1, 3, 5; impressions of 2, 4, 6
    store.ingest([{"event_id": "c2", "kind": "click", "item": 4, "ts": 1_000_010.0}], now=NOW)
    base = store.training_arrays(neg=1, max_len=2, val_frac=0.0, seed=0, n_items=50)
    more = store.training_arrays(neg=1, max_len=2, val_frac=0.0, seed=0, n_items=50, impression_negatives=True)
    extra = more.train.item[len(base.train):]
    assert sorted(extra.tolist()) == [2, 6], "4 was clicked later: never a negative"
    assert (more.train.label[len(base.train):] == 0).all()
    # the impression of item 6 (ts +5) comes after clicks 1, 3 and 5 -> hist [3, 5]
    assert more.train.hist[len(base.train):][extra.tolist().index(6)].tolist() == [3, 5]


def test_since_starts_the_fresh_window_older_positives_are_history(store):
    """With ``since`` (the bundle's local_data.since) only positives from then on become samples —
    the device's fresh window, as in the cloud's split; the older ones stay in every sample's history,
    and no positive, old or new, is ever a negative."""
    store.ingest(events(10) + [{"event_id": "i0", "kind": "impression", "item": 30, "ts": 1_000_001.5},
                               {"event_id": "i1", "kind": "impression", "item": 31, "ts": 1_000_007.5}], now=NOW)
    since = 1_000_006.0                         # positives 7..10 (ts +6 .. +9) are fresh
    ta = store.training_arrays(neg=3, max_len=4, val_frac=0.25, seed=5, n_items=40, since=since,
                               impression_negatives=True)
    assert (ta.n_positives, ta.n_val_positives) == (4, 1)
    pos = ta.train.label == 1
    assert ta.train.item[pos].tolist() == [7, 8, 9] and ta.val.item[ta.val.label == 1].tolist() == [10]
    assert ta.train.hist[pos][0].tolist() == [3, 4, 5, 6], "older positives are the first fresh one's history"
    neg = ta.train.item[~pos]
    assert not np.isin(neg, np.arange(1, 11)).any(), "no positive is a negative"
    assert 31 in neg and 30 not in neg, "only impressions shown inside the window"
    assert store.training_arrays(neg=3, max_len=4, val_frac=0.1, seed=5, n_items=40).n_positives == 10, \
        "without since: every positive"
    with pytest.raises(EmptyDataError, match=r"since 1000010 .*local_data.since.*10 older ones are history only"):
        store.training_arrays(neg=1, max_len=3, val_frac=0.1, seed=0, n_items=40, since=1_000_010.0)
    with pytest.raises(DcclError, match="since=nan"):
        store.training_arrays(neg=1, max_len=3, val_frac=0.1, seed=0, n_items=40, since=float("nan"))


def test_empty_store_gives_a_clear_error(store):
    with pytest.raises(EmptyDataError, match="nothing to train on"):
        store.training_arrays(neg=1, max_len=3, val_frac=0.1, seed=0, n_items=10)
    store.ingest(events(2, click_every=5), now=NOW)    # one click, one impression
    ta = store.training_arrays(neg=1, max_len=3, val_frac=0.5, seed=0, n_items=10)
    assert ta.n_val_positives == 0, "a single positive stays in training"


def test_all_items_seen_gives_a_clear_error(store):
    store.ingest(events(3), now=NOW)
    with pytest.raises(DcclError, match="all 3 items"):
        store.training_arrays(neg=1, max_len=3, val_frac=0.0, seed=0, n_items=3)


def test_profile_validation(store):
    assert store.profile() is None and store.profile_array(2).tolist() == [0, 0]
    with pytest.raises(DcclError, match=r"profile\[1\] = -1"):
        store.set_profile([1, -1])
    store.set_profile([1, 2, 3])
    with pytest.raises(DcclError, match="3 features"):
        store.profile_array(2)


def test_item_metadata(store):
    store.upsert_items({5: {"title": "Toy Story"}})
    assert store.item_meta(5) == {"title": "Toy Story"} and store.item_meta(6) is None
    with pytest.raises(DcclError):
        store.upsert_items({0: {}})
