"""Shared pytest configuration: repo root on sys.path, GPU skip, quiet thread counts."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two cores: keep BLAS/torch from oversubscribing when tests run subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Tests never touch the network: no weights download, in this process and in every Ray worker / subprocess it starts.
os.environ["TVR_OFFLINE"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests when CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
