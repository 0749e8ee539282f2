"""The inference model with φ as an input: item, hist, profile, phi -> logit.

A device swaps its φ without a new model file. φ is (1, m), so the MetaPatch layers take their
single-device path (2-D matmuls). Exported like the training graph (legacy exporter, opset 17),
so the training build (ORT 1.19) and plain onnxruntime both run it.
"""

from __future__ import annotations

import os

import torch

from cloud_trainer.models.metapatch import MetaPatchModel
from onnx_export.schema import example_batch, export_graph

FILE = "inference.onnx"
INPUTS = ("item", "hist", "profile", "phi")
OUTPUT = "logit"
OPSET = 17


def export(model: MetaPatchModel, path: str | os.PathLike) -> None:
    ex = {k: torch.from_numpy(v) for k, v in example_batch(model, 2, seed=0).items()}
    phi = torch.zeros(1, model.phi_dim)
    export_graph(model, lambda m, item, hist, profile, phi: m(item, hist, profile, phi=phi),
                 (ex["item"], ex["hist"], ex["profile"], phi), path, inputs=INPUTS, output=OUTPUT,
                 batch=("item", "hist", "profile", OUTPUT), opset=OPSET)
