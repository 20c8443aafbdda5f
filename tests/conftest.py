"""Test settings: 2 threads, no progress bars, a temporary data root for writes."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def mnist_root() -> Path | None:
    """Where real MNIST lies ($CASCADE_DATA or ../shared/data), or None."""
    for root in (os.environ.get("CASCADE_DATA"), SHARED_DATA):
        if root and (Path(root) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
            return Path(root)
    return None


@pytest.fixture
def repo() -> Path:
    return REPO
