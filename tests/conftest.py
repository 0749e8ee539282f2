"""Shared pytest fixtures (keep minimal)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Root of the real datasets (`$DCCL_SHARED_DATASETS` or ../shared/datasets beside the repo).

    Real data is read in place, never copied into the repository.
    """
    env = os.environ.get("DCCL_SHARED_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
