"""extract._device: "auto"/"cpu"/"cuda" device choice (extractors default to "auto") and when half precision applies."""
from __future__ import annotations

import pytest
import torch

from extract._device import pick_device, use_half
from tests._extractors import IndexEcho


def test_device_choice() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert IndexEcho(random_init=True).device == pick_device("auto")  # extractors default to "auto"
    assert pick_device("cpu") == torch.device("cpu")
    assert not use_half(True, torch.device("cpu")) and use_half(True, torch.device("cuda"))
    with pytest.raises(ValueError, match="not a torch device"):
        pick_device("tpu-ish:x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
