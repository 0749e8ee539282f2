"""The portable train step: forward + backward + AdamW update of φ as one ONNX graph.

Plain ``onnxruntime`` (aarch64 wheels, no training build) runs it with standard operators only.
The step is traced with ``make_fx`` (autograd inside the trace, so the backward ops are ordinary
aten ops in the graph) and exported with ``torch.onnx.export(dynamo=True, opset 18,
optimize=False)`` — ``optimize=True`` would fold ``x + eps`` into ``x`` (NOTES.md). The AdamW
hyperparameters are graph *inputs*, so no constant folding can touch them and a device can
change its learning rate without a new file.

Graph I/O (B dynamic):
  inputs   phi [1, m], m [1, m], v [1, m], step [] int64,
           lr [], beta1 [], beta2 [], eps [], weight_decay [] float32,
           item [B], hist [B, L], profile [B, P] int64, label [B] float32      (raw inputs)
        or features [B, F] float32, label [B] float32                          (``cached``)
  outputs  phi_out, m_out, v_out [1, m], step_out [] int64, loss [], grad [1, m]
``grad`` is the gradient of the loss at the input φ (before the update). With ``cached`` the step
is the head alone on the trunk's features (``onnx_export.trunk``): the graph holds only the
head's tensors.
"""

from __future__ import annotations

import logging
import os

import onnx
import torch
from torch import nn
from torch.func import functional_call
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from cloud_trainer.models.metapatch import MetaPatchModel
from onnx_export.schema import BATCH, FEATURES, MAX_IR_VERSION, example_batch, example_features, head_forward

FILE = "train_step.onnx"
STATE_INPUTS = ("phi", "m", "v", "step")
HYPER_INPUTS = ("lr", "beta1", "beta2", "eps", "weight_decay")
BATCH_INPUTS = ("item", "hist", "profile", "label")
CACHED_BATCH_INPUTS = (FEATURES, "label")
INPUTS = STATE_INPUTS + HYPER_INPUTS + BATCH_INPUTS
CACHED_INPUTS = STATE_INPUTS + HYPER_INPUTS + CACHED_BATCH_INPUTS
OUTPUTS = ("phi_out", "m_out", "v_out", "step_out", "loss", "grad")
OPSET = 18


def stable_bce(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The same loss as the ORT artifacts: mean(relu(x) - x*y + log(1 + exp(-|x|)))."""
    return (torch.relu(logit) - logit * label + torch.log1p(torch.exp(-logit.abs()))).mean()


def make_step_fn(model: MetaPatchModel, names: list[str]):
    """step(*frozen, φ, m, v, step, lr, β1, β2, eps, wd, *batch, label)
    -> (φ', m', v', step', loss, grad): one torch.optim.AdamW step (single-tensor algorithm) on φ.
    ``batch`` is what ``model(*batch, phi=φ)`` takes (item, hist, profile; or features inside
    ``head_forward``). The model's tensors come in as arguments (``names`` order) so that symbolic
    tracing sees no real tensors; every one of them is frozen."""
    k = len(names)

    def step_fn(*args):
        frozen = dict(zip(names, args[:k]))
        phi, m, v, step, lr, beta1, beta2, eps, weight_decay = args[k:k + 9]
        *batch, label = args[k + 9:]
        with torch.enable_grad():
            p = phi.detach().requires_grad_(True)
            logit = functional_call(model, frozen, tuple(batch), {"phi": p})
            loss = stable_bce(logit, label)
            (grad,) = torch.autograd.grad(loss, [p])
        t = step + 1
        tf = t.to(torch.float32)
        m2 = beta1 * m + (1 - beta1) * grad
        v2 = beta2 * v + (1 - beta2) * grad * grad
        bc1 = 1 - torch.pow(beta1, tf)
        bc2 = 1 - torch.pow(beta2, tf)
        denom = torch.sqrt(v2) / torch.sqrt(bc2) + eps
        phi2 = phi * (1 - lr * weight_decay) - (lr / bc1) * m2 / denom
        return phi2, m2, v2, t, loss.detach(), grad

    return step_fn


class _Traced(nn.Module):
    """Holds the model's frozen tensors as buffers (they become the graph's initializers)."""

    def __init__(self, gm: torch.fx.GraphModule, frozen: list[torch.Tensor]):
        super().__init__()
        self.gm = gm
        self.n = len(frozen)
        for i, t in enumerate(frozen):
            self.register_buffer(f"frozen_{i}", t.detach().clone())

    def frozen(self) -> list[torch.Tensor]:
        return [getattr(self, f"frozen_{i}") for i in range(self.n)]

    def forward(self, phi, m, v, step, lr, beta1, beta2, eps, weight_decay, item, hist, profile, label):
        return self.gm(*self.frozen(), phi, m, v, step, lr, beta1, beta2, eps, weight_decay, item, hist, profile, label)


class _TracedCached(_Traced):
    """The same for the head step on trunk features (the exporter names inputs after ``forward``)."""

    def forward(self, phi, m, v, step, lr, beta1, beta2, eps, weight_decay, features, label):
        return self.gm(*self.frozen(), phi, m, v, step, lr, beta1, beta2, eps, weight_decay, features, label)


def example_args(model: MetaPatchModel, batch: int = 3, cached: bool = False) -> tuple[torch.Tensor, ...]:
    ex = {k: torch.from_numpy(v) for k, v in example_batch(model, batch, seed=0).items()}
    zeros = torch.zeros(1, model.phi_dim)
    f = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    inputs = (example_features(model, batch, seed=0),) if cached else (ex["item"], ex["hist"], ex["profile"])
    return (zeros.clone(), zeros.clone(), zeros.clone(), torch.tensor(0, dtype=torch.int64),
            f(1e-2), f(0.9), f(0.999), f(1e-8), f(0.0), *inputs, ex["label"])


def inputs_for(cached: bool) -> tuple[str, ...]:
    return CACHED_INPUTS if cached else INPUTS


def export(model: MetaPatchModel, path: str | os.PathLike, cached: bool | None = None) -> None:
    """``cached`` (default ``model.cacheable``): the head step on trunk features, else the whole
    model's step on raw inputs."""
    cached = model.cacheable if cached is None else cached
    was_training = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # only φ (an input here) gets a gradient
    model.eval()
    try:
        args = example_args(model, cached=cached)
        state = {n: t for n, t in model.state_dict(keep_vars=False).items() if not n.endswith("metapatch_phi")}
        if cached:
            # The head reads only its own tensors; the trunk's stay out of the graph.
            state = {n: t for n, t in state.items() if n.startswith(model.head_prefix)}
        # φ is an input; the model's own metapatch_phi must not be read (it is not in `state`).
        names = list(state)
        frozen = [state[n] for n in names]
        batch = Dim(BATCH, min=1, max=1 << 20)
        dyn = {n: None for n in STATE_INPUTS + HYPER_INPUTS}
        batch_inputs = CACHED_BATCH_INPUTS if cached else BATCH_INPUTS
        dyn.update({n: {0: batch} for n in batch_inputs})
        if cached:
            with head_forward(model):
                gm = make_fx(make_step_fn(model, names), tracing_mode="symbolic")(*frozen, *args)
        else:
            gm = make_fx(make_step_fn(model, names), tracing_mode="symbolic")(*frozen, *args)
        traced = (_TracedCached if cached else _Traced)(gm, frozen).eval()
        # "torchvision is not installed" warnings from the exporter's op registry are noise here.
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        prog = torch.onnx.export(
            traced, args, dynamo=True, opset_version=OPSET, optimize=False,
            input_names=list(inputs_for(cached)), output_names=list(OUTPUTS), dynamic_shapes=dyn,
            verbose=False, report=False,
        )
        proto = prog.model_proto
    finally:
        for p, rg in zip(model.parameters(), was_training):
            p.requires_grad_(rg)
    _strip_metadata(proto)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.save(proto, os.fspath(path))


def _strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and metadata: half the file, no use on a board."""
    g = proto.graph
    for node in g.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*g.value_info, *g.input, *g.output, *g.initializer):
        del value.metadata_props[:]
