"""The edge agent: the store, the state and the bundle's model behind one object.

``Agent`` is what the CLI, the HTTP endpoint and the MQTT loop call: ``ingest`` events,
``rank`` candidates with the personalised model (inference graph + this device's φ), run one
local training ``train_round`` (via ``edge_agent.trainer``), report ``status``.

Where φ comes from, in order: the saved state, if it was trained against the bundle in use;
else the bundle's auxiliary encoder (``encoder.onnx``: profile, hist, previous φ -> φ), run on
the device so the profile and history never leave it; else zeros (the un-patched model).

Everything bundle-specific sits behind ``Model`` so the store / state / HTTP paths are usable
(and testable) before a bundle exists.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from dccl.errors import DcclError
from edge_agent.config import AgentConfig
from edge_agent.state import DeviceState, StateError, StateStore
from edge_agent.store import IngestResult, Store

log = logging.getLogger("dccl.edge.agent")

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BundleInfo:
    """The parts of ``manifest.json`` the agent needs (the trainer checks the rest)."""
    version: str
    n_items: int
    max_len: int
    profile_vocab: tuple[int, ...]
    trainable: dict[str, tuple[int, ...]]     # name -> shape (all float32)

    @classmethod
    def read(cls, bundle_dir: Path) -> "BundleInfo":
        path = Path(bundle_dir) / MANIFEST
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DcclError(f"bundle {bundle_dir}: no {MANIFEST} (has a bundle been installed?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DcclError(f"bundle manifest {path}: unreadable ({exc})") from None
        try:
            version = m.get("version") or m.get("bundle_version")
            schema = m["input_schema"]
            n_items = int(schema["item"]["vocab"]) - 1
            max_len = int(schema["hist"]["shape"][1])
            vocab = tuple(int(v) for v in schema["profile"]["vocab"])
            trainable = {n: tuple(int(d) for d in s["shape"]) for n, s in m["trainable"].items()}
            bad = [n for n, s in m["trainable"].items() if s.get("dtype", "float32") != "float32"]
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise DcclError(f"bundle manifest {path}: missing or malformed field ({type(exc).__name__}: {exc})") from None
        if not isinstance(version, str) or not version:
            raise DcclError(f"bundle manifest {path}: no version")
        if n_items < 1 or max_len < 1 or not trainable or bad:
            raise DcclError(f"bundle manifest {path}: n_items={n_items}, max_len={max_len}, "
                            f"trainable={sorted(trainable)} (non-float32: {bad}) is not a usable schema")
        return cls(str(version), n_items, max_len, vocab, trainable)


class Model(Protocol):
    """The bundle-dependent operations (``BundleModel`` implements them with ``edge_agent.trainer``)."""

    info: BundleInfo

    def score(self, phi: dict[str, np.ndarray], item: np.ndarray, hist: np.ndarray,
              profile: np.ndarray) -> np.ndarray: ...

    def initial_phi(self, profile: np.ndarray, hist: np.ndarray,
                    phi_prev: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], str]: ...

    def train(self, phi: dict[str, np.ndarray], opt: dict[str, np.ndarray], arrays: Any,
              cfg: AgentConfig, seed: int) -> "RoundResult": ...


@dataclass
class RoundResult:
    phi: dict[str, np.ndarray]
    opt: dict[str, np.ndarray]
    loss: float | None          # validation loss of the returned φ (train loss without a val slice)
    steps: int
    kept_previous: bool         # the new φ evaluated worse; the returned φ is the old one
    backend: str
    detail: dict[str, Any]


class Agent:
    """Thread-safe for the HTTP server: state reads are cheap, training holds a lock."""

    def __init__(self, config: AgentConfig, model: Model | None = None):
        self.config = config
        self.store = Store(config.store_path, max_rows=config.retention.max_rows,
                           max_age_days=config.retention.max_age_days)
        self.states = StateStore(config.state_dir)
        self._model = model
        self._lock = threading.RLock()
        self._state: DeviceState | None = None
        self._state_stamp: tuple[int, int] | None = None

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ pieces

    @property
    def model(self) -> Model:
        with self._lock:
            if self._model is None:
                self._model = BundleModel(self.config)
            return self._model

    def state(self) -> DeviceState:
        """The saved state, re-read when another process (``dccl edge train``) replaced it."""
        with self._lock:
            try:
                st = self.states.path.stat()
                stamp = (st.st_mtime_ns, st.st_ino)
            except FileNotFoundError:
                stamp = None
            if self._state is None or stamp != self._state_stamp:
                self._state = self.states.load()
                self._state_stamp = stamp
            return self._state

    def _save(self, state: DeviceState) -> None:
        self.states.save(state)
        self._state = state
        st = self.states.path.stat()
        self._state_stamp = (st.st_mtime_ns, st.st_ino)

    def _max_len(self, info: BundleInfo) -> int:
        L = self.config.max_len
        if L is not None and L != info.max_len:
            raise DcclError(f"max_len = {L} in the config, but bundle {info.version} was exported with "
                            f"max_len {info.max_len}; remove max_len or set it to {info.max_len}")
        return info.max_len

    def _profile(self, info: BundleInfo) -> np.ndarray:
        """[P] profile for the model; values outside a column's vocabulary become 0 (unknown)."""
        p = self.store.profile_array(len(info.profile_vocab))
        return np.where(p < np.array(info.profile_vocab, dtype=np.int64), p, 0) if len(p) else p

    def current_phi(self, persist: bool = True) -> tuple[dict[str, np.ndarray], str]:
        """φ for the bundle in use and where it came from; computed from the encoder if needed."""
        with self._lock:
            model, state = self.model, self.state()
            info = model.info
            shapes = {k: tuple(v.shape) for k, v in state.phi.items()}
            if state.bundle_version == info.version and shapes == info.trainable:
                return state.phi, state.phi_source or "state"
            prev = state.phi if shapes == info.trainable else None
            phi, source = model.initial_phi(self._profile(info)[None, :],
                                            self.store.history(self._max_len(info), info.n_items)[None, :], prev)
            _check_phi(phi, info)
            if persist:
                # A new bundle: start from the encoder's φ, fresh optimiser state, keep the counters.
                state.counters = {**state.counters, "bundle_changes": state.counters.get("bundle_changes", 0) + 1,
                                  "previous_bundle": state.bundle_version}
                state.bundle_version, state.phi, state.opt, state.phi_source = info.version, phi, {}, source
                self._save(state)
            return phi, source

    # ------------------------------------------------------------------ operations

    def ingest(self, events: Iterable[Any]) -> IngestResult:
        return self.store.ingest(events)

    def set_profile(self, profile: list[int]) -> list[int]:
        try:
            vocab = self.model.info.profile_vocab
        except DcclError:
            vocab = None                      # no bundle yet: store it, checked when one arrives
        if vocab is not None:
            if len(profile) > len(vocab):
                raise DcclError(f"profile has {len(profile)} features; the bundle has {len(vocab)}")
            for j, (v, n) in enumerate(zip(profile, vocab)):
                if isinstance(v, int) and not 0 <= v < n:
                    raise DcclError(f"profile[{j}] = {v}: outside the bundle's vocabulary 0..{n - 1}")
        return self.store.set_profile(profile)

    def rank(self, candidates: list[int], k: int | None = None) -> dict[str, Any]:
        """Candidates best first with their scores (logits of the personalised model)."""
        model = self.model
        info = model.info
        cand = np.asarray(candidates, dtype=np.int64)
        if cand.ndim != 1 or len(cand) == 0:
            raise DcclError("rank: need a non-empty list of candidate item ids")
        bad = cand[(cand < 1) | (cand > info.n_items)]
        if len(bad):
            raise DcclError(f"rank: item {int(bad[0])} is outside the catalogue 1..{info.n_items} "
                            f"of bundle {info.version}")
        phi, source = self.current_phi()
        L = self._max_len(info)
        B = len(cand)
        hist = np.broadcast_to(self.store.history(L, info.n_items), (B, L)).copy()         # (B, L)
        prof = np.broadcast_to(self._profile(info), (B, len(info.profile_vocab))).copy()  # (B, P)
        scores = np.asarray(model.score(phi, cand, hist, prof), dtype=np.float64).reshape(-1)
        if scores.shape != (B,) or not np.isfinite(scores).all():
            raise DcclError(f"rank: the model returned invalid scores (shape {scores.shape}, "
                            f"finite: {bool(np.isfinite(scores).all())})")
        order = np.argsort(-scores, kind="stable")[: k or B]
        return {"items": cand[order].tolist(), "scores": scores[order].tolist(),
                "bundle_version": info.version, "phi_source": source}

    def train_round(self) -> dict[str, Any]:
        """One local training round; the state is saved only when the round completed."""
        t = self.config.train
        with self._lock:
            model = self.model
            info = model.info
            phi, _ = self.current_phi()
            state = self.state()
            arrays = self.store.training_arrays(
                neg=t.neg, max_len=self._max_len(info), val_frac=t.val_frac, seed=t.seed + state.rounds,
                n_items=info.n_items, n_profile=len(info.profile_vocab),
                impression_negatives=t.impression_negatives)
            if len(arrays.train.profile):
                vocab = np.array(info.profile_vocab, dtype=np.int64)
                for s in (arrays.train, arrays.val):
                    s.profile = np.where(s.profile < vocab, s.profile, 0)
            t0 = time.monotonic()
            res = model.train(phi, state.opt, arrays, self.config, seed=t.seed + state.rounds)
            _check_phi(res.phi, info)
            state.phi, state.opt = res.phi, res.opt
            state.rounds += 1
            state.last_train_time = time.time()
            state.last_train_loss = res.loss
            state.last_train_samples = len(arrays.train)
            state.phi_source = "previous" if res.kept_previous and state.rounds > 1 else (
                state.phi_source if res.kept_previous else "trained")
            state.counters = {**state.counters, "rounds_kept_previous":
                              state.counters.get("rounds_kept_previous", 0) + int(res.kept_previous)}
            self._save(state)
            return {"round": state.rounds, "bundle_version": info.version, "backend": res.backend,
                    "steps": res.steps, "loss": res.loss, "kept_previous": res.kept_previous,
                    "train_samples": len(arrays.train), "val_samples": len(arrays.val),
                    "positives": arrays.n_positives, "dropped_unknown_items": arrays.dropped_unknown,
                    "seconds": round(time.monotonic() - t0, 3), **res.detail}

    def health(self) -> dict[str, Any]:
        try:
            version: str | None = self.model.info.version
            bundle_error = None
        except DcclError as exc:
            version, bundle_error = None, str(exc)
        try:
            st = self.state()
            state_error = None
        except StateError as exc:
            st, state_error = None, str(exc)
        ok = bundle_error is None and state_error is None
        return {"status": "ok" if ok else "degraded", "device_id": self.config.device_id,
                "bundle_version": version, "bundle_error": bundle_error, "state_error": state_error,
                "phi_bundle_version": st.bundle_version if st else None,
                "events": self.store.counts()["total"]}

    def state_summary(self) -> dict[str, Any]:
        return {"device_id": self.config.device_id, "state": self.state().summary(),
                "store": self.store.counts(), "profile": self.store.profile()}

    def status(self) -> dict[str, Any]:
        out = self.health()
        out["store"] = self.store.counts()
        out["profile"] = self.store.profile()
        out["state"] = self.state().summary() if out["state_error"] is None else None
        out["config"] = self.config.redacted()
        return out


def _check_phi(phi: dict[str, np.ndarray], info: BundleInfo) -> None:
    shapes = {k: tuple(np.shape(v)) for k, v in phi.items()}
    if shapes != info.trainable:
        raise DcclError(f"φ shapes {shapes} do not match bundle {info.version}'s trainable {info.trainable}")
    for k, v in phi.items():
        if not np.isfinite(v).all():
            raise DcclError(f"φ {k!r} contains NaN or inf; the previous state is kept")


class BundleModel:
    """``Model`` backed by the bundle on disk and ``edge_agent.trainer`` (imported when first needed)."""

    def __init__(self, config: AgentConfig):
        self.config = config
        self.info = BundleInfo.read(config.bundle_dir)
        self._trainer = None
        self._encoder = None

    def _get_trainer(self) -> Any:
        if self._trainer is None:
            try:
                from edge_agent.trainer import Trainer
            except ImportError as exc:
                raise DcclError(f"edge_agent.trainer is not available ({exc})") from None
            self._trainer = Trainer(self.config.bundle_dir, backend=self.config.train.backend)
        return self._trainer

    def score(self, phi, item, hist, profile):
        return self._get_trainer().score(phi, item, hist, profile)

    def initial_phi(self, profile, hist, phi_prev):
        enc = Path(self.config.bundle_dir) / "encoder.onnx"
        if not enc.exists():
            return {k: np.zeros(s, np.float32) for k, s in self.info.trainable.items()}, "zeros"
        if self._encoder is None:
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self._encoder = ort.InferenceSession(str(enc), so, providers=["CPUExecutionProvider"])
        ((name, shape),) = self.info.trainable.items()   # the encoder makes one φ vector
        m = int(np.prod(shape))
        prev = np.zeros((1, m), np.float32) if phi_prev is None else phi_prev[name].reshape(1, m)
        out = self._encoder.run(None, {"profile": profile.astype(np.int64), "hist": hist.astype(np.int64),
                                       "phi_prev": prev.astype(np.float32)})[0]
        return {name: np.asarray(out, np.float32).reshape(shape)}, "encoder"

    def train(self, phi, opt, arrays, cfg, seed):
        raise DcclError("training through edge_agent.trainer is not wired yet")
