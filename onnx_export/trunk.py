"""The trunk / head split of a bundle whose patches all sit in the prediction MLP.

Nothing before the first patch depends on φ — the MLP's input, nor the first patched layer's base
Linear, whose output is all its patch reads — so a device computes those features of each local
sample once per training round and every step runs only the rest of the head (forward, backward to
φ, AdamW); see ``MetaPatchModel.features`` / ``head``:

  trunk.onnx   item [B], hist [B, L], profile [B, P] -> features [B, F]   (plain inference graph)
  head.onnx    features [B, F], phi [1, m] -> logit [B]                    (validation losses)

The train graphs of such a bundle (ORT training artifacts, portable step) take ``features`` and
``label`` instead of the raw inputs. Exported like the inference model (legacy exporter, opset 17),
so the training build (ORT 1.19) and plain onnxruntime both run them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cloud_trainer.models.metapatch import MetaPatchModel
from onnx_export.schema import BATCH, FEATURES, RAW_INPUTS, cap_ir, example_batch, example_features

TRUNK_FILE = "trunk.onnx"
HEAD_FILE = "head.onnx"
HEAD_INPUTS = (FEATURES, "phi")
OUTPUT = "logit"
OPSET = 17


class _Trunk(nn.Module):
    def __init__(self, model: MetaPatchModel):
        super().__init__()
        self.model = model

    def forward(self, item, hist, profile):
        return self.model.features(item, hist, profile)


class _Head(nn.Module):
    def __init__(self, model: MetaPatchModel):
        super().__init__()
        self.model = model

    def forward(self, features, phi):
        return self.model.head(features, phi=phi)


def export_trunk(model: MetaPatchModel, path: str | os.PathLike) -> None:
    ex = {k: torch.from_numpy(v) for k, v in example_batch(model, 2, seed=0).items()}
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(
            _Trunk(model), (ex["item"], ex["hist"], ex["profile"]), os.fspath(path), dynamo=False,
            opset_version=OPSET, input_names=list(RAW_INPUTS), output_names=[FEATURES],
            dynamic_axes={n: {0: BATCH} for n in (*RAW_INPUTS, FEATURES)}, do_constant_folding=True,
        )
    finally:
        model.train(was_training)
    cap_ir(path)


def export_head(model: MetaPatchModel, path: str | os.PathLike) -> None:
    features = example_features(model, 2, seed=0)
    phi = torch.zeros(1, model.phi_dim)
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(
            _Head(model), (features, phi), os.fspath(path), dynamo=False, opset_version=OPSET,
            input_names=list(HEAD_INPUTS), output_names=[OUTPUT],
            dynamic_axes={FEATURES: {0: BATCH}, OUTPUT: {0: BATCH}}, do_constant_folding=True,
        )
    finally:
        model.train(was_training)
    cap_ir(path)
