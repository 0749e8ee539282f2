"""Shared by the ONNX export / parity tests: an ML-100K-sized model and one exported bundle per run.

The model has ML-100K's vocabularies (1682 items, 19 genres + pad, profile [age 8, gender 3,
occupation 22], L = 20) and a seeded random Θ scaled so that φ has real leverage on the logits
(an untrained Θ of std 0.02 leaves φ nearly inert, which would make parity trivially easy).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cloud_trainer.checkpoint import build_model
from cloud_trainer.models.din import DINConfig
from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.personalize import DeviceTrainConfig

N_ITEMS = 1682
PROFILE_VOCAB = [8, 3, 22]
DEVICE_CFG = DeviceTrainConfig(steps=20, lr=0.05, weight_decay=0.01)


def ml100k_item_attrs(seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    attrs = np.zeros((N_ITEMS + 1, 6), np.int64)
    for i in range(1, N_ITEMS + 1):
        k = int(rng.integers(1, 4))
        attrs[i, :k] = rng.choice(np.arange(1, 20), k, replace=False)
    return torch.from_numpy(attrs)


def ml100k_model(seed: int = 0, theta_std: float = 0.3, **mp_kwargs):
    torch.manual_seed(seed)
    model = build_model(DINConfig(n_items=N_ITEMS, n_attrs=20, profile_vocab=list(PROFILE_VOCAB)),
                        MetaPatchConfig(**mp_kwargs), ml100k_item_attrs(seed))
    with torch.no_grad():
        for p in model.shared_parameters().values():
            p.normal_(0.0, theta_std)
    model.eval()
    return model


# The raw-input path: a patch in the attention unit makes the trunk features depend on φ, so this
# bundle's train graphs take item, hist, profile (no trunk).
RAW_TARGETS = ("attention.key", "mlp.0")


@functools.lru_cache(maxsize=None)
def shared_bundle(kind: str = "cached") -> tuple[object, Path]:
    """(model, bundle dir) exported once per test process, contract-checked. ``kind``: "cached" (the
    default patches in the MLP: train graphs on the trunk's features) or "raw" (``RAW_TARGETS``)."""
    from onnx_export.bundle import write_bundle

    model = {"cached": ml100k_model, "raw": lambda: ml100k_model(target_modules=RAW_TARGETS)}[kind]()
    root = Path(tempfile.mkdtemp(prefix=f"dccl-bundle-{kind}-"))
    atexit.register(shutil.rmtree, root, True)
    out = root / "bundle"
    write_bundle(model, None, out, version="test-1", cfg=DEVICE_CFG, source={"test": True})
    return model, out
