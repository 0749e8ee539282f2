"""The one way this project opens an SQLite file: WAL journal, full fsync, autocommit mode.

Used by the device's interaction store and outbox and by the cloud's patch store. Several
processes may share a file (two ingest processes, `edge serve` beside `edge run`): WAL lets readers
go on beside the writer, and the busy timeout waits out another writer instead of failing.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: str | Path) -> sqlite3.Connection:
    path = str(path)
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
