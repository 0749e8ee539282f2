"""Bundle transfer over MQTT, the sender's half: a bundle directory -> retained messages.

A bundle is a directory of files with a ``manifest.json`` that lists the sha256 of every
other file. The announcement carries the sha256 of manifest.json itself, so a device
checks: announced sha256 -> manifest.json -> every file. Each file is cut into
``chunk_size`` pieces published retained at ``Topics.model_chunk(version, f, c)``; a
device fetches only the chunks it lacks by subscribing to exactly those topics (retained
messages are delivered on subscribe), which makes a transfer resumable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dccl.protocol.payloads import dump_announcement
from dccl.protocol.topics import Topics

MANIFEST = "manifest.json"


def manifest_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """``{path: sha256}`` from a manifest's ``files`` (a dict by path or a list of entries)."""
    files = manifest.get("files")
    if isinstance(files, dict):
        return {str(p): str(e["sha256"] if isinstance(e, dict) else e) for p, e in files.items()}
    if isinstance(files, list):
        return {str(e["path"]): str(e["sha256"]) for e in files}
    raise ValueError("manifest has no 'files' list or mapping")


def bundle_messages(bundle_dir: str | Path, version: str, topics: Topics, chunk_size: int = 64 * 1024
                    ) -> tuple[tuple[str, bytes], list[tuple[str, bytes]]]:
    """``((announce_topic, payload), [(chunk_topic, bytes), ...])``, all to publish retained, QoS 1."""
    root = Path(bundle_dir)
    manifest_bytes = (root / MANIFEST).read_bytes()
    listed = manifest_hashes(json.loads(manifest_bytes))
    paths = [MANIFEST] + sorted(listed)
    files, chunks = [], []
    for f, rel in enumerate(paths):
        data = (root / rel).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if rel != MANIFEST and digest != listed[rel]:
            raise ValueError(f"{rel}: sha256 {digest} does not match the manifest")
        n = max(1, -(-len(data) // chunk_size))
        files.append({"path": rel, "size": len(data), "sha256": digest, "chunks": n})
        chunks += [(topics.model_chunk(version, f, c), data[c * chunk_size:(c + 1) * chunk_size]) for c in range(n)]
    announce = dump_announcement(version, hashlib.sha256(manifest_bytes).hexdigest(), files, chunk_size)
    return (topics.model_announce(), announce), chunks
