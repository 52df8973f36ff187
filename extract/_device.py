"""Device choice for extractors: the shared resolver (store.common.pick_device) and when fp16 applies."""
from __future__ import annotations

import torch

from store.common import pick_device as pick_device  # re-exported: extractors take "auto" | "cpu" | "cuda[:N]"


def use_half(half: bool, device: torch.device) -> bool:
    """Whether to run in fp16: only when asked AND on CUDA (CPU fp16 convolutions are slow or unsupported)."""
    return bool(half) and device.type == "cuda"
