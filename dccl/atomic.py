"""Writes that survive power loss: temp file in the same folder, fsync, rename, fsync the folder.

One implementation for every file the project must never leave torn (device state, bundle state,
manifests, checkpoints, the device registry). Torch-free: the edge uses it too.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, *, mode: int | None = None, tag: str | None = None) -> Path:
    """Replace `path` with `data` atomically; readers see the old or the new file, never a mix.

    The temp file is `<name>.<random>.tmp` beside the target, or `<name>.<tag>.tmp` with a tag (e.g.
    the writer's pid, so a cleaner can tell a live writer's temp file from a dead one's). It is removed
    if the write fails; a process killed mid-write leaves it for its owner to clean up.
    """
    path = Path(path)
    if tag is None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    else:
        tmp = str(path.with_name(f"{path.name}.{tag}.tmp"))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
