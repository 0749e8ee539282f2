"""The model's input schema, and deterministic example batches that follow it.

One place says what a device feeds the exported graphs (names shared with
``cloud_trainer.models``): ``item [B] int64``, ``hist [B, L] int64``, ``profile [B, P] int64``,
``label [B] float32``, ``phi [1, m] float32`` and, for bundles whose train graphs run on cached
trunk features, ``features [B, F] float32``. The manifest records it; the tests, the reference
values in the manifest and the benchmark draw batches from it.
"""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import onnx
import torch
from torch import nn

from cloud_trainer.models.metapatch import MetaPatchModel

BATCH = "batch"  # the name of the dynamic batch dimension in every exported graph
MAX_IR_VERSION = 10  # ORT 1.19 (the training build) reads IR <= 10 (NOTES.md)
RAW_INPUTS = ("item", "hist", "profile")  # what the raw-input graphs take (besides label / φ)
FEATURES = "features"  # the trunk's output, the head's input


def trainable_spec(model: MetaPatchModel) -> dict[str, dict]:
    """{name: {"shape": [...], "dtype": "float32"}} of the device-trainable parameters, found
    structurally (``device_trainable``), in the manifest's form."""
    return {n: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
            for n, p in model.device_trainable().items()}


def input_schema(model: MetaPatchModel, cached: bool = False) -> dict[str, dict]:
    """The graphs' inputs; ``cached``: the train graphs take the trunk's ``features`` too."""
    cfg = model.base.config
    L, P = cfg.max_len, len(cfg.profile_vocab)
    out = {
        "item": {"dtype": "int64", "shape": [BATCH], "vocab": cfg.n_items + 1},
        "hist": {"dtype": "int64", "shape": [BATCH, L], "vocab": cfg.n_items + 1},
        "profile": {"dtype": "int64", "shape": [BATCH, P], "vocab": list(cfg.profile_vocab)},
        "label": {"dtype": "float32", "shape": [BATCH]},
        "phi": {"dtype": "float32", "shape": [1, model.phi_dim]},
    }
    if cached:
        out[FEATURES] = {"dtype": "float32", "shape": [BATCH, model.feature_dim]}
    return out


def train_inputs(cached: bool) -> list[str]:
    """The batch inputs of the train graphs (ORT training model and portable step)."""
    return [FEATURES, "label"] if cached else [*RAW_INPUTS, "label"]


def example_features(model: MetaPatchModel, n: int, seed: int = 0) -> torch.Tensor:
    """Trunk features (n, F) of ``example_batch(model, n, seed)`` (a cacheable model)."""
    ex = {k: torch.from_numpy(v) for k, v in example_batch(model, n, seed).items()}
    with torch.no_grad():
        return model.features(ex["item"], ex["hist"], ex["profile"]).detach().clone()


@contextlib.contextmanager
def head_forward(model: MetaPatchModel):
    """Within the block ``model(features, phi=None)`` is ``model.head``: exporters that take a
    module and call it see the head alone, with the parameters under their ``state_dict`` names."""
    if not model.cacheable:
        raise ValueError("head_forward: the model's patches are not all in the head")
    model.forward = model.head  # an instance attribute shadows the method
    try:
        yield model
    finally:
        del model.forward


def example_batch(model: MetaPatchModel, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic batch of ``n`` valid samples: ids in range, right-aligned 0-padded
    histories of varied length (some empty), labels 0/1 in both classes."""
    cfg = model.base.config
    rng = np.random.default_rng(seed)
    L = cfg.max_len
    item = rng.integers(1, cfg.n_items + 1, size=n, dtype=np.int64)
    hist = rng.integers(1, cfg.n_items + 1, size=(n, L), dtype=np.int64)
    lengths = rng.integers(0, L + 1, size=n)
    for i, k in enumerate(lengths):
        hist[i, : L - k] = 0  # right-aligned: the last k positions hold the history
    profile = np.stack([rng.integers(0, v, size=n, dtype=np.int64) for v in cfg.profile_vocab], axis=1) \
        if cfg.profile_vocab else np.zeros((n, 0), np.int64)
    label = (np.arange(n) % 2).astype(np.float32)
    rng.shuffle(label)
    return {"item": item, "hist": hist, "profile": profile, "label": label}


class _Call(nn.Module):
    """``fn(module, *inputs)`` as a module (the module's tensors keep their names in the graph)."""

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.model = module  # "model.": the prefix the graphs' tensor names had before this helper
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def export_graph(module: nn.Module, fn, args: tuple, path: str | os.PathLike, *, inputs: tuple[str, ...],
                 output: str, batch: tuple[str, ...], opset: int = 17) -> None:
    """An inference graph of ``fn(module, *args)`` (module in eval mode, restored after): the legacy
    exporter at ``opset`` with constant folding, axis 0 of ``batch`` dynamic, IR capped for ORT 1.19
    (``cap_ir``) — how the device bundle's inference, trunk, head and encoder graphs are made."""
    was_training = module.training
    module.eval()
    try:
        torch.onnx.export(
            _Call(module, fn), args, os.fspath(path), dynamo=False, opset_version=opset,
            input_names=list(inputs), output_names=[output],
            dynamic_axes={n: {0: BATCH} for n in batch}, do_constant_folding=True,
        )
    finally:
        module.train(was_training)
    cap_ir(path)


def cap_ir(path: str | os.PathLike) -> None:
    """Rewrite a saved model's ``ir_version`` down to what ORT 1.19 reads."""
    proto = onnx.load(os.fspath(path))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save(proto, os.fspath(path))


def device_view(model: MetaPatchModel) -> MetaPatchModel:
    """A copy of ``model`` for export in which the catalogue table (item embedding beside its mean
    attribute embedding, ``DIN.item_table``) is precomputed: on a device it is frozen, so the
    graphs need not rebuild it from the attribute lists at every step. Same outputs, same
    parameter names; the table is an extra buffer ``base.device_item_table``."""
    view = copy.deepcopy(model).eval()
    base = view.base
    with torch.no_grad():
        base.register_buffer("device_item_table", base.item_table().detach().clone(), persistent=True)
    # An instance attribute shadows the method; it reads the buffer through the module, so
    # functional_call (portable export) can still substitute it.
    base.item_table = lambda: base.device_item_table
    return view
