"""Device choice for extractors: "auto" = CUDA when available, else CPU; fp16 only on CUDA."""
from __future__ import annotations

import torch


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve "auto" | "cpu" | "cuda" | "cuda:N" to a torch.device; an unavailable CUDA request is an error."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device {device!r} is not a torch device; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA but torch.cuda.is_available() is False; use 'auto' or 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: only CPU and CUDA are supported")
    return dev


def use_half(half: bool, device: torch.device) -> bool:
    """Whether to run in fp16: only when asked AND on CUDA (CPU fp16 convolutions are slow or unsupported)."""
    return bool(half) and device.type == "cuda"
