"""The patch store: what ingest writes and MoMoDistill reads.

SQLite (a file path, the default) or PostgreSQL (a ``postgresql://`` URL, psycopg 3).
``message_id`` is the primary key, so storing a redelivered or replayed message is a
no-op (idempotent). The signed envelope is kept verbatim (``raw``): a stored patch can be
re-verified later, and its tensors are re-read from it without a second format.

Read API for MoMoDistill::

    store.latest(bundle_version) -> LatestPatches   # newest φ per device, numpy arrays
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dccl import sqlite_wal
from dccl.errors import DcclError
from dccl.protocol import envelope


@dataclass
class LatestPatches:
    """The newest patch of every device for one bundle version, rows aligned."""

    bundle_version: str
    device_ids: list[str]                 # [N]
    rounds: np.ndarray                    # [N] int64
    sample_counts: np.ndarray             # [N] int64
    tensors: dict[str, np.ndarray]        # name -> [N, *shape] float32
    metrics: list[dict[str, float]]       # [N]

    def __len__(self) -> int:
        return len(self.device_ids)


_LATEST = """
SELECT device_id, round, sample_count, raw FROM (
  SELECT device_id, round, sample_count, raw,
         ROW_NUMBER() OVER (PARTITION BY device_id ORDER BY round DESC, ts_ms DESC, received_ms DESC) AS rn
  FROM patches WHERE bundle_version = {p}
) AS ranked WHERE rn = 1 ORDER BY device_id
"""


class PatchStore:
    """Common logic; subclasses provide the connection and placeholder style."""

    placeholder = "?"
    blob = "BLOB"

    def _schema(self) -> list[str]:
        return [
            f"""CREATE TABLE IF NOT EXISTS patches (
                message_id     {self.blob} PRIMARY KEY,
                device_id      TEXT NOT NULL,
                bundle_version TEXT NOT NULL,
                round          BIGINT NOT NULL,
                sample_count   BIGINT NOT NULL,
                ts_ms          BIGINT NOT NULL,
                received_ms    BIGINT NOT NULL,
                metrics        TEXT NOT NULL,
                raw            {self.blob} NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS patches_by_version ON patches (bundle_version, device_id)",
            f"""CREATE TABLE IF NOT EXISTS quarantine (
                id          {self.serial},
                received_ms BIGINT NOT NULL,
                topic       TEXT NOT NULL,
                reason      TEXT NOT NULL,
                detail      TEXT NOT NULL,
                payload     {self.blob} NOT NULL)""",
        ]

    # subclasses: _tx() context manager yielding a cursor, committed on exit
    @contextmanager
    def _tx(self, write: bool = False) -> Iterator:
        raise NotImplementedError

    def _sql(self, q: str) -> str:
        return q.replace("?", self.placeholder)

    def add(self, patch: envelope.Patch, raw: bytes) -> bool:
        """Store a verified patch in one transaction. False if its message id is stored already."""
        with self._tx(write=True) as cur:
            cur.execute(
                self._sql(self._insert_patch),
                (patch.message_id, patch.device_id, patch.bundle_version, patch.round, patch.sample_count,
                 patch.timestamp_ms, int(time.time() * 1000), json.dumps(dict(patch.metrics)), bytes(raw)),
            )
            return cur.rowcount == 1

    def write_batch(self, accepted: list[tuple[envelope.Patch, bytes]],
                    quarantined: list[tuple[str, str, str, bytes]]) -> list[bool]:
        """Store verified patches and quarantine rows in ONE transaction (one commit, one fsync).

        ``accepted``: (patch, raw envelope); ``quarantined``: (topic, reason, detail, payload).
        Returns, per accepted patch, True if stored now, False if its message id was already
        stored (also within this batch). Ingest acknowledges the batch's messages only after
        this returns, so "ack only after commit" holds for every one of them.
        """
        now_ms = int(time.time() * 1000)
        rows = [(p.message_id, p.device_id, p.bundle_version, p.round, p.sample_count, p.timestamp_ms, now_ms,
                 json.dumps(dict(p.metrics)), bytes(raw)) for p, raw in accepted]
        with self._tx(write=True) as cur:
            stored = self._insert_rows(cur, rows) if rows else []
            for topic, reason, detail, payload in quarantined:
                cur.execute(
                    self._sql("INSERT INTO quarantine (received_ms, topic, reason, detail, payload) VALUES (?,?,?,?,?)"),
                    (now_ms, topic, reason, detail[:500], bytes(payload[:65536])),
                )
        return stored

    def _insert_rows(self, cur, rows: list[tuple]) -> list[bool]:
        out = []
        for row in rows:
            cur.execute(self._sql(self._insert_patch), row)
            out.append(cur.rowcount == 1)
        return out

    def quarantine(self, topic: str, reason: str, detail: str, payload: bytes) -> None:
        with self._tx(write=True) as cur:
            cur.execute(
                self._sql("INSERT INTO quarantine (received_ms, topic, reason, detail, payload) VALUES (?,?,?,?,?)"),
                (int(time.time() * 1000), topic, reason, detail[:500], bytes(payload[:65536])),
            )

    def count(self, bundle_version: str | None = None) -> int:
        with self._tx() as cur:
            if bundle_version is None:
                cur.execute("SELECT COUNT(*) FROM patches")
            else:
                cur.execute(self._sql("SELECT COUNT(*) FROM patches WHERE bundle_version = ?"), (bundle_version,))
            return int(cur.fetchone()[0])

    def message_ids(self) -> list[bytes]:
        with self._tx() as cur:
            cur.execute("SELECT message_id FROM patches")
            return [bytes(r[0]) for r in cur.fetchall()]

    def quarantine_counts(self) -> dict[str, int]:
        with self._tx() as cur:
            cur.execute("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason")
            return {r[0]: int(r[1]) for r in cur.fetchall()}

    def bundle_versions(self) -> list[str]:
        with self._tx() as cur:
            cur.execute("SELECT DISTINCT bundle_version FROM patches ORDER BY bundle_version")
            return [r[0] for r in cur.fetchall()]

    def latest(self, bundle_version: str) -> LatestPatches:
        """Newest φ per device (highest round, then newest timestamp) for one bundle version."""
        with self._tx() as cur:
            cur.execute(_LATEST.format(p=self.placeholder), (bundle_version,))
            rows = cur.fetchall()
        devices, rounds, counts, metrics = [], [], [], []
        stacks: dict[str, list[np.ndarray]] = {}
        for device_id, rnd, samples, raw in rows:
            p = envelope.decode(bytes(raw), b"", verify=False)   # verified before it was stored
            devices.append(device_id)
            rounds.append(rnd)
            counts.append(samples)
            metrics.append(dict(p.metrics))
            for name, t in p.tensors.items():
                stacks.setdefault(name, []).append(t)
        tensors = {n: np.stack(ts).astype(np.float32) for n, ts in stacks.items() if len(ts) == len(devices)}
        return LatestPatches(bundle_version, devices, np.asarray(rounds, np.int64),
                             np.asarray(counts, np.int64), tensors, metrics)

    def close(self) -> None:
        raise NotImplementedError


class SqlitePatchStore(PatchStore):
    serial = "INTEGER PRIMARY KEY AUTOINCREMENT"
    _insert_patch = ("INSERT OR IGNORE INTO patches (message_id, device_id, bundle_version, round, sample_count,"
                     " ts_ms, received_ms, metrics, raw) VALUES (?,?,?,?,?,?,?,?,?)")

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite_wal.connect(self.path)  # several ingest processes may share one file
        for stmt in self._schema():
            self._db.execute(stmt)

    @contextmanager
    def _tx(self, write: bool = False):
        with self._lock:
            cur = self._db.cursor()
            # writers take the lock up front (no deadlock on upgrade); readers never block the writer
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def _insert_rows(self, cur, rows: list[tuple]) -> list[bool]:
        # Inside the write (IMMEDIATE) transaction nobody else inserts: ids found now are the
        # duplicates; the rest go in with one executemany (per-row execute doubles the cost).
        ids = [row[0] for row in rows]
        known: set[bytes] = set()
        for i in range(0, len(ids), 500):          # below SQLite's host-parameter limit
            part = ids[i:i + 500]
            cur.execute(f"SELECT message_id FROM patches WHERE message_id IN ({','.join('?' * len(part))})", part)
            known.update(bytes(r[0]) for r in cur.fetchall())
        out = []
        for mid in ids:
            out.append(bytes(mid) not in known)
            known.add(bytes(mid))     # a repeat within the batch is a duplicate
        cur.executemany(self._insert_patch, rows)
        return out

    def close(self) -> None:
        self._db.close()


class PostgresPatchStore(PatchStore):
    placeholder = "%s"
    blob = "BYTEA"
    serial = "BIGSERIAL PRIMARY KEY"
    _insert_patch = ("INSERT INTO patches (message_id, device_id, bundle_version, round, sample_count,"
                     " ts_ms, received_ms, metrics, raw) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING")

    def __init__(self, url: str, schema: str | None = None):
        import psycopg

        self._psycopg, self._url, self._schema_name = psycopg, url, schema
        if schema is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise DcclError(f"PostgreSQL schema {schema!r}: use [a-z_][a-z0-9_]*")
        try:
            self._connect()
        except psycopg.Error as exc:
            raise DcclError(f"cannot connect to {url}: {str(exc).splitlines()[0]}") from None
        self._lock = threading.Lock()
        with self._db.transaction():
            # concurrent ingest processes may race to create the tables
            self._db.execute("SELECT pg_advisory_xact_lock(7217001)")
            for stmt in self._schema():
                self._db.execute(stmt)

    def _insert_rows(self, cur, rows: list[tuple]) -> list[bool]:
        # One statement for the batch: a round trip per row would dominate a batched commit.
        # ON CONFLICT DO NOTHING skips ids already stored and repeats within the batch.
        values = ",".join(["(%s,%s,%s,%s,%s,%s,%s,%s,%s)"] * len(rows))
        cur.execute(self._insert_patch.split(" VALUES ")[0] + f" VALUES {values} ON CONFLICT DO NOTHING"
                    " RETURNING message_id", [v for row in rows for v in row])
        new = {bytes(r[0]) for r in cur.fetchall()}
        out = []
        for row in rows:
            mid = bytes(row[0])
            out.append(mid in new)
            new.discard(mid)          # a repeat within the batch is a duplicate
        return out

    def _connect(self) -> None:
        self._db = self._psycopg.connect(self._url, autocommit=True, connect_timeout=10)
        if self._schema_name:
            self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {self._schema_name}")
            self._db.execute(f"SET search_path TO {self._schema_name}")

    @contextmanager
    def _tx(self, write: bool = False):
        with self._lock:
            if self._db.closed or self._db.broken:
                self._connect()       # the server restarted: the caller retries the transaction
            with self._db.transaction(), self._db.cursor() as cur:
                yield cur

    def close(self) -> None:
        self._db.close()


def open_store(target: str | Path, *, schema: str | None = None) -> PatchStore:
    """``postgresql://...`` -> PostgreSQL; anything else is a SQLite file path."""
    t = str(target)
    if t.startswith(("postgresql://", "postgres://")):
        return PostgresPatchStore(t, schema=schema)
    return SqlitePatchStore(t)
