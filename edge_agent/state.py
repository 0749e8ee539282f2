"""Device state on disk: bundle version in use, φ, optimiser state, counters — crash-safe.

One file, ``state.npz`` (numpy's zip of ``.npy`` arrays, read with ``allow_pickle=False``):

- ``phi:<name>``   float32 arrays, the trainable metapatch parameters by manifest name
- ``opt:<name>``   optimiser state arrays (e.g. AdamW moments, step), as the trainer gives them
- ``__meta__``     uint8 bytes of a JSON object: format, generation, bundle_version, counters

A save writes ``state.npz.<pid>.tmp``, fsyncs it, renames it over ``state.npz`` and fsyncs the
folder, so after ``kill -9`` or a power cut at any instant the file is either the old
state or the new one. The state being replaced is first copied the same way to
``state.prev.npz``: a last good state to fall back to by hand, never deleted by us.
A φ with NaN / inf is refused on save and reported on load, naming the parameter; an
invalid current file is copied to ``state.invalid-<time>.npz`` before a save replaces it.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dccl.atomic import atomic_write
from dccl.errors import DcclError

FORMAT = 1
STATE_FILE = "state.npz"
PREV_FILE = "state.prev.npz"


class StateError(DcclError):
    """The state file is unreadable or invalid; the message names the file and the part."""


@dataclass
class DeviceState:
    bundle_version: str | None = None
    phi: dict[str, np.ndarray] = field(default_factory=dict)        # name -> float32 array
    opt: dict[str, np.ndarray] = field(default_factory=dict)        # optimiser state
    rounds: int = 0                       # local training rounds completed
    last_train_time: float | None = None  # unix time of the end of the last round
    last_train_loss: float | None = None  # validation loss of the kept φ (or train loss without val)
    last_train_samples: int = 0
    phi_source: str | None = None         # "encoder", "start policy: zero", "trained", ... (how φ was obtained)
    counters: dict[str, Any] = field(default_factory=dict)   # free-form JSON counters
    generation: int = 0                   # incremented by every save
    saved_at: float | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-able description without the φ values (for status / GET /state)."""
        return {
            "bundle_version": self.bundle_version, "generation": self.generation,
            "rounds": self.rounds, "last_train_time": self.last_train_time,
            "last_train_loss": self.last_train_loss, "last_train_samples": self.last_train_samples,
            "phi_source": self.phi_source, "saved_at": self.saved_at, "counters": self.counters,
            "phi": {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                        "l2": float(np.linalg.norm(v.astype(np.float64)))} for k, v in self.phi.items()},
            "opt": sorted(self.opt),
        }


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("__"):
        raise StateError(f"{kind} name {name!r}: must be a non-empty string without '/' or leading '__'")


def encode_state(state: DeviceState) -> bytes:
    """The npz bytes of a state; raises StateError on non-finite φ or bad names."""
    arrays: dict[str, np.ndarray] = {}
    for name, v in state.phi.items():
        _check_name("phi", name)
        a = np.asarray(v)
        if a.dtype != np.float32:
            raise StateError(f"phi {name!r}: dtype {a.dtype}, expected float32")
        if not np.isfinite(a).all():
            raise StateError(f"phi {name!r}: contains NaN or inf; refusing to save it")
        arrays[f"phi:{name}"] = a
    for name, v in state.opt.items():
        _check_name("opt", name)
        a = np.asarray(v)
        if a.dtype == object:
            raise StateError(f"opt {name!r}: object arrays are not allowed")
        arrays[f"opt:{name}"] = a
    meta = {
        "format": FORMAT, "generation": state.generation, "bundle_version": state.bundle_version,
        "rounds": state.rounds, "last_train_time": state.last_train_time,
        "last_train_loss": state.last_train_loss, "last_train_samples": state.last_train_samples,
        "phi_source": state.phi_source, "counters": state.counters, "saved_at": state.saved_at,
    }
    try:
        meta_bytes = json.dumps(meta, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise StateError(f"state counters are not JSON-able: {exc}") from None
    arrays["__meta__"] = np.frombuffer(meta_bytes, dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode_state(data: bytes, source: str = "state") -> DeviceState:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise StateError(f"{source}: unreadable ({type(exc).__name__}: {exc})") from None
    if "__meta__" not in arrays:
        raise StateError(f"{source}: no __meta__ entry")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"{source}: __meta__ is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateError(f"{source}: unknown state format {meta.get('format') if isinstance(meta, dict) else meta!r}"
                         f" (this agent reads format {FORMAT})")
    phi, opt = {}, {}
    for k, a in arrays.items():
        kind, _, name = k.partition(":")
        if kind == "phi":
            if a.dtype != np.float32:
                raise StateError(f"{source}: phi {name!r} has dtype {a.dtype}, expected float32")
            if not np.isfinite(a).all():
                raise StateError(f"{source}: phi {name!r} contains NaN or inf")
            phi[name] = a
        elif kind == "opt":
            opt[name] = a
        else:
            raise StateError(f"{source}: unexpected entry {k!r}")
    try:
        return DeviceState(
            bundle_version=meta.get("bundle_version"), phi=phi, opt=opt,
            rounds=int(meta.get("rounds", 0)), last_train_time=meta.get("last_train_time"),
            last_train_loss=meta.get("last_train_loss"),
            last_train_samples=int(meta.get("last_train_samples", 0)),
            phi_source=meta.get("phi_source"), counters=dict(meta.get("counters") or {}),
            generation=int(meta.get("generation", 0)), saved_at=meta.get("saved_at"),
        )
    except (TypeError, ValueError) as exc:
        raise StateError(f"{source}: bad __meta__ field ({exc})") from None


class StateStore:
    """``load()`` / ``save(state)`` of one device's state in ``state_dir``."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.prev_path = self.dir / PREV_FILE

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> DeviceState:
        """The saved state, or a fresh one if none was ever saved. Raises StateError if invalid."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return DeviceState()
        except OSError as exc:
            raise StateError(f"state {self.path}: cannot read ({exc.strerror or exc})") from None
        try:
            return decode_state(data, f"state {self.path}")
        except StateError as exc:
            hint = (f"; the previous state is kept in {self.prev_path}" if self.prev_path.exists() else "")
            raise StateError(f"{exc}{hint}") from None

    def _remove_stale_tmp(self) -> None:
        """Temp files of writers that died mid-write (kill -9); never the live ones of a running writer."""
        for f in self.dir.glob("state*.npz.*.tmp"):
            try:
                pid = int(f.name.split(".")[-2])
                if pid != os.getpid():
                    os.kill(pid, 0)
                    continue        # that process is alive and may be writing it
            except ProcessLookupError:
                pass
            except (ValueError, PermissionError):
                continue
            f.unlink(missing_ok=True)

    def save(self, state: DeviceState) -> DeviceState:
        """Atomically replace the state on disk; returns it with generation / saved_at updated.

        Encoding (and its checks) happens before anything on disk is touched, so a refused
        state leaves the old one intact.
        """
        new = DeviceState(**{**state.__dict__, "generation": state.generation + 1, "saved_at": time.time()})
        data = encode_state(new)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()
        try:
            old = self.path.read_bytes()
        except FileNotFoundError:
            old = None
        if old is not None:
            try:
                decode_state(old)
            except StateError:
                # Never let a bad current state overwrite the last good one; keep it for inspection.
                atomic_write(self.dir / f"state.invalid-{int(time.time())}.npz", old, tag=str(os.getpid()))
                old = None
        if old is not None:
            atomic_write(self.prev_path, old, tag=str(os.getpid()))
        atomic_write(self.path, data, tag=str(os.getpid()))
        state.generation, state.saved_at = new.generation, new.saved_at
        return state
