"""ONNX Runtime training artifacts (the ``ort-training`` edge backend).

``generate_artifacts`` writes ``training_model.onnx`` (forward + loss + gradient graph),
``eval_model.onnx``, ``optimizer_model.onnx`` and ``checkpoint``. Workarounds from NOTES.md:

- ``requires_grad`` is exactly ``model.device_trainable()`` (found structurally); every other
  parameter is frozen; buffers stay graph constants.
- The loss is a custom onnxblock ``mean(relu(x) - x*y + log(1 + exp(-|x|)))``: the built-in
  BCEWithLogits turns NaN for |x| >~ 17 and ORT has no gradient for Softplus.
- The optimizer is ORT's AdamW in *PyTorch* mode (``adam_mode=0``: decoupled weight decay
  before the update, bias correction on m and v), not onnxblock's default HF mode, so the
  update equals ``torch.optim.AdamW``.
- Every written model gets ``ir_version <= 10`` (ORT 1.19 refuses newer IR).
- The model is exported with the legacy exporter, opset 17, ``do_constant_folding=False`` and
  ``TrainingMode.TRAINING``, so initializer names are the ``state_dict`` names. The single-device
  φ path of the MetaPatch layer uses 2-D matmuls, avoiding ORT's wrong gradient of MatMul(2-D, 1-D).
- ``cached``: the graph is the head alone (``features [B, F] -> logit``, see ``onnx_export.trunk``);
  otherwise the whole model on the raw inputs (``item, hist, profile -> logit``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

import onnx
import torch
from onnxruntime.training import artifacts as ort_artifacts
from onnxruntime.training import onnxblock
from onnxruntime.training.onnxblock import _graph_utils
from onnxruntime.training.onnxblock.optim.optim import AdamWOptimizer

from cloud_trainer.models.metapatch import MetaPatchModel
from cloud_trainer.personalize import DeviceTrainConfig
from onnx_export.schema import BATCH, FEATURES, RAW_INPUTS, cap_ir, example_batch, example_features, head_forward

TRAINING_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
MODEL_INPUTS = RAW_INPUTS
LABEL = "label"
OPSET = 17


def _node(model: onnx.ModelProto, op: str, inputs: list[str], **attrs) -> str:
    out = _graph_utils.generate_graph_name(f"{op.lower()}_output")
    model.graph.node.append(onnx.helper.make_node(op, inputs, [out], name=_graph_utils.generate_graph_name(op), **attrs))
    return out


class StableBCEWithLogits(onnxblock.Block):
    """mean(relu(x) - x*y + log(1 + exp(-|x|))): finite for any logit, gradients ORT has."""

    def build(self, logit: str, label: str = LABEL) -> str:
        g = self.base
        if not _graph_utils.node_arg_exists(g, label):
            label = onnxblock.blocks.InputLike(logit)(label)
        one = _graph_utils.generate_graph_name("one")
        g.graph.initializer.append(onnx.helper.make_tensor(one, onnx.TensorProto.FLOAT, [], [1.0]))
        softplus_neg_abs = _node(g, "Log", [_node(g, "Add", [one, _node(g, "Exp", [_node(g, "Neg", [_node(g, "Abs", [logit])])])])])
        per = _node(g, "Add", [_node(g, "Sub", [_node(g, "Relu", [logit]), _node(g, "Mul", [logit, label])]), softplus_neg_abs])
        return _node(g, "ReduceMean", [per], keepdims=0)


class _TorchAdamWNode(AdamWOptimizer):
    """ORT's AdamWOptimizer node in PyTorch mode (adam_mode=0)."""

    def _build_optimizer_node(self, input_names, output_name, node_name, node_attributes):
        return super()._build_optimizer_node(input_names, output_name, node_name, {**node_attributes, "adam_mode": 0})


def adamw_block(cfg: DeviceTrainConfig) -> onnxblock.optim.AdamW:
    block = onnxblock.optim.AdamW(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    block._adamw = _TorchAdamWNode(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return block


def export_training_graph(model: MetaPatchModel, cached: bool = False) -> onnx.ModelProto:
    """The patched model with its own φ parameter, initializers named as in ``state_dict``:
    item, hist, profile -> logit; or, ``cached``, the head alone: features -> logit."""
    buf = io.BytesIO()
    was_training = model.training
    model.eval()  # no dropout / batch-norm in the model; TRAINING mode only keeps params as initializers
    common = dict(dynamo=False, opset_version=OPSET, output_names=["logit"], export_params=True,
                  do_constant_folding=False, keep_initializers_as_inputs=False,
                  training=torch.onnx.TrainingMode.TRAINING)
    try:
        if cached:
            with head_forward(model):
                torch.onnx.export(model, (example_features(model, 2, seed=0),), buf, input_names=[FEATURES],
                                  dynamic_axes={FEATURES: {0: BATCH}, "logit": {0: BATCH}}, **common)
        else:
            ex = {k: torch.from_numpy(v) for k, v in example_batch(model, 2, seed=0).items()}
            torch.onnx.export(model, (ex["item"], ex["hist"], ex["profile"]), buf, input_names=list(MODEL_INPUTS),
                              dynamic_axes={n: {0: BATCH} for n in (*MODEL_INPUTS, "logit")}, **common)
    finally:
        model.train(was_training)
    return onnx.load_from_string(buf.getvalue())


@contextlib.contextmanager
def _captured_stderr():
    """Send file descriptor 2 to a temp file; replay it only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def generate(model: MetaPatchModel, out_dir: str | os.PathLike, cfg: DeviceTrainConfig,
             requires_grad: list[str] | None = None, cached: bool | None = None) -> list[str]:
    """Write the four training artifacts into ``out_dir``; returns their file names.

    ``cached`` (default: ``model.cacheable``): train the head on trunk features instead of the
    whole model on raw inputs. ``requires_grad`` defaults to the structural device-trainable set;
    it is a parameter only so that tests can build a deliberately wrong bundle for the contract check."""
    out_dir = Path(out_dir)
    graph = export_training_graph(model, model.cacheable if cached is None else cached)
    params = [n for n, _ in model.named_parameters()]
    trainable = list(model.device_trainable()) if requires_grad is None else list(requires_grad)
    initializers = {t.name for t in graph.graph.initializer}
    missing = [n for n in trainable if n not in initializers]
    if missing:
        raise ValueError(f"trainable parameter {missing[0]!r} is not an initializer of the exported graph")
    frozen = [n for n in params if n not in trainable and n in initializers]
    # onnxblock writes temporary files into the working directory, and ORT's gradient builder logs
    # every graph transformer at INFO on stderr (not configurable from Python): run both elsewhere.
    cwd = os.getcwd()
    level = logging.getLogger().level
    with tempfile.TemporaryDirectory() as tmp, _captured_stderr():
        os.chdir(tmp)
        try:
            logging.getLogger().setLevel(max(level, logging.WARNING))
            ort_artifacts.generate_artifacts(
                graph, requires_grad=trainable, frozen_params=frozen, loss=StableBCEWithLogits(),
                optimizer=adamw_block(cfg), artifact_directory=out_dir,
            )
        finally:
            os.chdir(cwd)
            logging.getLogger().setLevel(level)
    for name in TRAINING_FILES:
        if name.endswith(".onnx"):
            cap_ir(out_dir / name)
    return list(TRAINING_FILES)
