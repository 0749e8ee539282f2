"""``dccl export``: a trained cloud checkpoint -> a versioned device bundle (see onnx_export.bundle)."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from dccl.errors import DcclError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a cloud checkpoint as a device bundle: ORT training artifacts, the portable train-step "
        "graph, the inference and encoder models and manifest.json (hashes, trainable names and shapes, "
        "input schema, optimiser settings, reference values). When every patch sits in the prediction MLP "
        "(the default), the train graphs are the MLP head on trunk features and the bundle carries the "
        "trunk (a device computes each sample's features once per round). The bundle is checked before "
        "it is moved into place: both edge backends must reproduce the PyTorch reference."
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="cloud checkpoint (.pt) from the trainer")
    parser.add_argument("--out", required=True, type=Path, help="bundle directory to create (must not exist or be empty)")
    parser.add_argument("--version", help="bundle version (default: r<round>-s<step>-<first 8 hex of the checkpoint sha256>)")
    parser.add_argument("--steps", type=int, help="on-device AdamW steps per round (default: the checkpoint's device config, else DeviceTrainConfig)")
    parser.add_argument("--lr", type=float, help="on-device learning rate (default: the checkpoint's device config, else DeviceTrainConfig)")
    parser.add_argument("--weight-decay", type=float, help="on-device AdamW weight decay (default: DeviceTrainConfig)")
    parser.add_argument("--since",
                        help="where the devices' fresh window starts — unix seconds or ISO 8601 "
                             "(2026-12-01T00:00:00Z): a board trains on its positives from then on, the "
                             "older ones are history only (the manifest's local_data.since). Typically the "
                             "time up to which the checkpoint's training data reaches. Default: no window")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out directory")


def _since(text: str) -> float:
    """--since: unix seconds, or an ISO 8601 time with a UTC offset (or Z)."""
    import datetime as dt
    import math

    try:
        value = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise DcclError(
                f"--since {text!r}: expected unix seconds or an ISO 8601 time such as 2026-12-01T00:00:00Z") from None
        if when.tzinfo is None:
            raise DcclError(f"--since {text!r}: give a UTC offset or Z (a board's clock is UTC)")
        value = when.timestamp()
    if not math.isfinite(value) or value < 0:
        raise DcclError(f"--since {text!r}: must be a finite time at or after 1970")
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    from cloud_trainer.checkpoint import load_checkpoint
    from cloud_trainer.personalize import DeviceTrainConfig
    from onnx_export.bundle import write_bundle

    since = None if args.since is None else _since(args.since)     # bad input fails before any work
    model, encoder, meta = load_checkpoint(args.checkpoint)
    # The device training settings the checkpoint was trained for (`dccl cloud train` records its config),
    # then the command line's overrides.
    trained_config = (meta.get("extra") or {}).get("config") or {}
    trained_for = trained_config.get("device") or {}
    data = trained_config.get("data") or {}
    # How the cloud built the devices' samples when it chose the budget; a board builds its own alike.
    local_data = {k: data[k] for k in ("neg", "val_frac")} if all(k in data for k in ("neg", "val_frac")) else None
    if since is not None:
        if local_data is None:
            raise DcclError(f"--since: checkpoint {args.checkpoint} does not record how the cloud built its samples "
                            "(config.data.neg / val_frac), so the bundle can carry no local_data to put it in")
        local_data["since"] = since
    overrides = {k: v for k, v in (("steps", args.steps), ("lr", args.lr), ("weight_decay", args.weight_decay))
                 if v is not None}
    try:
        cfg = DeviceTrainConfig(**{**trained_for, **overrides})
    except ValueError as exc:
        raise DcclError(str(exc)) from None
    digest = _sha256(args.checkpoint)
    version = args.version or f"r{meta['round']}-s{meta['step']}-{digest[:8]}"
    if not version.strip() or "/" in version:
        raise DcclError(f"--version {version!r}: must be a non-empty name without '/'")
    manifest = write_bundle(model, encoder, args.out, version=version, cfg=cfg, overwrite=args.force,
                            local_data=local_data,
                            source={"checkpoint": str(args.checkpoint), "checkpoint_sha256": digest,
                                    "step": meta["step"], "round": meta["round"]})
    size = sum(e["size"] for e in manifest["files"].values())
    (name, spec), = manifest["trainable"].items()
    print(f"bundle {manifest['bundle_version']} -> {args.out} ({len(manifest['files'])} files, {size / 1024:.0f} KiB); "
          f"trainable {name} {spec['shape']}; train graphs on "
          f"{'trunk features' if manifest['models'].get('trunk') else 'raw inputs'}; contract check passed (ort-training, portable)")
    return 0
