"""The device's own interactions: SQLite (WAL), idempotent ingestion, retention, training arrays.

Only this device's user lives here, and the data never leaves the device; what leaves is
the trained φ. Tables:

- ``events``: one row per impression / click / interaction, keyed by the app's
  ``event_id`` (UNIQUE), so a retried upload stores each event once.
- ``items``: optional catalogue metadata the app knows about (id -> JSON), for display.
- ``meta``: the device profile (P categorical ints, 0 = unknown) and other small values.

Positives and negatives (docs/DESIGN.md data contract):

- The behaviour sequence is the user's **clicks and interactions** in time order
  (``ts``, then arrival order); ``hist`` of a sample is the last ``max_len`` of them
  strictly before it, right-aligned, 0-padded. Impressions never enter ``hist``.
- Each positive gets ``neg`` negatives sampled (seeded, with replacement, as in the
  cloud's ``build_ctr_samples``) from catalogue items ``1..n_items`` the user never
  clicked or interacted with. That is the distribution Θ, the encoder and the cloud
  model were trained on, so a φ trained here means the same thing to the cloud.
- Impressions shown but never clicked are *not* negatives by default: they are
  exposure-biased (the cloud model chose them, so they are "hard" negatives the cloud
  never trained on) and would move the device's label distribution away from the
  cloud's. ``impression_negatives=True`` adds one extra negative row per such item
  (with the hist at the time it was shown) for experiments.
- Validation is the newest ``val_frac`` of positives with their negatives (and the
  impression negatives shown at or after the first validation positive): the device's
  early-stopping slice, like the end of the fresh window in the cloud's split.
- ``since`` (the bundle's ``local_data.since``) is where the device's fresh window starts:
  only positives at or after it (and impressions shown from then on) become training and
  validation samples; older positives still form the history of every sample. Without it
  every positive the store holds is a sample.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from dccl import sqlite_wal
from dccl.errors import DcclError
from dccl.protocol.manifest import val_len

KINDS = ("impression", "click", "interaction")
POSITIVE_KINDS = ("click", "interaction")
MAX_EVENT_ID = 128
FUTURE_SLACK_S = 24 * 3600.0     # an event more than a day in the future is a clock bug

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    kind     TEXT NOT NULL CHECK (kind IN ('impression', 'click', 'interaction')),
    item     INTEGER NOT NULL CHECK (item >= 1),
    ts       REAL NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts, seq);
CREATE TABLE IF NOT EXISTS items (
    item INTEGER PRIMARY KEY CHECK (item >= 1),
    meta TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class EmptyDataError(DcclError):
    """No positives to train on."""


@dataclass(frozen=True)
class Event:
    event_id: str
    kind: str
    item: int
    ts: float
    ts_given: bool = True     # False: ts is the arrival time; a resend then matches on kind + item


@dataclass
class IngestResult:
    added: int = 0
    duplicates: int = 0                       # same event_id, same content: already stored
    rejected: list[tuple[int, str]] = field(default_factory=list)   # (index in the batch, reason)
    pruned: int = 0                           # rows removed by retention after this batch

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "duplicates": self.duplicates, "pruned": self.pruned,
                "rejected": [{"index": i, "reason": r} for i, r in self.rejected]}


@dataclass
class Samples:
    item: np.ndarray      # [N] int64
    hist: np.ndarray      # [N, L] int64, right-aligned, 0-padded
    profile: np.ndarray   # [N, P] int64, the device profile on every row
    label: np.ndarray     # [N] float32

    def __len__(self) -> int:
        return len(self.item)


@dataclass
class TrainingArrays:
    train: Samples
    val: Samples
    n_positives: int          # positives used (train + val)
    n_val_positives: int
    dropped_unknown: int      # positives whose item is outside 1..n_items (newer catalogue)


def validate_event(e: Any, now: float | None = None, n_items: int | None = None) -> Event:
    """One event from JSON-ish input; raises ValueError with a reason naming the field."""
    if isinstance(e, Event):
        e = {"event_id": e.event_id, "kind": e.kind, "item": e.item, "ts": e.ts}
    if not isinstance(e, Mapping):
        raise ValueError(f"event must be a JSON object, got {type(e).__name__}")
    unknown = set(e) - {"event_id", "kind", "item", "ts"}
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    eid = e.get("event_id")
    if not isinstance(eid, str) or not eid or len(eid) > MAX_EVENT_ID:
        raise ValueError(f"event_id = {eid!r}: must be a non-empty string of <= {MAX_EVENT_ID} chars")
    kind = e.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: must be one of {', '.join(KINDS)}")
    item = e.get("item")
    if isinstance(item, bool) or not isinstance(item, int) or item < 1 or item >= 2**63:
        raise ValueError(f"item = {item!r}: must be an integer item id >= 1 (0 is padding)")
    if n_items is not None and item > n_items:
        raise ValueError(f"item = {item}: outside the catalogue 1..{n_items}")
    now = time.time() if now is None else now
    ts = e.get("ts", now)
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise ValueError(f"ts = {ts!r}: must be a finite number of seconds since the epoch")
    if ts > now + FUTURE_SLACK_S:
        raise ValueError(f"ts = {ts!r}: more than a day in the future (device clock wrong?)")
    return Event(eid, kind, int(item), float(ts), "ts" in e)


class Store:
    """Thread-safe: one connection behind a lock (the HTTP server ingests from its threads)."""

    def __init__(self, path: str | Path, max_rows: int = 100_000, max_age_days: float = 365.0):
        self.path = str(path)
        self.max_rows, self.max_age_days = max_rows, max_age_days
        self._lock = threading.Lock()
        try:
            self._db = sqlite_wal.connect(self.path)
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DcclError(f"interaction store {self.path}: cannot open ({exc})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ ingestion

    def ingest(self, events: Iterable[Any], n_items: int | None = None, now: float | None = None) -> IngestResult:
        """Store valid events in one transaction; invalid ones are rejected with a reason.

        Idempotent on ``event_id``: a retried event is counted as a duplicate. An event id
        already stored with *different* content is rejected (first write wins), never
        overwritten. Retention runs after the batch.
        """
        res = IngestResult()
        now = time.time() if now is None else now
        valid: list[tuple[int, Event]] = []
        for i, raw in enumerate(events):
            try:
                valid.append((i, validate_event(raw, now, n_items)))
            except ValueError as exc:
                res.rejected.append((i, str(exc)))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for i, ev in valid:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO events (event_id, kind, item, ts, received) VALUES (?,?,?,?,?)",
                        (ev.event_id, ev.kind, ev.item, ev.ts, now))
                    if cur.rowcount == 1:
                        res.added += 1
                        continue
                    old = self._db.execute("SELECT kind, item, ts FROM events WHERE event_id = ?",
                                           (ev.event_id,)).fetchone()
                    if old == (ev.kind, ev.item, ev.ts) or (not ev.ts_given and old[:2] == (ev.kind, ev.item)):
                        res.duplicates += 1
                    else:
                        res.rejected.append((i, f"event_id = {ev.event_id!r}: already stored with "
                                                f"different content {old!r}; not overwritten"))
                res.pruned = self._prune(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        res.rejected.sort()
        return res

    def _prune(self, now: float) -> int:
        cutoff = now - self.max_age_days * 86400.0
        n = self._db.execute("DELETE FROM events WHERE ts < ?", (cutoff,)).rowcount
        total = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        if total > self.max_rows:
            n += self._db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events ORDER BY ts, seq LIMIT ?)",
                (total - self.max_rows,)).rowcount
        return n

    def apply_retention(self, now: float | None = None) -> int:
        """Drop events beyond the retention policy; returns how many."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._prune(time.time() if now is None else now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def upsert_items(self, items: Mapping[int, Mapping[str, Any]]) -> int:
        """Catalogue metadata (id -> JSON object) for the app; not used for training."""
        rows = []
        for k, meta in items.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise DcclError(f"item id {k!r}: must be an integer >= 1")
            if not isinstance(meta, Mapping):
                raise DcclError(f"item {k}: metadata must be a JSON object")
            rows.append((k, json.dumps(meta, sort_keys=True)))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO items (item, meta) VALUES (?, ?)", rows)
            self._db.execute("COMMIT")
        return len(rows)

    def item_meta(self, item: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT meta FROM items WHERE item = ?", (item,)).fetchone()
        return json.loads(row[0]) if row else None

    # ------------------------------------------------------------------ profile

    def set_profile(self, profile: Iterable[int]) -> list[int]:
        vals = list(profile)
        for j, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DcclError(f"profile[{j}] = {v!r}: must be an integer >= 0 (0 = unknown)")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('profile', ?)", (json.dumps(vals),))
        return vals

    def profile(self) -> list[int] | None:
        """The device profile as stored, or None if it was never set."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'profile'").fetchone()
        return json.loads(row[0]) if row else None

    def profile_array(self, n_profile: int) -> np.ndarray:
        """[P] int64 profile for a model with P columns: unset / missing columns are 0 (unknown)."""
        p = self.profile() or []
        if len(p) > n_profile:
            raise DcclError(f"stored profile has {len(p)} features, the model expects {n_profile}")
        return np.array(p + [0] * (n_profile - len(p)), dtype=np.int64)

    # ------------------------------------------------------------------ reading

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall()
        out = {k: 0 for k in KINDS}
        out.update(dict(rows))
        out["total"] = sum(out[k] for k in KINDS)
        return out

    def events(self, kinds: Iterable[str] = KINDS) -> list[Event]:
        kinds = tuple(kinds)
        q = f"SELECT event_id, kind, item, ts FROM events WHERE kind IN ({','.join('?' * len(kinds))}) ORDER BY ts, seq"
        with self._lock:
            return [Event(*r) for r in self._db.execute(q, kinds).fetchall()]

    def _positives(self) -> tuple[np.ndarray, np.ndarray]:
        """(item [K] int64, ts [K] float64) of clicks + interactions in time order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item, ts FROM events WHERE kind IN ('click', 'interaction') ORDER BY ts, seq").fetchall()
        a = np.array(rows, dtype=np.float64).reshape(-1, 2)
        return a[:, 0].astype(np.int64), a[:, 1]

    def history(self, max_len: int, n_items: int | None = None) -> np.ndarray:
        """[L] int64: the last ``max_len`` positives, right-aligned, 0-padded (inference hist)."""
        if max_len < 1:
            raise DcclError(f"max_len = {max_len}: must be >= 1")
        items, _ = self._positives()
        if n_items is not None:
            items = items[items <= n_items]
        out = np.zeros(max_len, np.int64)
        tail = items[-max_len:]
        out[max_len - len(tail):] = tail
        return out

    def training_arrays(self, neg: int, max_len: int, val_frac: float, seed: int, n_items: int,
                        n_profile: int = 0, impression_negatives: bool = False,
                        since: float | None = None) -> TrainingArrays:
        """Training + validation samples in time order (see the module docstring).

        Rows: each positive (at or after ``since``, when given), then its ``neg`` negatives.
        Raises EmptyDataError when there is no such positive inside the catalogue, DcclError
        when the catalogue has no item left to sample negatives from.
        """
        if neg < 0 or max_len < 1 or not (0.0 <= val_frac < 1.0) or n_items < 1:
            raise DcclError(f"neg={neg}, max_len={max_len}, val_frac={val_frac}, n_items={n_items}: "
                            "need neg >= 0, max_len >= 1, 0 <= val_frac < 1, n_items >= 1")
        if since is not None and not math.isfinite(since):
            raise DcclError(f"since={since}: must be a finite time (unix seconds)")
        items_all, ts_all = self._positives()
        known = items_all <= n_items
        items, ts = items_all[known], ts_all[known]
        first = 0 if since is None else int(np.searchsorted(ts, since, side="left"))
        K = len(items) - first      # samples: positives first .. end; the older ones are history only
        if K == 0:
            raise EmptyDataError(
                "no clicks or interactions in the local store"
                + (f" inside the catalogue 1..{n_items}" if len(items_all) else "")
                + (f" since {since:.0f} (unix seconds; the bundle's local_data.since: where the device's fresh "
                   f"window starts; {first} older ones are history only)" if since is not None else "")
                + ": nothing to train on")
        seen = np.unique(items)
        free = np.setdiff1d(np.arange(1, n_items + 1, dtype=np.int64), seen, assume_unique=True)
        if neg and len(free) == 0:
            raise DcclError(f"the user interacted with all {n_items} items: no negatives to sample")

        # Validation: newest val_frac of positives, at least one when asked, at least one left to train.
        n_val = val_len(K, val_frac)
        padded = np.concatenate([np.zeros(max_len, np.int64), items])
        # hist of positive k = items[k-L : k]  ->  padded[k : k+L]; samples are positives first..end
        win = (first + np.arange(K))[:, None] + np.arange(max_len)[None, :]        # (K, L)
        hist = padded[win]
        G = 1 + neg
        cand = np.empty((K, G), np.int64)
        cand[:, 0] = items[first:]
        if neg:
            rng = np.random.default_rng(seed)
            cand[:, 1:] = free[rng.integers(0, len(free), size=(K, neg))]
        label = np.zeros((K, G), np.float32)
        label[:, 0] = 1.0
        prof = self.profile_array(n_profile)

        def rows(sel: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            k = np.arange(K)[sel]
            return cand[k].reshape(-1), np.repeat(hist[k], G, axis=0), label[k].reshape(-1)

        parts = {"train": list(rows(slice(0, K - n_val))), "val": list(rows(slice(K - n_val, K)))}
        if impression_negatives:
            self._add_impression_negatives(parts, items, ts, seen, n_items, max_len,
                                           ts[first + K - n_val] if n_val else math.inf,
                                           -math.inf if since is None else since)
        out = {}
        for name, (it, hi, la) in parts.items():
            out[name] = Samples(item=it, hist=hi.reshape(-1, max_len),
                                profile=np.broadcast_to(prof, (len(it), n_profile)).copy(), label=la)
        return TrainingArrays(out["train"], out["val"], K, n_val, int((~known).sum()))

    def _add_impression_negatives(self, parts: dict, items: np.ndarray, ts: np.ndarray, seen: np.ndarray,
                                  n_items: int, max_len: int, val_start: float, since: float) -> None:
        """One negative row per impression (at or after ``since``) of an item never clicked, hist as of its ts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT item, ts FROM events WHERE kind = 'impression' ORDER BY ts, seq").fetchall()
        if not rows:
            return
        imp = np.array(rows, dtype=np.float64).reshape(-1, 2)
        it, t = imp[:, 0].astype(np.int64), imp[:, 1]
        keep = (it <= n_items) & ~np.isin(it, seen) & (t >= since)
        it, t = it[keep], t[keep]
        n_before = np.searchsorted(ts, t, side="left")          # positives strictly before each impression
        padded = np.concatenate([np.zeros(max_len, np.int64), items])
        hist = padded[n_before[:, None] + np.arange(max_len)[None, :]]
        is_val = t >= val_start
        for name, m in (("train", ~is_val), ("val", is_val)):
            p = parts[name]
            p[0] = np.concatenate([p[0], it[m]])
            p[1] = np.concatenate([p[1].reshape(-1, max_len), hist[m]])
            p[2] = np.concatenate([p[2], np.zeros(int(m.sum()), np.float32)])
