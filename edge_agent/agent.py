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
from dccl.protocol import manifest as mf
from edge_agent.config import AgentConfig
from edge_agent.state import DeviceState, StateError, StateStore
from edge_agent.store import IngestResult, Store

log = logging.getLogger("dccl.edge.agent")

MANIFEST = "manifest.json"


def resolve_bundle_dir(bundle_dir: Path) -> Path:
    """The bundle in use: ``bundle_dir`` itself when it holds a manifest, else the current bundle
    of a model-update root (``state.json`` {"current": version} + ``bundles/<version>/``, as
    ``edge_agent.model_update`` keeps it)."""
    bundle_dir = Path(bundle_dir)
    if (bundle_dir / MANIFEST).exists():
        return bundle_dir
    root_state = bundle_dir / "state.json"
    if root_state.exists():
        try:
            current = json.loads(root_state.read_text(encoding="utf-8")).get("current")
        except (OSError, ValueError, AttributeError) as exc:
            raise DcclError(f"bundle root {root_state}: unreadable ({exc})") from None
        if not current:
            raise DcclError(f"bundle root {bundle_dir}: no current bundle yet (none received)")
        return bundle_dir / "bundles" / str(current)
    raise DcclError(f"bundle {bundle_dir}: no {MANIFEST} (has a bundle been installed?)")


@dataclass(frozen=True)
class BundleInfo:
    """What the agent needs to know of a bundle (``edge_agent.trainer.Bundle`` verifies the rest)."""
    version: str
    n_items: int
    max_len: int
    profile_vocab: tuple[int, ...]
    trainable: dict[str, tuple[int, ...]]     # name -> shape (all float32)
    require_val: bool = False                 # manifest optimizer.require_val: no val slice -> no training
    steps: int | None = None                  # manifest optimizer.steps: the step budget the cloud chose
    # manifest optimizer.steps_by_positives: that budget by the device's count of training positives
    steps_by_positives: tuple[tuple[int, int], ...] | None = None
    neg: int | None = None                    # manifest local_data.neg (None: an older bundle without it)
    val_frac: float | None = None             # manifest local_data.val_frac
    since: float | None = None                # manifest local_data.since: where the fresh window starts


# Samples for bundles that do not say how the cloud built them (older manifests): the cloud's defaults.
DEFAULT_NEG, DEFAULT_VAL_FRAC = 4, 0.3


def local_samples(t, info: BundleInfo) -> tuple[int, float]:
    """(negatives per positive, validation fraction) for the device's samples: the board's
    ``train.neg`` / ``train.val_frac`` when set, else how the cloud built them for this bundle."""
    neg = t.neg if t.neg is not None else info.neg if info.neg is not None else DEFAULT_NEG
    frac = t.val_frac if t.val_frac is not None else info.val_frac if info.val_frac is not None else DEFAULT_VAL_FRAC
    return int(neg), float(frac)


def _by_positives(optimizer: dict) -> tuple[tuple[int, int], ...] | None:
    """The manifest's optimizer.steps_by_positives (validated with the manifest), or None."""
    table = optimizer.get("steps_by_positives")
    return None if table is None else tuple((int(lo), int(steps)) for lo, steps in table)


def sample_window(t, info: BundleInfo) -> float | None:
    """Where the device's samples start (unix seconds; None = every positive): the bundle's
    ``local_data.since`` unless the board's ``train.window`` is "all"."""
    return info.since if t.window == "bundle" else None


def round_steps(t, info: BundleInfo, n_positives: int) -> int:
    """A round's step cap: the board's ``train.max_steps``, and — with ``train.follow_bundle_steps`` —
    at most the budget the cloud chose for the bundle on validation: ``optimizer.steps``, or, where the
    manifest has ``optimizer.steps_by_positives``, the budget for this round's ``n_positives`` training
    positives (`dccl.protocol.manifest.step_budget`, the cloud's own rule)."""
    if t.follow_bundle_steps and info.steps is not None:
        return min(int(t.max_steps), mf.step_budget(info.steps, info.steps_by_positives, n_positives))
    return int(t.max_steps)


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
        self._owns_model = model is None
        self._model_stamp: tuple | None = None
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
        """The bundle's model; reloaded when a new bundle was installed (manifest.json replaced)."""
        with self._lock:
            if self._model is not None and not self._owns_model:
                return self._model
            bundle_dir = resolve_bundle_dir(self.config.bundle_dir)
            try:
                st = (bundle_dir / MANIFEST).stat()
                stamp = (str(bundle_dir), st.st_mtime_ns, st.st_ino, st.st_size)
            except FileNotFoundError:
                stamp = None
            if self._model is None or stamp != self._model_stamp:
                self._model = None
                self._model = BundleModel(self.config, bundle_dir)
                self._model_stamp = stamp
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
            neg, val_frac = local_samples(t, info)
            arrays = self.store.training_arrays(
                neg=neg, max_len=self._max_len(info), val_frac=val_frac, seed=t.seed + state.rounds,
                n_items=info.n_items, n_profile=len(info.profile_vocab),
                impression_negatives=t.impression_negatives, since=sample_window(t, info))
            if len(arrays.train.profile):
                vocab = np.array(info.profile_vocab, dtype=np.int64)
                for s in (arrays.train, arrays.val):
                    s.profile = np.where(s.profile < vocab, s.profile, 0)
            if info.require_val and not len(arrays.val):
                # The bundle's rule (as in the cloud's reference): without a validation slice there is
                # no evidence a trained φ beats the current one, so nothing is trained or saved.
                return {"round": state.rounds, "bundle_version": info.version, "steps": 0,
                        "skipped": f"no validation slice ({arrays.n_positives} positives; val_frac "
                                   f"{val_frac:g} holds none out): the current φ is kept",
                        "train_samples": len(arrays.train), "val_samples": 0, "positives": arrays.n_positives}
            t0 = time.monotonic()
            res = model.train(phi, state.opt, arrays, self.config, seed=t.seed + state.rounds)
            _check_phi(res.phi, info)
            state.phi, state.opt = res.phi, res.opt
            state.rounds += 1
            state.last_train_time = time.time()
            state.last_train_loss = res.loss
            state.last_train_samples = len(arrays.train)
            # A bundle whose step budget is 0 (the cloud found no device step helps on it) still
            # completes the round with the current φ: the cloud gets this device's model, as from the pools.
            if not res.kept_previous and res.steps > 0:
                state.phi_source = "trained"
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
    """``Model`` backed by a verified bundle on disk and ``edge_agent.trainer``.

    The bundle is verified (manifest schema + sha256 of every file) once, when the agent first
    needs it; a corrupted or truncated bundle is a DcclError naming the file, and the saved
    state is left as it is.
    """

    def __init__(self, config: AgentConfig, bundle_dir: Path | None = None):
        from edge_agent import trainer as T     # imports onnxruntime: only when a bundle is used

        self.config = config
        self._T = T
        bundle_dir = resolve_bundle_dir(config.bundle_dir) if bundle_dir is None else bundle_dir
        if not (bundle_dir / MANIFEST).exists():
            raise DcclError(f"bundle {bundle_dir}: no {MANIFEST}")
        self.bundle = T.Bundle(bundle_dir, verify=True)
        b = self.bundle
        local = b.manifest.get("local_data") or {}
        self.info = BundleInfo(b.version, int(b.n_items), int(b.max_len), tuple(int(v) for v in b.profile_vocab),
                               {b.phi_name: tuple(int(d) for d in b.phi_shape)},
                               bool(b.manifest["optimizer"].get("require_val", False)),
                               int(b.manifest["optimizer"]["steps"]),
                               steps_by_positives=_by_positives(b.manifest["optimizer"]), neg=local.get("neg"),
                               val_frac=local.get("val_frac"), since=local.get("since"))
        self._scorer = None
        self._encoder = None
        self._trainer = None

    def score(self, phi, item, hist, profile):
        if self._scorer is None:
            self._scorer = self._T.Scorer(self.bundle, threads=1)
        return self._scorer.score(phi[self.bundle.phi_name], item, hist, profile)

    def initial_phi(self, profile, hist, phi_prev):
        name, shape = self.bundle.phi_name, self.bundle.phi_shape
        if not self.bundle.manifest["models"].get("encoder"):
            return {name: np.zeros(shape, np.float32)}, "zeros"
        if self._encoder is None:
            self._encoder = self._T.Encoder(self.bundle, threads=1)
        prev = None if phi_prev is None else phi_prev[name]
        phi = self._encoder.start_phi(profile.reshape(-1), hist.reshape(-1), prev)
        return {name: np.asarray(phi, np.float32).reshape(shape)}, self._encoder.source(prev)

    def train(self, phi, opt, arrays, cfg, seed):
        t = cfg.train
        if self._trainer is None:
            self._trainer = self._T.Trainer(self.bundle, backend=t.backend, threads=1)
        name = self.bundle.phi_name

        def as_dict(s):
            return {"item": s.item, "hist": s.hist, "profile": s.profile, "label": s.label}

        val = as_dict(arrays.val) if len(arrays.val) else None
        steps = round_steps(t, self.info, int((arrays.train.label > 0).sum()))
        if t.rule == "bundle":   # the cloud's reference rule: full batch, the last φ or the previous one
            r = self._trainer.train(phi[name], as_dict(arrays.train), steps=steps,
                                    seconds=t.max_seconds, val=val, seed=seed, select="final")
        else:
            r = self._trainer.train(phi[name], as_dict(arrays.train), steps=steps,
                                    epochs=t.max_epochs, seconds=t.max_seconds, batch_size=t.batch_size, val=val,
                                    patience=t.patience, seed=seed)
        loss = r.val_loss_after if val is not None else (r.losses[-1] if r.losses else None)
        # The trainer starts AdamW moments fresh each round (as the PyTorch reference does):
        # there is no optimiser state to carry over, so none is saved.
        return RoundResult(
            phi={name: np.asarray(r.phi, np.float32).reshape(self.bundle.phi_shape)}, opt={},
            loss=None if loss is None else float(loss), steps=r.steps, kept_previous=r.kept_previous,
            backend=r.backend,
            detail={"stopped": r.stopped, "best_step": r.best_step, "val_loss_before": r.val_loss_before,
                    "first_train_loss": r.losses[0] if r.losses else None,
                    "last_train_loss": r.losses[-1] if r.losses else None})
