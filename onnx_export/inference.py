"""The inference model with φ as an input: item, hist, profile, phi -> logit.

A device swaps its φ without a new model file. φ is (1, m), so the MetaPatch layers take their
single-device path (2-D matmuls). Exported like the training graph (legacy exporter, opset 17),
so the training build (ORT 1.19) and plain onnxruntime both run it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from cloud_trainer.models.metapatch import MetaPatchModel
from onnx_export.schema import BATCH, cap_ir, example_batch

FILE = "inference.onnx"
INPUTS = ("item", "hist", "profile", "phi")
OUTPUT = "logit"
OPSET = 17


class _PhiAsInput(nn.Module):
    def __init__(self, model: MetaPatchModel):
        super().__init__()
        self.model = model

    def forward(self, item, hist, profile, phi):
        return self.model(item, hist, profile, phi=phi)


def export(model: MetaPatchModel, path: str | os.PathLike) -> None:
    ex = {k: torch.from_numpy(v) for k, v in example_batch(model, 2, seed=0).items()}
    phi = torch.zeros(1, model.phi_dim)
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(
            _PhiAsInput(model), (ex["item"], ex["hist"], ex["profile"], phi), os.fspath(path), dynamo=False,
            opset_version=OPSET, input_names=list(INPUTS), output_names=[OUTPUT],
            dynamic_axes={"item": {0: BATCH}, "hist": {0: BATCH}, "profile": {0: BATCH}, OUTPUT: {0: BATCH}},
            do_constant_folding=True,
        )
    finally:
        model.train(was_training)
    cap_ir(path)

