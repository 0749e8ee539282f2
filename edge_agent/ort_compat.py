"""Import ``onnxruntime.training.api`` without importing torch.

``onnxruntime/training/__init__.py`` imports ``amp`` and ``optim``, which import torch. The ``api``
submodule itself needs only numpy and the C extension, so we register an empty package module
for ``onnxruntime.training`` (same folder on disk) before importing ``api`` (NOTES.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


def training_available() -> bool:
    """True when the installed onnxruntime is the training build."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "training" / "api" / "__init__.py").is_file()


def import_training_api() -> types.ModuleType:
    """``onnxruntime.training.api``; raises ImportError when the training build is absent."""
    if not training_available():
        raise ImportError("onnxruntime.training is not installed (plain onnxruntime has no training API)")
    import onnxruntime

    name = "onnxruntime.training"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
        pkg.__package__ = name
        sys.modules[name] = pkg
    return importlib.import_module("onnxruntime.training.api")
