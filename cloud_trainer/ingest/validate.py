"""Validation of one incoming patch message: every check names its reason.

Order matters: cheap structural checks and the signature come first (``decode``), so
nothing about an unsigned message is trusted; then the topic, the bundle version, the
trainable spec (names / shapes / dtypes from the bundle manifest), finite values, the
norm bound and the timestamp window.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dccl.errors import DcclError
from dccl.protocol import envelope
from dccl.protocol.errors import ProtocolError
from dccl.protocol.topics import Topics

# {tensor name: (shape, dtype)}, e.g. {"metapatch_phi": ((64,), "float32")}
TrainableSpec = Mapping[str, tuple[tuple[int, ...], str]]


def load_spec(source: str | Path | Mapping | None) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """A trainable spec from a dict or a JSON file ``{name: [shape, dtype]}`` or
    ``{name: {"shape": [...], "dtype": "float32"}}`` (the bundle manifest's form)."""
    if source is None:
        return None
    if isinstance(source, (str, Path)):
        try:
            source = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise DcclError(f"trainable spec {source}: {exc}") from None
        if isinstance(source, dict) and "trainable" in source:
            source = source["trainable"]
    spec: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        for name, entry in dict(source).items():
            shape, dtype = (entry["shape"], entry["dtype"]) if isinstance(entry, dict) else entry
            spec[str(name)] = (tuple(int(d) for d in shape), str(dtype))
    except (TypeError, ValueError, KeyError) as exc:
        raise DcclError(f"trainable spec: bad entry ({exc}); expected {{name: [shape, dtype]}}") from None
    return spec


def load_keys(path: str | Path) -> dict[str, bytes]:
    """Device keys from a JSON file ``{device_id: hex key}``."""
    try:
        raw = json.loads(Path(path).read_text())
        return {str(d): bytes.fromhex(k) for d, k in raw.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise DcclError(f"device keys {path}: {exc}; expected JSON {{device_id: hex key}}") from None


@dataclass
class Validator:
    keys: Mapping[str, bytes]
    topics: Topics = Topics()
    spec: TrainableSpec | None = None
    accepted_bundles: frozenset[str] | None = None     # None: any bundle version
    norm_bound: float | None = 1e3
    max_age_s: float | None = None                       # None: no replay window
    max_future_s: float = 300.0

    def validate(self, topic: str, payload: bytes) -> envelope.Patch:
        """The verified patch, or ProtocolError(reason)."""
        patch = envelope.decode(payload, self.keys.get)
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None or parsed[0] != patch.device_id:
            raise ProtocolError("topic_mismatch", f"topic {topic!r} for device {patch.device_id!r}")
        if self.accepted_bundles is not None and patch.bundle_version not in self.accepted_bundles:
            raise ProtocolError("bundle_rejected", f"bundle version {patch.bundle_version!r} not accepted")
        if self.spec is not None:
            if set(patch.tensors) != set(self.spec):
                raise ProtocolError("spec_mismatch", f"tensors {sorted(patch.tensors)} != {sorted(self.spec)}")
            for name, (shape, dtype) in self.spec.items():
                t = patch.tensors[name]
                if t.shape != tuple(shape) or t.dtype != np.dtype(dtype):
                    raise ProtocolError("spec_mismatch", f"{name}: {t.shape} {t.dtype} != {tuple(shape)} {dtype}")
        for name, t in patch.tensors.items():
            if not np.isfinite(t).all():
                raise ProtocolError("non_finite", f"tensor {name!r}")
            if self.norm_bound is not None:
                norm = float(np.linalg.norm(t.astype(np.float64)))
                if norm > self.norm_bound:
                    raise ProtocolError("norm_bound", f"|{name}| = {norm:.3g} > {self.norm_bound}")
        for name, v in patch.metrics.items():
            if not math.isfinite(v):
                raise ProtocolError("non_finite", f"metric {name!r}")
        now_ms = time.time() * 1000
        if patch.timestamp_ms > now_ms + self.max_future_s * 1000:
            raise ProtocolError("stale", f"timestamp {patch.timestamp_ms} is in the future")
        if self.max_age_s is not None and patch.timestamp_ms < now_ms - self.max_age_s * 1000:
            raise ProtocolError("stale", f"timestamp {patch.timestamp_ms} older than {self.max_age_s} s")
        return patch
