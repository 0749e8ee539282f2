"""On-device training of φ and personalised scoring, from a verified bundle. Never imports torch.

Two backends, one contract (the bundle's manifest):

- ``ort-training``: the ONNX Runtime training API (``training_model.onnx`` + ``optimizer_model.onnx``
  + ``checkpoint``); needs the x86-only training build.
- ``portable``: one ``train_step.onnx`` graph (forward + backward + AdamW) on plain onnxruntime,
  which has aarch64 wheels.

``auto`` takes ``ort-training`` when the training build is importable, else ``portable``. Both run
one AdamW step per batch and start each ``train`` call with fresh AdamW moments, exactly like
``cloud_trainer.personalize.train_phi`` (the PyTorch reference the parity tests compare with).

Cached bundles (manifest ``train_inputs`` = ``["features", "label"]``, every patch in the prediction
MLP): nothing before the MLP depends on φ, so ``train`` / ``gradient`` run the bundle's trunk
(``trunk.onnx``) once over their samples (and once over the validation slice) and every step runs
the head alone on those features. Raw bundles (e.g. an attention patch) step on item, hist, profile.
Callers pass raw samples either way.

Validation losses come from one graph shared by both backends, so both judge φ the same way: the
head graph on cached features (cached bundles), else the inference graph.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dccl.errors import DcclError
from dccl.protocol import manifest as mf
from edge_agent import ort_compat

BACKENDS = ("auto", "ort-training", "portable")
BATCH_KEYS = ("item", "hist", "profile", "label")
FEATURE_KEYS = ("item", "hist", "profile")  # a sample's raw model inputs
FEATURES = "features"  # the trunk's output (cached bundles)
TRUNK_CHUNK = 4096  # samples per trunk run (bounds the memory of a large local set)

Arrays = Mapping[str, np.ndarray]


class TrainerError(DcclError):
    """Bad local data, a bad φ, or a bundle the chosen backend cannot run."""


@dataclass
class TrainResult:
    phi: np.ndarray                       # (1, m) the φ to use from now on (phi0 when kept_previous)
    losses: list[float]                   # training loss before each step
    steps: int
    val_loss_before: float | None         # local validation loss of phi0 (None: no validation slice)
    val_loss_after: float | None          # ... of the returned φ
    kept_previous: bool                   # the trained φ evaluated worse (or went non-finite): phi0 kept
    stopped: str                          # "steps" | "epochs" | "seconds" | "early_stop" | "non_finite"
    best_step: int                        # the step whose φ was kept by early stopping (0 = phi0)
    backend: str
    seconds: float
    trained_phi: np.ndarray | None = field(default=None, repr=False)  # best trained φ, even if not kept


def _session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT warns about constant folding of CastLike; not actionable here
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def stable_bce(logit: np.ndarray, label: np.ndarray) -> float:
    """The bundle's loss, mean(relu(x) - x*y + log(1 + exp(-|x|))), in float64."""
    x = logit.astype(np.float64)
    y = label.astype(np.float64)
    return float(np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))))


class Bundle:
    """A verified bundle directory: the manifest plus resolved file paths."""

    def __init__(self, bundle_dir: str | Path, *, verify: bool = True):
        self.dir = Path(bundle_dir)
        self.manifest = mf.load(self.dir, verify=verify)
        self.version: str = self.manifest["bundle_version"]
        (self.phi_name, spec), = self._single_trainable().items()
        self.phi_shape = tuple(spec["shape"])
        s = self.manifest["schema"]
        self.n_items, self.max_len = s["n_items"], s["max_len"]
        self.profile_vocab = list(s["profile_vocab"])
        # What the train graphs take: raw inputs, or the trunk's features (validated by mf.load).
        self.train_inputs: tuple[str, ...] = mf.train_inputs(self.manifest)
        self.cached = FEATURES in self.train_inputs
        self.feature_dim: int | None = self.manifest["inputs"][FEATURES]["shape"][1] if self.cached else None

    def _single_trainable(self) -> dict:
        trainable = self.manifest["trainable"]
        if len(trainable) != 1:
            raise TrainerError(f"bundle {self.dir}: {len(trainable)} trainable tensors {sorted(trainable)}; "
                               "this agent trains exactly one metapatch vector")
        return trainable

    def path(self, role: str) -> Path:
        models = self.manifest["models"]
        rel = models["ort_training"][role] if role in mf.ORT_TRAINING_ROLES else models[role]
        if rel is None:
            raise TrainerError(f"bundle {self.dir}: has no {role} model")
        return self.dir / rel

    # -- input validation at the boundary --------------------------------------------------
    def check_phi(self, phi, what: str = "phi") -> np.ndarray:
        arr = np.asarray(phi, dtype=np.float32)
        if arr.size != math.prod(self.phi_shape):
            raise TrainerError(f"{what}: {arr.size} values, the bundle's {self.phi_name} has shape {list(self.phi_shape)}")
        arr = arr.reshape(self.phi_shape)
        if not np.all(np.isfinite(arr)):
            raise TrainerError(f"{what}: contains NaN or inf")
        return np.ascontiguousarray(arr)

    def check_batch(self, batch: Arrays, what: str = "batch", labels: bool = True) -> dict[str, np.ndarray]:
        keys = BATCH_KEYS if labels else FEATURE_KEYS
        missing = [k for k in keys if k not in batch]
        if missing:
            raise TrainerError(f"{what}: missing {missing}")
        item = np.asarray(batch["item"], dtype=np.int64).reshape(-1)
        n = item.shape[0]
        hist = np.asarray(batch["hist"], dtype=np.int64)
        profile = np.asarray(batch["profile"], dtype=np.int64)
        if profile.ndim == 1 and profile.shape[0] == len(self.profile_vocab) and n != profile.shape[0]:
            profile = profile.reshape(1, -1)
        out = {"item": item, "hist": hist, "profile": profile}
        if hist.ndim != 2 or hist.shape != (n, self.max_len):
            raise TrainerError(f"{what}.hist: shape {list(hist.shape)}, expected [{n}, {self.max_len}]")
        if profile.ndim != 2 or profile.shape != (n, len(self.profile_vocab)):
            raise TrainerError(f"{what}.profile: shape {list(profile.shape)}, expected [{n}, {len(self.profile_vocab)}]")
        for name, arr in (("item", item), ("hist", hist)):
            if arr.size and (arr.min() < 0 or arr.max() > self.n_items):
                raise TrainerError(f"{what}.{name}: ids must be in 0..{self.n_items}, got {arr.min()}..{arr.max()}")
        for j, v in enumerate(self.profile_vocab):
            col = profile[:, j]
            if col.size and (col.min() < 0 or col.max() >= v):
                raise TrainerError(f"{what}.profile[:, {j}]: values must be in 0..{v - 1}, got {col.min()}..{col.max()}")
        if labels:
            label = np.asarray(batch["label"], dtype=np.float32).reshape(-1)
            if label.shape[0] != n:
                raise TrainerError(f"{what}.label: {label.shape[0]} labels for {n} samples")
            if not np.all((label >= 0) & (label <= 1)):
                raise TrainerError(f"{what}.label: values must be in [0, 1]")
            out["label"] = label
        return out


def _feed(session: ort.InferenceSession, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the inputs the graph has (an exporter drops an unused zero-width profile input)."""
    return {i.name: values[i.name] for i in session.get_inputs()}


class Scorer:
    """Personalised scores from the inference graph: ``score(phi, item, hist, profile) -> logits``."""

    def __init__(self, bundle: Bundle | str | Path, *, threads: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.session = ort.InferenceSession(str(self.bundle.path("inference")), _session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def score(self, phi, item, hist, profile) -> np.ndarray:
        """(B,) logits. ``hist`` (L,) and ``profile`` (P,) of one user broadcast over the items."""
        item = np.asarray(item, dtype=np.int64).reshape(-1)
        n = item.shape[0]
        hist = np.asarray(hist, dtype=np.int64)
        profile = np.asarray(profile, dtype=np.int64)
        if hist.ndim == 1:
            hist = np.broadcast_to(hist, (n, hist.shape[0]))
        if profile.ndim == 1:
            profile = np.broadcast_to(profile, (n, profile.shape[0]))
        b = self.bundle.check_batch({"item": item, "hist": hist, "profile": profile}, "score", labels=False)
        if n == 0:
            return np.zeros(0, np.float32)
        b["phi"] = self.bundle.check_phi(phi)
        return self.session.run(["logit"], _feed(self.session, b))[0]

    def rank(self, phi, candidates, hist, profile) -> np.ndarray:
        """Candidate item ids, best first."""
        candidates = np.asarray(candidates, dtype=np.int64).reshape(-1)
        return candidates[np.argsort(-self.score(phi, candidates, hist, profile), kind="stable")]

    def loss(self, phi, data: Arrays, chunk: int = 4096) -> float:
        """The bundle's loss of φ on labelled samples (a device's validation slice)."""
        b = self.bundle.check_batch(data, "val")
        n = b["item"].shape[0]
        if n == 0:
            raise TrainerError("val: no samples")
        logits = np.concatenate([self.score(phi, b["item"][s:s + chunk], b["hist"][s:s + chunk],
                                            b["profile"][s:s + chunk]) for s in range(0, n, chunk)])
        return stable_bce(logits, b["label"])


class Encoder:
    """The bundle's auxiliary encoder: a starting φ from what the device holds locally."""

    def __init__(self, bundle: Bundle | str | Path, *, threads: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.session = ort.InferenceSession(str(self.bundle.path("encoder")), _session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def start_phi(self, profile, hist, phi_prev=None) -> np.ndarray:
        """profile (P,), hist (L,) of this device; phi_prev None = cold start (zeros). -> φ (1, m)."""
        b = self.bundle
        hist = np.asarray(hist, dtype=np.int64).reshape(1, -1)
        profile = np.asarray(profile, dtype=np.int64).reshape(1, -1)
        b.check_batch({"item": np.ones(1, np.int64), "hist": hist, "profile": profile}, "encoder", labels=False)
        prev = np.zeros(b.phi_shape, np.float32) if phi_prev is None else b.check_phi(phi_prev, "phi_prev")
        out = self.session.run(["phi"], _feed(self.session, {"profile": profile, "hist": hist,
                                                              "phi_prev": prev.reshape(1, -1)}))[0]
        return b.check_phi(out, "encoder output")

    def source(self, phi_prev=None) -> str:
        """Where ``start_phi(..., phi_prev)`` comes from, for status and reports: "encoder", or the
        bundle's start policy when it chose otherwise for such a device ("start policy: zero" /
        "start policy: previous"); the policy is inside encoder.onnx, named by the manifest."""
        policy = (self.bundle.manifest.get("source") or {}).get("start_phi") or {}
        cold = phi_prev is None or not np.any(np.asarray(phi_prev))
        chosen = policy.get("cold" if cold else "warm", "encoder")
        return "encoder" if chosen == "encoder" else f"start policy: {chosen}"


class Trunk:
    """A cached bundle's trunk: ``features(batch) -> [n, F]`` from raw samples (item, hist,
    profile), independent of φ. Computed once per sample per training round."""

    def __init__(self, bundle: Bundle, *, threads: int | None = None):
        if not bundle.cached:
            raise TrainerError(f"bundle {bundle.dir}: its train graphs take raw inputs; it has no trunk")
        self.bundle = bundle
        self.session = ort.InferenceSession(str(bundle.path("trunk")), _session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.runs = 0  # session runs so far (the tests count them)

    def features(self, batch: dict[str, np.ndarray], chunk: int = TRUNK_CHUNK) -> np.ndarray:
        """``batch``: checked raw inputs (``Bundle.check_batch``) -> float32 [n, F]."""
        n = batch["item"].shape[0]
        parts = []
        for s in range(0, n, chunk):
            parts.append(self.session.run([FEATURES], _feed(self.session, {k: batch[k][s:s + chunk] for k in FEATURE_KEYS}))[0])
            self.runs += 1
        x = np.concatenate(parts) if parts else np.zeros((0, self.bundle.feature_dim), np.float32)
        if x.shape != (n, self.bundle.feature_dim):
            raise TrainerError(f"bundle {self.bundle.dir}: trunk gave features of shape {list(x.shape)}, the manifest "
                               f"says [{n}, {self.bundle.feature_dim}]")
        return x


class _HeadLoss:
    """The bundle's loss of φ on cached features, from the head graph (features, phi -> logit)."""

    def __init__(self, bundle: Bundle, threads: int | None):
        self.bundle = bundle
        self.session = ort.InferenceSession(str(bundle.path("head")), _session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def logits(self, phi: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self.session.run(["logit"], {FEATURES: features, "phi": self.bundle.check_phi(phi)})[0]

    def loss(self, phi: np.ndarray, data: dict[str, np.ndarray]) -> float:
        return stable_bce(self.logits(phi, data[FEATURES]), data["label"])


# -- backends -----------------------------------------------------------------------------------

class _PortableStep:
    name = "portable"

    def __init__(self, bundle: Bundle, threads: int | None):
        self.bundle = bundle
        self.session = ort.InferenceSession(str(bundle.path("train_step")), _session_options(threads),
                                            providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        # (A zero-width profile input may be dropped by the exporter.)
        missing = ({"phi", "m", "v", "step", "lr"} | set(bundle.train_inputs) - {"profile"}) - names
        if missing:
            raise TrainerError(f"bundle {bundle.dir}: train_step graph lacks inputs {sorted(missing)}")

    def start(self, phi0: np.ndarray, opt: dict) -> None:
        f = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
        self.state = {"phi": phi0.copy(), "m": np.zeros_like(phi0), "v": np.zeros_like(phi0),
                      "step": np.asarray(0, dtype=np.int64)}
        self.hyper = {k: f(opt[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}

    def step(self, batch: dict[str, np.ndarray]) -> float:
        phi, m, v, step, loss, _ = self.session.run(None, _feed(self.session, {**self.state, **self.hyper, **batch}))
        self.state = {"phi": phi, "m": m, "v": v, "step": step}
        return float(loss)

    def phi(self) -> np.ndarray:
        return self.state["phi"].copy()

    def gradient(self, phi: np.ndarray, batch: dict[str, np.ndarray], opt: dict) -> np.ndarray:
        self.start(phi, opt)
        out = self.session.run(["grad"], _feed(self.session, {**self.state, **self.hyper, **batch}))[0]
        return out


class _OrtTrainingStep:
    name = "ort-training"

    def __init__(self, bundle: Bundle, threads: int | None):
        self.bundle = bundle
        self.threads = threads
        self.api = ort_compat.import_training_api()

    def start(self, phi0: np.ndarray, opt: dict) -> None:
        # Fresh state, module and optimiser per round: AdamW moments start at zero, as in the reference.
        b = self.bundle
        self.state = self.api.CheckpointState.load_checkpoint(str(b.path("checkpoint")))
        self.module = self.api.Module(str(b.path("training_model")), self.state, str(b.path("eval_model")),
                                      session_options=_session_options(self.threads))
        self.optimizer = self.api.Optimizer(str(b.path("optimizer_model")), self.module)
        self.optimizer.set_learning_rate(float(opt["lr"]))
        # Written only after the Module exists (writing first segfaults, NOTES.md).
        self.state.parameters[b.phi_name] = phi0.copy()
        self.inputs = self.module.input_names()
        self.module.train()

    def _forward(self, batch: dict[str, np.ndarray]) -> float:
        return float(self.module(*[batch[n] for n in self.inputs]))

    def step(self, batch: dict[str, np.ndarray]) -> float:
        loss = self._forward(batch)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return loss

    def phi(self) -> np.ndarray:
        return np.array(self.state.parameters[self.bundle.phi_name].data, dtype=np.float32).reshape(self.bundle.phi_shape)

    def gradient(self, phi: np.ndarray, batch: dict[str, np.ndarray], opt: dict) -> np.ndarray:
        self.start(phi, opt)
        self._forward(batch)
        grad = np.array(self.state.parameters[self.bundle.phi_name].grad, dtype=np.float32)
        self.module.lazy_reset_grad()
        return grad.reshape(self.bundle.phi_shape)


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise TrainerError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "ort-training" if ort_compat.training_available() else "portable"
    if backend == "ort-training" and not ort_compat.training_available():
        raise TrainerError("backend 'ort-training' needs onnxruntime-training-cpu; this environment has plain "
                           "onnxruntime (use backend 'portable' or 'auto')")
    return backend


class Trainer:
    """Trains φ on local data within a budget; early-stops on a local validation slice and keeps
    the previous φ when the new one evaluates worse. With a cached bundle, each ``train`` /
    ``gradient`` call runs the trunk once over its samples and steps on the features."""

    def __init__(self, bundle_dir: str | Path | Bundle, backend: str = "auto", *, threads: int | None = None,
                 verify: bool = True):
        self.bundle = bundle_dir if isinstance(bundle_dir, Bundle) else Bundle(bundle_dir, verify=verify)
        self.backend = resolve_backend(backend)
        self.optimizer = dict(self.bundle.manifest["optimizer"])
        self.scorer = Scorer(self.bundle, threads=threads)
        self.trunk = Trunk(self.bundle, threads=threads) if self.bundle.cached else None
        self._head = _HeadLoss(self.bundle, threads) if self.bundle.cached else None
        impl = _OrtTrainingStep if self.backend == "ort-training" else _PortableStep
        self._impl = impl(self.bundle, threads)

    @property
    def manifest(self) -> dict:
        return self.bundle.manifest

    def _prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Checked raw samples -> what the train graphs take (trunk features + label when cached)."""
        if self.trunk is None:
            return batch
        return {FEATURES: self.trunk.features(batch), "label": batch["label"]}

    def step_inputs(self, batch: Arrays) -> dict[str, np.ndarray]:
        """The train graphs' inputs for labelled raw samples (for benchmarks of the bare step)."""
        return self._prepare(self.bundle.check_batch(batch))

    def _val_loss(self, phi: np.ndarray, val: dict[str, np.ndarray]) -> float:
        return self._head.loss(phi, val) if self._head is not None else self.scorer.loss(phi, val)

    def gradient(self, phi, batch: Arrays) -> np.ndarray:
        """d loss / d φ at ``phi`` on one batch (no update)."""
        return self._impl.gradient(self.bundle.check_phi(phi), self.step_inputs(batch), self.optimizer)

    def train(self, phi0, data: Arrays | Sequence[Arrays], *, steps: int | None = None, epochs: int | None = None,
              seconds: float | None = None, batch_size: int | None = None, val: Arrays | None = None,
              patience: int = 3, lr: float | None = None, seed: int = 0, select: str = "best") -> TrainResult:
        """One AdamW step per batch.

        ``data``: a dict of arrays (item, hist, profile, label), split into mini-batches of
        ``batch_size`` (default: the whole set, one full-batch step per epoch; shuffled per epoch
        with ``seed`` when smaller), or a list of such dicts used in order. Budget: at most
        ``steps`` steps, ``epochs`` passes and ``seconds`` of wall time; with none given, the
        manifest's ``optimizer.steps`` (for a dict of arrays, the ``steps_by_positives`` bracket of its
        positives where the manifest has one).

        ``select`` says which φ a validation slice ``val`` chooses. ``"best"``: φ is evaluated after
        every epoch; training stops after ``patience`` evaluations without improvement and the best
        φ is kept. ``"final"`` (the cloud's reference rule, ``personalize_all``): the whole budget is
        trained and only the last φ is evaluated. Either way, if the chosen φ is no better than
        ``phi0`` (and the manifest says ``keep_if_worse``), ``phi0`` is returned.
        """
        if select not in ("best", "final"):
            raise TrainerError(f"select = {select!r}: must be 'best' or 'final'")
        t0 = time.monotonic()
        b = self.bundle
        phi0 = b.check_phi(phi0, "phi0")
        if isinstance(data, Mapping):
            full = b.check_batch(data, "data")
            n = full["item"].shape[0]
            if n == 0:
                raise TrainerError("data: no local training samples")
            bs = n if batch_size is None else int(batch_size)
            if bs < 1:
                raise TrainerError(f"batch_size = {batch_size}: must be >= 1")
            full = self._prepare(full)  # trunk features once per round, not once per step
            rng = np.random.default_rng(seed)

            def epoch_batches():
                order = rng.permutation(n) if bs < n else np.arange(n)
                for s in range(0, n, bs):
                    idx = order[s:s + bs]
                    yield {k: v[idx] for k, v in full.items()}
        else:
            checked = [(x, b.check_batch(x, f"data[{i}]")) for i, x in enumerate(data)]
            checked = [(x, c) for x, c in checked if c["item"].shape[0] > 0]
            if not checked:
                raise TrainerError("data: no local training samples")
            prepared: dict[int, dict[str, np.ndarray]] = {}  # a batch given several times: one trunk run
            for x, c in checked:
                if id(x) not in prepared:
                    prepared[id(x)] = self._prepare(c)
            fixed = [prepared[id(x)] for x, _ in checked]

            def epoch_batches():
                yield from fixed
        if steps is None and epochs is None and seconds is None:
            # The manifest's budget; by the count of training positives where it has such a table.
            positives = int((full["label"] > 0).sum()) if isinstance(data, Mapping) else None
            steps = (int(self.optimizer["steps"]) if positives is None else
                     mf.step_budget(self.optimizer["steps"], self.optimizer.get("steps_by_positives"), positives))
        for name, value in (("steps", steps), ("epochs", epochs), ("seconds", seconds)):
            if value is not None and value < 0:
                raise TrainerError(f"{name} = {value}: must be >= 0")
        opt = dict(self.optimizer)
        if lr is not None:
            if not lr > 0:
                raise TrainerError(f"lr = {lr}: must be > 0")
            opt["lr"] = float(lr)
        if val is not None:
            val = b.check_batch(val, "val")
            val = self._prepare(val) if val["item"].shape[0] > 0 else None

        val_before = self._val_loss(phi0, val) if val is not None else None
        keep_if_worse = bool(self.optimizer.get("keep_if_worse", True))
        # Without keep_if_worse phi0 is no candidate: the best *trained* φ is returned.
        best_phi, best_val, best_step = phi0, (val_before if keep_if_worse else math.inf), 0
        stale = 0
        losses: list[float] = []
        stopped = "steps"
        self._impl.start(phi0, opt)
        epoch = 0
        done = steps == 0 or epochs == 0
        while not done:
            for batch in epoch_batches():
                if steps is not None and len(losses) >= steps:
                    done, stopped = True, "steps"
                    break
                if seconds is not None and time.monotonic() - t0 >= seconds:
                    done, stopped = True, "seconds"
                    break
                loss = self._impl.step(batch)
                losses.append(loss)
                if not math.isfinite(loss):
                    done, stopped = True, "non_finite"
                    break
            if done:
                break
            epoch += 1
            current = self._impl.phi()
            if not np.all(np.isfinite(current)):
                stopped = "non_finite"
                break
            if val is None:
                best_phi, best_step = current, len(losses)
            elif select == "best":
                v = self._val_loss(current, val)
                if v < best_val:
                    best_phi, best_val, best_step, stale = current, v, len(losses), 0
                else:
                    stale += 1
                    if stale >= patience:
                        stopped = "early_stop"
                        break
            if epochs is not None and epoch >= epochs:
                stopped = "epochs"
                break
            if steps is not None and len(losses) >= steps:
                stopped = "steps"
                break
        if (stopped in ("steps", "seconds") or select == "final") and stopped != "non_finite" \
                and len(losses) > best_step:
            # The budget ended mid-epoch (or only the last φ is judged): judge the last φ.
            current = self._impl.phi()
            if np.all(np.isfinite(current)):
                if val is None:
                    best_phi, best_step = current, len(losses)
                else:
                    v = self._val_loss(current, val)
                    # "final" keeps phi0 only when the loss got worse, as the reference does.
                    if v < best_val or (select == "final" and v == best_val):
                        best_phi, best_val, best_step = current, v, len(losses)
        trained = best_phi if best_step > 0 else None
        kept = False
        phi_out, val_after = best_phi, best_val
        if stopped == "non_finite" and best_step == 0:
            phi_out, val_after, kept = phi0, val_before, True
        elif val is not None and best_step == 0 and len(losses) > 0:
            kept = True  # no evaluated φ beat phi0 on the validation slice
        if val is not None and best_step == 0:
            val_after = val_before
        return TrainResult(phi=phi_out.copy(), losses=losses, steps=len(losses), val_loss_before=val_before,
                           val_loss_after=val_after, kept_previous=kept, stopped=stopped, best_step=best_step,
                           backend=self.backend, seconds=time.monotonic() - t0, trained_phi=trained)

    def self_check(self) -> dict:
        """Re-run the manifest's reference (fixed batch, N steps) and compare; raises TrainerError
        when this board's runtime disagrees with the cloud's PyTorch reference."""
        ref = self.manifest.get("reference")
        if not ref:
            raise TrainerError(f"bundle {self.bundle.dir}: manifest has no reference values")
        tol = ref["tolerance"]
        batch = {k: np.asarray(v) for k, v in ref["batch"].items()}
        phi0 = np.asarray(ref["phi0"], np.float32)
        out = {}
        grad = self.gradient(phi0, batch)
        out["grad"] = float(np.max(np.abs(grad - np.asarray(ref["grad0"], np.float32))))
        # Older manifests ran the reference at the bundle's own rate (no "lr" key).
        res = self.train(phi0, [batch] * ref["steps"], steps=ref["steps"], lr=ref.get("lr"))
        out["phi"] = float(np.max(np.abs(res.phi - np.asarray(ref["phi_after"], np.float32))))
        out["loss"] = float(np.max(np.abs(np.asarray(res.losses) - np.asarray(ref["losses"]))))
        want = np.asarray(ref["logits0"], np.float32)
        logits = self.scorer.score(phi0, batch["item"], batch["hist"], batch["profile"])
        out["logit"] = float(np.max(np.abs(logits - want)))
        if self._head is not None:  # the trunk + head path a cached bundle trains and validates on
            head = self._head.logits(phi0, self.step_inputs(batch)[FEATURES])
            out["logit"] = max(out["logit"], float(np.max(np.abs(head - want))))
        for key, limit in (("grad", tol["grad"]), ("phi", tol["phi"]), ("logit", tol["logit"]), ("loss", tol["phi"])):
            if not out[key] <= limit:
                raise TrainerError(f"self-check ({self.backend}): {key} differs from the reference by "
                                   f"{out[key]:.3g} > {limit:g}")
        return out
