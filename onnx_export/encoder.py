"""The auxiliary encoder as ONNX: profile, hist, phi_prev -> phi.

A device computes its own starting φ (cold start: φ_prev = 0; after a new bundle: its previous φ)
without sending its profile or history anywhere. The graph is ``PatchEncoder.start``: the start
policy the cloud chose on validation slices (encoder φ, previous φ or zero) is part of it, so a
device needs no code for it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from cloud_trainer.models.encoder import PatchEncoder
from onnx_export.schema import export_graph

FILE = "encoder.onnx"
INPUTS = ("profile", "hist", "phi_prev")
OUTPUT = "phi"
OPSET = 17


def export(encoder: PatchEncoder, max_len: int, path: str | os.PathLike) -> None:
    cfg = encoder.config
    rng = np.random.default_rng(0)
    profile = torch.from_numpy(np.stack([rng.integers(0, v, 2) for v in cfg.profile_vocab], 1).astype(np.int64)) \
        if cfg.profile_vocab else torch.zeros(2, 0, dtype=torch.int64)
    hist = torch.from_numpy(rng.integers(0, cfg.n_items + 1, (2, max_len)).astype(np.int64))
    phi_prev = torch.zeros(2, cfg.phi_dim)
    export_graph(encoder, lambda e, profile, hist, phi_prev: e.start(profile, hist, phi_prev), (profile, hist, phi_prev),
                 path, inputs=INPUTS, output=OUTPUT, batch=(*INPUTS, OUTPUT), opset=OPSET)
