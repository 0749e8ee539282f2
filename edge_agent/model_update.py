"""Model updates over MQTT: fetch a bundle in chunks, verify it, switch atomically, roll back.

Disk layout under ``root``::

    state.json                 {"current": version, "previous": version} (temp + fsync + rename)
    bundles/<version>/         complete, verified bundles (the current and the previous one kept)
    partial/<version>/         announcement.json + received chunks "<file>.<chunk>" (resume point)

Flow: the retained announcement names version, manifest sha256, files and chunk counts.
The updater subscribes to the chunk topics it is missing (retained, so each arrives on
subscribe), stores every chunk as a file, and when all are present assembles the files
into a temp dir, checks each file's sha256 against the announcement, the manifest's
sha256 against the announced one and every file against the manifest, fsyncs, renames
the dir into ``bundles/`` and calls ``check(new_dir, current_dir)``: the hook that loads
and evaluates the bundle on local data. ``True`` switches (state.json rewritten
atomically), ``False`` or an exception keeps the current bundle. A failed file's chunks
are dropped and fetched again. Every outcome is published as a report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dccl.atomic import atomic_write, fsync_dir
from dccl.protocol import payloads
from dccl.protocol.bundle_transfer import MANIFEST, manifest_hashes
from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import QOS_MODEL, QOS_REPORT

log = logging.getLogger("dccl.edge.model")

CheckHook = Callable[[Path, "Path | None"], bool]




class ModelUpdater:
    def __init__(self, root: str | Path, client, check: CheckHook | None = None,
                 on_switch: Callable[[str, Path], None] | None = None):
        self.root = Path(root)
        self.client = client                   # EdgeMqttClient (subscribe, unsubscribe, publish_telemetry)
        self.topics = client.topics
        self.check = check or (lambda new, old: True)
        self.on_switch = on_switch
        for d in ("bundles", "partial"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, Any] | None = None
        self._wanted: set[str] = set()
        self.chunks_received = 0
        self.reports: list[dict[str, Any]] = []

    # ---- state -------------------------------------------------------------------
    def _state(self) -> dict[str, str | None]:
        try:
            return json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            return {"current": None, "previous": None}

    @property
    def current_version(self) -> str | None:
        return self._state()["current"]

    def bundle_path(self, version: str | None = None) -> Path | None:
        v = version or self.current_version
        return None if v is None else self.root / "bundles" / v

    def _report(self, outcome: str, **fields: Any) -> None:
        rep = {"outcome": outcome, "current": self.current_version, **fields}
        self.reports.append(rep)
        log.info("model update: %s", rep)
        self.client.publish_telemetry(self.topics.report(self.client.device_id),
                                      payloads.dump_report("model_update", **rep), qos=QOS_REPORT)

    # ---- MQTT --------------------------------------------------------------------
    def start(self) -> "ModelUpdater":
        self.client.subscribe(self.topics.model_announce(), QOS_MODEL)
        return self

    def handle(self, msg) -> bool:
        """Feed an inbound message (topic, payload); True if it was a model message."""
        if msg.topic == self.topics.model_announce():
            if msg.payload:
                self._on_announce(msg.payload)
            return True
        head = f"{self.topics.prefix}/model/"
        if msg.topic.startswith(head):
            parts = msg.topic[len(head):].split("/")
            if len(parts) == 4 and parts[1] == "chunk" and parts[2].isdigit() and parts[3].isdigit():
                self._on_chunk(parts[0], int(parts[2]), int(parts[3]), msg.payload)
            return True
        return False

    def _partial(self, version: str) -> Path:
        return self.root / "partial" / version

    def _on_announce(self, payload: bytes) -> None:
        try:
            ann = payloads.load_announcement(payload)
        except ProtocolError as exc:
            log.warning("ignoring announcement: %s", exc)
            return
        version = ann["bundle_version"]
        if version == self.current_version or (self.pending and self.pending["bundle_version"] == version):
            return
        if version in self._rejected():
            return
        self._drop_wanted()
        part = self._partial(version)
        part.mkdir(parents=True, exist_ok=True)
        saved = part / "announcement.json"
        if saved.exists() and json.loads(saved.read_bytes()) != ann:
            shutil.rmtree(part)          # same version, different content: start over
            part.mkdir(parents=True)
        atomic_write(saved, json.dumps(ann).encode())
        self.pending = ann
        self._request_missing()

    def _missing(self) -> list[tuple[int, int]]:
        ann, part = self.pending, self._partial(self.pending["bundle_version"])
        return [(f, c) for f, e in enumerate(ann["files"]) for c in range(e["chunks"])
                if not (part / f"{f}.{c}").exists()]

    def _request_missing(self) -> None:
        missing = self._missing()
        if not missing:
            self._assemble()
            return
        v = self.pending["bundle_version"]
        for f, c in missing:
            t = self.topics.model_chunk(v, f, c)
            if t not in self._wanted:
                self._wanted.add(t)
                self.client.subscribe(t, QOS_MODEL)

    def _drop_wanted(self) -> None:
        for t in self._wanted:
            self.client.unsubscribe(t)
        self._wanted.clear()

    def _on_chunk(self, version: str, f: int, c: int, data: bytes) -> None:
        ann = self.pending
        if not ann or version != ann["bundle_version"] or f >= len(ann["files"]):
            return
        entry = ann["files"][f]
        expected = min(ann["chunk_size"], entry["size"] - c * ann["chunk_size"]) if c < entry["chunks"] else -1
        if len(data) != max(expected, 0) or expected < 0:
            log.warning("chunk %d/%d of %s has %d bytes, expected %d", f, c, version, len(data), expected)
            return
        path = self._partial(version) / f"{f}.{c}"
        if not path.exists():
            atomic_write(path, data)
            self.chunks_received += 1
        topic = self.topics.model_chunk(version, f, c)
        if topic in self._wanted:
            self._wanted.discard(topic)
            self.client.unsubscribe(topic)
        if not self._missing():
            self._assemble()

    # ---- verify, switch, roll back -------------------------------------------------
    def _assemble(self) -> None:
        ann = self.pending
        version, part = ann["bundle_version"], self._partial(ann["bundle_version"])
        tmp = Path(tempfile.mkdtemp(dir=self.root / "bundles", prefix=f".tmp-{version}-"))
        bad: list[int] = []
        try:
            for f, e in enumerate(ann["files"]):
                data = b"".join((part / f"{f}.{c}").read_bytes() for c in range(e["chunks"]))
                if hashlib.sha256(data).hexdigest() != e["sha256"]:
                    bad.append(f)
                    continue
                out = tmp / e["path"]
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            if bad:
                raise ValueError(f"sha256 mismatch in {[ann['files'][f]['path'] for f in bad]}")
            manifest_bytes = (tmp / MANIFEST).read_bytes()
            if hashlib.sha256(manifest_bytes).hexdigest() != ann["sha256"]:
                bad = list(range(len(ann["files"])))
                raise ValueError("manifest.json does not match the announced sha256")
            listed = manifest_hashes(json.loads(manifest_bytes))
            on_disk = {e["path"] for e in ann["files"]} - {MANIFEST}
            if set(listed) != on_disk:
                raise ValueError(f"files {sorted(on_disk)} differ from the manifest's {sorted(listed)}")
            for rel, digest in listed.items():
                if hashlib.sha256((tmp / rel).read_bytes()).hexdigest() != digest:
                    raise ValueError(f"{rel} does not match the manifest")
            for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, key=lambda p: -len(p.parts)):
                fsync_dir(d)
            final = self.root / "bundles" / version
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except (OSError, ValueError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            for f in bad:                       # refetch only what was wrong
                for c in range(ann["files"][f]["chunks"]):
                    (part / f"{f}.{c}").unlink(missing_ok=True)
            self._report("verify_failed", version=version, error=str(exc))
            if bad:
                self._request_missing()
            else:
                self.pending = None
            return
        self.pending = None
        self._drop_wanted()
        shutil.rmtree(part, ignore_errors=True)
        self._switch(version)

    def _rejected(self) -> set[str]:
        try:
            return set(json.loads((self.root / "rejected.json").read_text()))
        except (OSError, ValueError):
            return set()

    def _switch(self, version: str) -> None:
        state = self._state()
        old = state["current"]
        new_path, old_path = self.root / "bundles" / version, self.bundle_path(old) if old else None
        try:
            ok = bool(self.check(new_path, old_path))
            error = None if ok else "evaluated worse than the current bundle"
        except Exception as exc:   # the bundle failed to load: stay on the current one
            ok, error = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            atomic_write(self.root / "rejected.json", json.dumps(sorted(self._rejected() | {version})).encode())
            self._report("rolled_back", version=version, error=error)
            return
        atomic_write(self.root / "state.json", json.dumps({"current": version, "previous": old}).encode())
        self._prune(keep={version, old})
        if self.on_switch:
            self.on_switch(version, new_path)
        self._report("switched", version=version, previous=old, ts=time.time())

    def rollback(self) -> bool:
        """Command ``rollback``: back to the previous bundle, if there is one."""
        state = self._state()
        prev = state.get("previous")
        if not prev or not (self.root / "bundles" / prev).exists():
            self._report("rollback_impossible")
            return False
        atomic_write(self.root / "state.json", json.dumps({"current": prev, "previous": None}).encode())
        atomic_write(self.root / "rejected.json", json.dumps(sorted(self._rejected() | {state["current"]})).encode())
        if self.on_switch:
            self.on_switch(prev, self.root / "bundles" / prev)
        self._report("rolled_back", version=state["current"], error="rollback command")
        return True

    def _prune(self, keep: set[str | None]) -> None:
        for d in (self.root / "bundles").iterdir():
            if d.is_dir() and d.name not in keep and not d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
