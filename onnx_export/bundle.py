"""The device bundle: every ONNX file a board needs, a manifest that describes them, a contract check.

Layout of a bundle directory::

  manifest.json          what the bundle is (dccl.protocol.manifest documents every key)
  inference.onnx         item, hist, profile, phi -> logit
  trunk.onnx             item, hist, profile -> features          (cached bundles only)
  head.onnx              features, phi -> logit                   (cached bundles only)
  train_step.onnx        portable train step (plain onnxruntime)
  encoder.onnx           profile, hist, phi_prev -> phi
  training_model.onnx    ORT training artifacts (onnxruntime-training)
  eval_model.onnx
  optimizer_model.onnx
  checkpoint

A *cached* bundle (the default whenever every patch sits in the prediction MLP,
``MetaPatchModel.cacheable``) has train graphs on the head alone: they take the trunk's
``features [B, F]`` and ``label`` (manifest ``train_inputs``), and a device computes the features
of its samples once per round with ``trunk.onnx``. Otherwise (e.g. an ``attention.key`` patch) the
train graphs take ``item, hist, profile, label`` as before. The inference model and the encoder are
the same either way.

The bundle is built in a temporary sibling directory, checked, then renamed into place, so a
failed export never leaves a half-written bundle where a publisher could pick it up.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
from cloud_trainer.models.metapatch import MetaPatchModel
from cloud_trainer.personalize import DeviceTrainConfig, train_phi
from dccl.errors import DcclError
from dccl.protocol import manifest as mf
from onnx_export import artifacts, encoder as encoder_export, inference, portable, trunk
from onnx_export.schema import FEATURES, device_view, example_batch, input_schema, train_inputs, trainable_spec

REFERENCE_BATCH = 16
REFERENCE_STEPS = 5
REFERENCE_SEED = 1234
TOLERANCE = {"phi": 1e-4, "grad": 1e-5, "logit": 1e-5}
# The reference trajectory runs at min(lr, CHECK_LR). AdamW divides each gradient component by its
# own running magnitude, so at the large rates devices use (0.1) a 1e-9 float32 difference in a
# component whose gradient passes near zero becomes a 1e-4 difference in φ within a few steps — an
# amplified rounding difference, not a disagreement between the graphs. The learning rate is a
# runtime input of both backends, so the check still runs the bundle's own AdamW (betas, eps,
# weight decay, bias correction), just at a rate where float32 noise stays below the tolerance.
CHECK_LR = 0.01
PACKAGES = ("dccl", "torch", "onnx", "onnxscript", "onnxruntime-training-cpu", "numpy")


class ContractError(DcclError):
    """The exported files disagree with the manifest (names the parameter or the file)."""


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def reference_values(model: MetaPatchModel, cfg: DeviceTrainConfig, steps: int = REFERENCE_STEPS) -> dict:
    """A fixed batch, a non-zero φ0 and what the PyTorch reference computes from them: the gradient
    at φ0, the logits at φ0, and φ after ``steps`` AdamW steps on that batch (at ``lr`` <= CHECK_LR)."""
    batch = example_batch(model, REFERENCE_BATCH, seed=REFERENCE_SEED)
    tb = {k: torch.from_numpy(v) for k, v in batch.items()}
    rng = np.random.default_rng(REFERENCE_SEED)
    phi0 = torch.from_numpy((rng.standard_normal((1, model.phi_dim)) * 0.1).astype(np.float32))
    was_training = model.training
    model.eval()
    try:
        p = phi0.clone().requires_grad_(True)
        logits = model(tb["item"], tb["hist"], tb["profile"], phi=p)
        (grad,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logits, tb["label"]), [p])
        check_cfg = dataclasses.replace(cfg, lr=min(cfg.lr, CHECK_LR))
        phi_after, losses = train_phi(model, phi0, [tb] * steps, check_cfg)
    finally:
        model.train(was_training)
    return {
        "batch": {k: v.tolist() for k, v in batch.items()},
        "phi0": phi0.tolist(),
        "steps": steps,
        "lr": check_cfg.lr,
        "phi_after": phi_after.tolist(),
        "losses": [float(x) for x in losses],
        "grad0": grad.tolist(),
        "logits0": logits.detach().tolist(),
        "tolerance": dict(TOLERANCE),
    }


def build_manifest(model: MetaPatchModel, cfg: DeviceTrainConfig, *, version: str, files: dict,
                   has_encoder: bool, cached: bool = False, source: dict | None = None,
                   local_data: dict | None = None) -> dict:
    dcfg = model.base.config
    manifest = {
        "format": mf.FORMAT,
        "manifest_version": mf.MANIFEST_VERSION,
        "bundle_version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "models": {
            "inference": inference.FILE,
            "train_step": portable.FILE,
            "encoder": encoder_export.FILE if has_encoder else None,
            "trunk": trunk.TRUNK_FILE if cached else None,
            "head": trunk.HEAD_FILE if cached else None,
            "ort_training": dict(zip(mf.ORT_TRAINING_ROLES, artifacts.TRAINING_FILES)),
        },
        "train_inputs": train_inputs(cached),
        "trainable": trainable_spec(model),
        "inputs": input_schema(model, cached),
        "schema": {"n_items": dcfg.n_items, "n_attrs": dcfg.n_attrs, "max_len": dcfg.max_len,
                   "profile_vocab": list(dcfg.profile_vocab), "phi_dim": model.phi_dim},
        "loss": {"name": "bce_with_logits", "formula": "mean(relu(x) - x*y + log(1 + exp(-|x|)))"},
        "optimizer": {"name": "adamw", "lr": cfg.lr, "beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.eps,
                      "weight_decay": cfg.weight_decay, "steps": cfg.steps, "keep_if_worse": cfg.keep_if_worse,
                      "require_val": cfg.require_val},
        "portable": {"inputs": list(portable.inputs_for(cached)), "outputs": list(portable.OUTPUTS)},
        "reference": reference_values(model, cfg),
        "source": source or {},
        "versions": _versions(),
    }
    if cfg.steps_by_positives:
        manifest["optimizer"]["steps_by_positives"] = [list(e) for e in cfg.steps_by_positives]
    if local_data is not None:
        manifest["local_data"] = {"neg": int(local_data["neg"]), "val_frac": float(local_data["val_frac"])}
        if local_data.get("since") is not None:
            manifest["local_data"]["since"] = float(local_data["since"])
    return manifest


def write_bundle(model: MetaPatchModel, encoder: PatchEncoder | None, out_dir: str | os.PathLike, *,
                 version: str, cfg: DeviceTrainConfig | None = None, source: dict | None = None,
                 overwrite: bool = False, check: bool = True, cache_features: bool | None = None,
                 local_data: dict | None = None) -> dict:
    """Export everything into ``out_dir`` (created; must not exist unless ``overwrite``). Returns
    the manifest. Without a trained encoder, a fresh one (φ_prev passes through) is exported and
    the manifest's ``source.encoder_trained`` says so. ``cache_features`` (default: whether the
    model is ``cacheable``): train graphs on the head with a trunk model, else on the raw inputs;
    True for a model whose patches are not all in the head is an error. ``local_data``
    ({"neg", "val_frac"} and optionally "since", the start of the devices' fresh window in unix
    seconds): how the cloud built the devices' samples (the manifest's ``local_data``; a board's
    agent builds its own the same way)."""
    cfg = cfg or DeviceTrainConfig()
    cached = model.cacheable if cache_features is None else bool(cache_features)
    if cached and not model.cacheable:
        raise DcclError(f"cache_features: metapatch.target_modules {list(model.config.target_modules)} patch the "
                        "trunk, so its features depend on φ and cannot be cached")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DcclError(f"--out {out_dir}: exists and is not empty (choose a new directory per bundle version)")
    source = dict(source or {})
    if encoder is None:
        dcfg = model.base.config
        torch.manual_seed(0)
        encoder = PatchEncoder(EncoderConfig(n_items=dcfg.n_items, phi_dim=model.phi_dim,
                                             profile_vocab=list(dcfg.profile_vocab)))
        source["encoder_trained"] = False
    else:
        source.setdefault("encoder_trained", True)
    # The start policy baked into encoder.onnx (PatchEncoder.start), for people reading the manifest.
    source["start_phi"] = {"warm": encoder.config.start_warm, "cold": encoder.config.start_cold}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o755)
        with warnings.catch_warnings():
            # Tracer warnings about the single-device branch (φ is always (1, m) here) and
            # exporter chatter; failures still raise.
            warnings.simplefilter("ignore")
            view = device_view(model)
            names = artifacts.generate(view, tmp, cfg, cached=cached)
            inference.export(view, tmp / inference.FILE)
            portable.export(view, tmp / portable.FILE, cached=cached)
            encoder_export.export(encoder, model.base.config.max_len, tmp / encoder_export.FILE)
            if cached:
                trunk.export_trunk(view, tmp / trunk.TRUNK_FILE)
                trunk.export_head(view, tmp / trunk.HEAD_FILE)
        names += [inference.FILE, portable.FILE, encoder_export.FILE]
        if cached:
            names += [trunk.TRUNK_FILE, trunk.HEAD_FILE]
        manifest = build_manifest(model, cfg, version=version, files=mf.file_entries(tmp, names),
                                  has_encoder=True, cached=cached, source=source, local_data=local_data)
        mf.write(tmp, manifest)
        if check:
            check_bundle(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def check_bundle(bundle_dir: str | os.PathLike, backends: tuple[str, ...] = ("ort-training", "portable")) -> dict:
    """The contract check: hashes verify; every trainable name is a trainable parameter of the
    training checkpoint with its shape, and nothing else is trainable; the portable, inference (and
    head) graphs take φ with that shape; both train graphs take exactly the manifest's
    ``train_inputs`` (with the trunk's feature width for a cached bundle); both backends load and
    reproduce the manifest's PyTorch reference (gradient, φ after N steps, logits) — a cached bundle
    through its trunk, from the reference's raw batch. Returns the measured max-abs differences."""
    import onnx

    from edge_agent.ort_compat import import_training_api
    from edge_agent.trainer import Trainer, TrainerError

    bundle_dir = Path(bundle_dir)
    manifest = mf.load(bundle_dir, verify=True)
    expected = manifest["trainable"]
    api = import_training_api()
    ort_files = manifest["models"]["ort_training"]
    state = api.CheckpointState.load_checkpoint(str(bundle_dir / ort_files["checkpoint"]))
    actual = {name: list(p.data.shape) for name, p in state.parameters if p.requires_grad}
    for name, spec in expected.items():
        if name not in actual:
            raise ContractError(f"bundle contract: trainable parameter '{name}' is not trainable (or missing) "
                                f"in {ort_files['checkpoint']}")
        if actual[name] != spec["shape"]:
            raise ContractError(f"bundle contract: trainable parameter '{name}' has shape {actual[name]} in "
                                f"{ort_files['checkpoint']}, manifest says {spec['shape']}")
    for name in actual:
        if name not in expected:
            raise ContractError(f"bundle contract: parameter '{name}' is trainable in {ort_files['checkpoint']} "
                                "but not in the manifest's trainable set")
    graph = onnx.load(str(bundle_dir / ort_files["training_model"]), load_external_data=False)
    outputs = {o.name for o in graph.graph.output}
    for name in expected:
        if f"{name}_grad.accumulation.out" not in outputs:
            raise ContractError(f"bundle contract: trainable parameter '{name}' has no gradient output in "
                                f"{ort_files['training_model']}")
    if len(expected) != 1:
        raise ContractError(f"bundle contract: {len(expected)} trainable tensors {sorted(expected)}; the portable "
                            "train step and the edge agent train exactly one metapatch vector")
    (phi_name, spec), = expected.items()
    models = manifest["models"]
    wanted = mf.train_inputs(manifest)
    cached = FEATURES in wanted
    phi_roles = [("train_step", ("phi", "m", "v")), ("inference", ("phi",))] + ([("head", ("phi",))] if cached else [])
    for role, input_names in phi_roles:
        shapes = _io_shapes(bundle_dir / models[role], "input")
        for n in input_names:
            if shapes.get(n) != spec["shape"]:
                raise ContractError(f"bundle contract: {models[role]} input '{n}' for trainable "
                                    f"parameter '{phi_name}' has shape {shapes.get(n)}, manifest says {spec['shape']}")
    # The train graphs take what the manifest's train_inputs say, and nothing of the other path.
    batch_names = {*mf.RAW_TRAIN_INPUTS, *mf.CACHED_TRAIN_INPUTS}
    for rel in (models["train_step"], models["ort_training"]["training_model"]):
        shapes = _io_shapes(bundle_dir / rel, "input")
        extra = sorted((batch_names - set(wanted)) & set(shapes))
        # A zero-width profile input may be dropped by the exporter (a model without profile columns).
        missing = [n for n in wanted if n not in shapes and not (n == "profile" and not manifest["schema"]["profile_vocab"])]
        if extra or missing:
            raise ContractError(f"bundle contract: {rel} takes inputs {sorted(batch_names & set(shapes))}, manifest "
                                f"train_inputs says {wanted}")
        if cached and shapes[FEATURES][1:] != manifest["inputs"][FEATURES]["shape"][1:]:
            raise ContractError(f"bundle contract: {rel} input 'features' has shape {shapes[FEATURES]}, manifest "
                                f"says {manifest['inputs'][FEATURES]['shape']}")
    if cached:
        want_f = manifest["inputs"][FEATURES]["shape"][1:]
        for rel, kind in ((models["trunk"], "output"), (models["head"], "input")):
            got = _io_shapes(bundle_dir / rel, kind).get(FEATURES)
            if got is None or got[1:] != want_f:
                raise ContractError(f"bundle contract: {rel} {kind} 'features' has shape {got}, manifest says "
                                    f"{manifest['inputs'][FEATURES]['shape']}")
    diffs = {}
    for backend in backends:
        try:
            diffs[backend] = Trainer(bundle_dir, backend, verify=False).self_check()
        except TrainerError as exc:
            raise ContractError(f"bundle contract: {exc}") from None
        except Exception as exc:  # an ONNX Runtime load/run failure
            raise ContractError(f"bundle contract: backend {backend} cannot run the bundle "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return diffs



def _io_shapes(path: Path, kind: str) -> dict[str, list]:
    """{name: [dims]} of a graph's inputs or outputs (symbolic dims as their names)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in (g.input if kind == "input" else g.output)}
