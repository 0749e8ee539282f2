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

from cloud_trainer.models.metapatch import MetaPatchModel
from onnx_export.schema import FEATURES, RAW_INPUTS, example_batch, example_features, export_graph

TRUNK_FILE = "trunk.onnx"
HEAD_FILE = "head.onnx"
HEAD_INPUTS = (FEATURES, "phi")
OUTPUT = "logit"
OPSET = 17


def export_trunk(model: MetaPatchModel, path: str | os.PathLike) -> None:
    ex = {k: torch.from_numpy(v) for k, v in example_batch(model, 2, seed=0).items()}
    export_graph(model, lambda m, item, hist, profile: m.features(item, hist, profile),
                 (ex["item"], ex["hist"], ex["profile"]), path, inputs=RAW_INPUTS, output=FEATURES,
                 batch=(*RAW_INPUTS, FEATURES), opset=OPSET)


def export_head(model: MetaPatchModel, path: str | os.PathLike) -> None:
    export_graph(model, lambda m, features, phi: m.head(features, phi=phi),
                 (example_features(model, 2, seed=0), torch.zeros(1, model.phi_dim)), path, inputs=HEAD_INPUTS,
                 output=OUTPUT, batch=(FEATURES, OUTPUT), opset=OPSET)
