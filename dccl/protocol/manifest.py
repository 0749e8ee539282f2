"""The device bundle's manifest: schema, load + validate, sha256 verification. Torch-free.

A bundle is a directory: ``manifest.json`` plus the files it lists. The manifest says what the
bundle is (format, version, source), what every file hashes to, what a device may train
(``trainable``), what it feeds the graphs (``inputs``), how it trains (``loss``, ``optimizer``)
and what a correct implementation computes on a fixed batch (``reference``), so a board can check
itself. Every problem is a ``ManifestError`` whose message names the field or the file.

Keys (``manifest_version`` 2; version 1 manifests are still read: no ``train_inputs``, no
trunk or head, raw-input train graphs)::

  format            "dccl-bundle"
  manifest_version  2
  bundle_version    str, e.g. "r0-s1200-3fa9c2d1"
  created           ISO-8601 UTC
  files             {relative path: {"sha256": hex64, "size": int}}   (manifest.json excluded)
  models            {"inference", "train_step", "encoder" (or null), "trunk" (or null), "head" (or null),
                     "ort_training": {"training_model", "eval_model", "optimizer_model", "checkpoint"}}
  train_inputs      the batch inputs of both train graphs (training_model and train_step), one of
                     ["item", "hist", "profile", "label"]   raw inputs: the whole model trains
                     ["features", "label"]                  cached: the graphs are the prediction head
                                                            alone; a device computes
                                                            features = trunk(item, hist, profile) once
                                                            per sample per round. "trunk" (item, hist,
                                                            profile -> features) and "head" (features,
                                                            phi -> logit) are required, and
                                                            inputs.features is [batch, F] float32.
                    With raw inputs, "trunk" and "head" are null.
  trainable         {name: {"shape": [int, ...], "dtype": "float32"}}
  inputs            {"item"|"hist"|"profile"|"label"|"phi"[|"features"]: {"dtype", "shape" (ints or "batch"), "vocab"?}}
  schema            {"n_items", "n_attrs", "max_len", "profile_vocab", "phi_dim"}
  loss              {"name": "bce_with_logits", "formula": str}
  optimizer         {"name": "adamw", "lr", "beta1", "beta2", "eps", "weight_decay", "steps", "keep_if_worse",
                     "require_val" (optional, default false: a device with no validation slice does not train),
                     "steps_by_positives" (optional: [[min_positives, steps], ...], the first at 0)}
                    ("steps": the on-device budget the cloud chose for this bundle on validation; 0 = no
                     step helps on it. A board's agent stops there unless train.follow_bundle_steps is off.
                     With "steps_by_positives", a device with n training positives this round takes the
                     steps of the last entry whose min_positives <= n instead: `step_budget`)
  local_data        {"neg": int >= 0, "val_frac": 0 <= float < 1, "since"?: finite number}   (optional: how
                     the cloud built each device's samples when it chose this bundle's budget — sampled
                     negatives per positive, the newest fraction of the fresh positives held out for
                     validation (how many: `val_len`), and where the device's fresh window starts (unix seconds: positives
                     before it are history only, as in the cloud's split). A board's agent uses them
                     unless its config sets train.neg / train.val_frac / train.window "all")
  portable          {"inputs": [...], "outputs": [...]}     (train-step graph I/O names)
  reference         {"batch": {...lists}, "phi0", "steps", "lr", "phi_after", "losses", "grad0", "logits0",
                     "tolerance": {"phi", "grad", "logit"}}   ("lr": the rate of the reference steps;
                     absent in older manifests, which ran it at optimizer.lr; the batch holds raw
                     inputs whatever train_inputs says)
  source            {"checkpoint_sha256", "step", "round", "encoder_trained", "start_phi": {"warm", "cold"}}
                    (informational; "start_phi" is the start policy encoder.onnx computes)
  versions          {package: version}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from dccl.atomic import atomic_write
from dccl.errors import DcclError

FILE = "manifest.json"
FORMAT = "dccl-bundle"
MANIFEST_VERSION = 2  # what this code writes
READABLE_VERSIONS = (1, 2)  # 2 added train_inputs and the trunk / head models
MAX_MANIFEST_BYTES = 4 << 20
INPUT_NAMES = ("item", "hist", "profile", "label", "phi")
RAW_TRAIN_INPUTS = ("item", "hist", "profile", "label")
CACHED_TRAIN_INPUTS = ("features", "label")
ORT_TRAINING_ROLES = ("training_model", "eval_model", "optimizer_model", "checkpoint")
OPTIMIZER_FLOATS = ("lr", "beta1", "beta2", "eps", "weight_decay")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def val_len(n, val_frac: float):
    """How many of a window's n positives (the newest) are held out for validation, by local_data.val_frac:
    round(val_frac·n), at least 1 if val_frac > 0 and n >= 2 (so a slice exists), at most n - 1 (so
    something is left to train on), 0 for an empty window. The cloud's split and a device's store apply
    this one rule. An int for an int, an int64 array for an array."""
    n_arr = np.asarray(n, np.int64)
    v = np.round(val_frac * n_arr).astype(np.int64)
    if val_frac > 0:
        v = np.maximum(v, np.minimum(1, n_arr - 1))
    v = np.clip(np.minimum(v, n_arr - 1), 0, None)
    return int(v) if v.ndim == 0 else v


def check_steps_by_positives(table, field: str = "steps_by_positives") -> list[list[int]]:
    """A step budget by the device's count of training positives: ``[[min_positives, steps], ...]``,
    the first at 0 positives, each later one at strictly more, every value an integer >= 0. Returns it
    as lists of ints; otherwise raises ValueError("<field>[i]: <what is wrong>")."""
    if not isinstance(table, (list, tuple)) or not table:
        raise ValueError(f"{field}: {table!r} is not a non-empty list of [min_positives, steps] pairs")
    out: list[list[int]] = []
    for i, entry in enumerate(table):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)):
            raise ValueError(f"{field}[{i}]: {entry!r} is not [min_positives, steps] of integers >= 0")
        if i == 0 and entry[0] != 0:
            raise ValueError(f"{field}[0]: {list(entry)!r} does not start at 0 positives")
        if i and entry[0] <= out[-1][0]:
            raise ValueError(f"{field}[{i}]: {list(entry)!r}: min_positives must increase")
        out.append([int(entry[0]), int(entry[1])])
    return out


def step_budget(steps: int, steps_by_positives, n_positives):
    """How many steps a device trains: `steps`, or — with a ``steps_by_positives`` table (see
    `check_steps_by_positives`) — the steps of the last entry whose min_positives is at most the
    device's count of training positives in the window it trains on. The cloud's reference and a
    device's agent apply this one rule. An int for an int, an int64 array for an array."""
    n = np.asarray(n_positives, np.int64)
    if not steps_by_positives:
        out = np.full(n.shape, int(steps), np.int64)
    else:
        mins = np.array([m for m, _ in steps_by_positives], np.int64)
        budgets = np.array([b for _, b in steps_by_positives], np.int64)
        out = budgets[np.searchsorted(mins, np.maximum(n, 0), side="right") - 1]
    return int(out) if out.ndim == 0 else out


class ManifestError(DcclError):
    """A bundle or manifest that must be rejected; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"bundle manifest: {field}: {message}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _need(obj: dict, key: str, typ, where: str):
    if key not in obj:
        raise ManifestError(f"{where}{key}", "missing")
    value = obj[key]
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        raise ManifestError(f"{where}{key}", f"{value!r} is not {getattr(typ, '__name__', typ)}")
    return value


def _safe_path(path: str, field: str) -> str:
    p = PurePosixPath(path)
    if not path or p.is_absolute() or ".." in p.parts or "\\" in path or path == FILE:
        raise ManifestError(field, f"{path!r} is not a safe relative file name")
    return path


def validate(obj: Any) -> dict:
    """Check the structure and types of a parsed manifest; returns it unchanged."""
    if not isinstance(obj, dict):
        raise ManifestError("(top level)", "not a JSON object")
    fmt = _need(obj, "format", str, "")
    if fmt != FORMAT:
        raise ManifestError("format", f"{fmt!r}, expected {FORMAT!r}")
    ver = _need(obj, "manifest_version", int, "")
    if ver not in READABLE_VERSIONS:
        raise ManifestError("manifest_version", f"{ver} is not a version this code reads "
                                                f"({', '.join(map(str, READABLE_VERSIONS))})")
    if not _need(obj, "bundle_version", str, "").strip():
        raise ManifestError("bundle_version", "empty")

    files = _need(obj, "files", dict, "")
    if not files:
        raise ManifestError("files", "empty")
    for path, entry in files.items():
        _safe_path(path, f"files[{path!r}]")
        if not isinstance(entry, dict):
            raise ManifestError(f"files[{path!r}]", "not an object")
        digest = _need(entry, "sha256", str, f"files[{path!r}].")
        if not _HEX64.match(digest):
            raise ManifestError(f"files[{path!r}].sha256", f"{digest!r} is not 64 lowercase hex digits")
        if _need(entry, "size", int, f"files[{path!r}].") < 0:
            raise ManifestError(f"files[{path!r}].size", "negative")

    models = _need(obj, "models", dict, "")
    for role in ("inference", "train_step"):
        if _need(models, role, str, "models.") not in files:
            raise ManifestError(f"models.{role}", f"{models[role]!r} is not listed in files")
    for role in ("encoder", "trunk", "head"):
        if models.get(role) is not None and models[role] not in files:
            raise ManifestError(f"models.{role}", f"{models[role]!r} is not listed in files")
    ort = _need(models, "ort_training", dict, "models.")
    for role in ORT_TRAINING_ROLES:
        if _need(ort, role, str, "models.ort_training.") not in files:
            raise ManifestError(f"models.ort_training.{role}", f"{ort[role]!r} is not listed in files")

    trainable = _need(obj, "trainable", dict, "")
    if not trainable:
        raise ManifestError("trainable", "empty: a bundle must name what a device trains")
    for name, entry in trainable.items():
        if not isinstance(entry, dict):
            raise ManifestError(f"trainable[{name!r}]", "not an object")
        shape = _need(entry, "shape", list, f"trainable[{name!r}].")
        if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ManifestError(f"trainable[{name!r}].shape", f"{shape!r} is not a list of positive ints")
        if _need(entry, "dtype", str, f"trainable[{name!r}].") != "float32":
            raise ManifestError(f"trainable[{name!r}].dtype", f"{entry['dtype']!r}, expected 'float32'")

    inputs = _need(obj, "inputs", dict, "")
    for name in INPUT_NAMES:
        entry = _need(inputs, name, dict, "inputs.")
        dtype = _need(entry, "dtype", str, f"inputs.{name}.")
        if dtype not in ("int64", "float32"):
            raise ManifestError(f"inputs.{name}.dtype", f"{dtype!r} is not int64 or float32")
        shape = _need(entry, "shape", list, f"inputs.{name}.")
        if not all(d == "batch" or isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ManifestError(f"inputs.{name}.shape", f"{shape!r}: dims must be ints >= 0 or 'batch'")

    if ver >= 2:
        _need(obj, "train_inputs", list, "")
    cached = train_inputs(obj) == CACHED_TRAIN_INPUTS
    if cached:
        for role in ("trunk", "head"):
            if models.get(role) is None:
                raise ManifestError(f"models.{role}", "missing: train_inputs are the trunk's features, so the bundle "
                                                      f"must carry the {role} model")
        entry = _need(inputs, "features", dict, "inputs.")
        if entry.get("dtype") != "float32":
            raise ManifestError("inputs.features.dtype", f"{entry.get('dtype')!r}, expected 'float32'")
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == "batch" and isinstance(shape[1], int)
                and not isinstance(shape[1], bool) and shape[1] >= 1):
            raise ManifestError("inputs.features.shape", f"{shape!r}, expected ['batch', F] with F >= 1")
    else:
        for role in ("trunk", "head"):
            if models.get(role) is not None:
                raise ManifestError(f"models.{role}", f"{models[role]!r} given, but train_inputs are the raw "
                                                      "inputs (a trunk only goes with ['features', 'label'])")
    portable = obj.get("portable")
    if isinstance(portable, dict) and isinstance(portable.get("inputs"), list):
        want = CACHED_TRAIN_INPUTS if cached else RAW_TRAIN_INPUTS
        if [n for n in portable["inputs"] if n in (*RAW_TRAIN_INPUTS, *CACHED_TRAIN_INPUTS)] != list(want):
            raise ManifestError("portable.inputs", f"{portable['inputs']!r}: the batch inputs are not train_inputs {list(want)}")

    schema = _need(obj, "schema", dict, "")
    for key in ("n_items", "max_len", "phi_dim"):
        if _need(schema, key, int, "schema.") < 1:
            raise ManifestError(f"schema.{key}", f"{schema[key]} must be >= 1")
    vocab = _need(schema, "profile_vocab", list, "schema.")
    if not all(isinstance(v, int) and v >= 1 for v in vocab):
        raise ManifestError("schema.profile_vocab", f"{vocab!r} is not a list of ints >= 1")

    opt = _need(obj, "optimizer", dict, "")
    if _need(opt, "name", str, "optimizer.") != "adamw":
        raise ManifestError("optimizer.name", f"{opt['name']!r}, expected 'adamw'")
    for key in OPTIMIZER_FLOATS:
        value = _need(opt, key, (int, float), "optimizer.")
        if not math.isfinite(value) or value < 0:
            raise ManifestError(f"optimizer.{key}", f"{value!r} must be finite and >= 0")
    if not opt["lr"] > 0:
        raise ManifestError("optimizer.lr", f"{opt['lr']!r} must be > 0")
    if _need(opt, "steps", int, "optimizer.") < 0:
        raise ManifestError("optimizer.steps", "negative")
    if opt.get("steps_by_positives") is not None:
        try:
            check_steps_by_positives(opt["steps_by_positives"], "optimizer.steps_by_positives")
        except ValueError as exc:
            field, _, msg = str(exc).partition(": ")
            raise ManifestError(field, msg) from None
    _need(opt, "keep_if_worse", bool, "optimizer.")
    if "require_val" in opt and not isinstance(opt["require_val"], bool):
        raise ManifestError("optimizer.require_val", f"{opt['require_val']!r} must be true or false")
    if obj.get("local_data") is not None:
        local = _need(obj, "local_data", dict, "")
        neg = _need(local, "neg", int, "local_data.")
        if neg < 0:
            raise ManifestError("local_data.neg", f"{neg!r} must be an integer >= 0")
        frac = _need(local, "val_frac", (int, float), "local_data.")
        if not 0 <= frac < 1:
            raise ManifestError("local_data.val_frac", f"{frac!r} must be a number in [0, 1)")
        if local.get("since") is not None:
            since = _need(local, "since", (int, float), "local_data.")
            if isinstance(since, bool) or not math.isfinite(since):
                raise ManifestError("local_data.since", f"{since!r} must be a finite time in unix seconds")
    _need(_need(obj, "loss", dict, ""), "name", str, "loss.")
    _need(obj, "versions", dict, "")
    if "reference" in obj and obj["reference"] is not None:
        ref = _need(obj, "reference", dict, "")
        for key in ("batch", "phi0", "phi_after", "losses", "grad0", "logits0", "tolerance"):
            _need(ref, key, (dict, list), "reference.")
        _need(ref, "steps", int, "reference.")
        if "lr" in ref and not (isinstance(ref["lr"], (int, float)) and not isinstance(ref["lr"], bool)
                                and ref["lr"] > 0):
            raise ManifestError("reference.lr", f"{ref['lr']!r} must be a number > 0")
    return obj


def train_inputs(manifest: dict) -> tuple[str, ...]:
    """The batch inputs of the bundle's train graphs (``RAW_TRAIN_INPUTS`` or ``CACHED_TRAIN_INPUTS``);
    a version-1 manifest (no ``train_inputs``) has raw-input train graphs."""
    value = manifest.get("train_inputs")
    if value is None and manifest.get("manifest_version") == 1:
        return RAW_TRAIN_INPUTS
    for allowed in (RAW_TRAIN_INPUTS, CACHED_TRAIN_INPUTS):
        if value == list(allowed):
            return allowed
    raise ManifestError("train_inputs", f"{value!r} is neither {list(RAW_TRAIN_INPUTS)} nor {list(CACHED_TRAIN_INPUTS)}")


def load(bundle_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    """Read, validate and (``verify``) check every listed file's size and sha256."""
    path = Path(bundle_dir) / FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(FILE, f"cannot read {path} ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(FILE, f"{len(raw)} bytes > {MAX_MANIFEST_BYTES}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(FILE, f"not valid JSON ({exc})") from None
    validate(obj)
    if verify:
        verify_files(bundle_dir, obj)
    return obj


def verify_files(bundle_dir: str | os.PathLike, manifest: dict) -> None:
    """Every listed file exists with its size and sha256 (a truncated, corrupted or swapped file
    fails here, before any runtime parses it)."""
    root = Path(bundle_dir)
    for rel, entry in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise ManifestError(f"files[{rel!r}]", f"missing from {root}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ManifestError(f"files[{rel!r}]", f"size {size} != {entry['size']} in the manifest (truncated or replaced)")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ManifestError(f"files[{rel!r}]", f"sha256 {digest[:16]}... != {entry['sha256'][:16]}... in the manifest (corrupted or tampered)")


def file_entries(bundle_dir: str | os.PathLike, names: list[str]) -> dict[str, dict]:
    root = Path(bundle_dir)
    return {n: {"sha256": sha256_file(root / n), "size": (root / n).stat().st_size} for n in names}


def write(bundle_dir: str | os.PathLike, manifest: dict) -> Path:
    """Validate and write ``manifest.json`` atomically (temp file, fsync, rename)."""
    validate(manifest)
    root = Path(bundle_dir)
    data = json.dumps(manifest, indent=1, sort_keys=False, allow_nan=False).encode()
    return atomic_write(root / FILE, data, mode=0o644)


def manifest_sha256(bundle_dir: str | os.PathLike) -> str:
    """The digest a model announcement carries (``dccl.protocol.payloads.dump_announcement``)."""
    return sha256_file(Path(bundle_dir) / FILE)
