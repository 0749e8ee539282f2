"""Durable outbox: a patch is in SQLite before it is published, and leaves only on PUBACK.

One table, ordered by an autoincrement sequence. The message id (the envelope's 16-byte
id) is UNIQUE, so enqueuing the same patch twice stores it once. WAL journal with
``synchronous=FULL``: a row that ``put`` returned survives a power cut.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dccl import sqlite_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id BLOB NOT NULL UNIQUE,
    topic      TEXT NOT NULL,
    payload    BLOB NOT NULL,
    qos        INTEGER NOT NULL DEFAULT 1,
    created    REAL NOT NULL
)
"""


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    message_id: bytes
    topic: str
    payload: bytes
    qos: int


class Outbox:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite_wal.connect(self.path)
        self._db.execute(_SCHEMA)

    def put(self, message_id: bytes, topic: str, payload: bytes, qos: int = 1) -> int | None:
        """Store a message; returns its sequence number, or None if the id is already stored."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO outbox (message_id, topic, payload, qos, created) VALUES (?,?,?,?,?)",
                (bytes(message_id), topic, bytes(payload), qos, time.time()),
            )
            return cur.lastrowid if cur.rowcount == 1 else None

    def pending(self, limit: int = 1000) -> list[OutboxRow]:
        """Oldest first: the order patches were made in is the order they are published."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, message_id, topic, payload, qos FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxRow(r[0], bytes(r[1]), r[2], bytes(r[3]), r[4]) for r in rows]

    def delete(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
