"""Self-describing checkpoints: a file on disk says what it is (configs, versions, step)."""

from __future__ import annotations

import io
import platform
from pathlib import Path

import torch

import dccl
from cloud_trainer.models.din import DIN, DINConfig
from cloud_trainer.models.encoder import EncoderConfig, PatchEncoder
from cloud_trainer.models.metapatch import MetaPatchConfig, MetaPatchModel, get_metapatch_model
from dccl.atomic import atomic_write
from dccl.errors import DcclError

FORMAT = "dccl-checkpoint/1"


def build_model(din_cfg: DINConfig, mp_cfg: MetaPatchConfig, item_attrs: torch.Tensor) -> MetaPatchModel:
    return get_metapatch_model(DIN(din_cfg, item_attrs), mp_cfg)


def save_checkpoint(path: str | Path, model: MetaPatchModel, encoder: PatchEncoder | None, *, step: int,
                    round: int = 0, extra: dict | None = None) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "din_config": model.base.config.to_dict(),
        "metapatch_config": model.config.to_dict(),
        "encoder_config": encoder.config.to_dict() if encoder is not None else None,
        "model_state": model.state_dict(),
        "encoder_state": encoder.state_dict() if encoder is not None else None,
        "step": step,
        "round": round,
        "versions": {"dccl": dccl.__version__, "torch": str(torch.__version__), "python": platform.python_version()},
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> tuple[MetaPatchModel, PatchEncoder | None, dict]:
    path = Path(path)
    if not path.is_file():
        raise DcclError(f"checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise DcclError(f"checkpoint {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DcclError(f"checkpoint {path}: format is not {FORMAT}")
    din_cfg = DINConfig(**payload["din_config"])
    din_cfg.mlp_hidden = tuple(din_cfg.mlp_hidden)
    mp_cfg = MetaPatchConfig(**payload["metapatch_config"])
    state = payload["model_state"]
    model = build_model(din_cfg, mp_cfg, state["base.item_attrs"])
    model.load_state_dict(state)
    encoder = None
    if payload.get("encoder_config"):
        encoder = PatchEncoder(EncoderConfig(**payload["encoder_config"]))
        encoder.load_state_dict(payload["encoder_state"])
    meta = {k: payload[k] for k in ("step", "round", "versions", "extra")}
    return model, encoder, meta
