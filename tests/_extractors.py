"""A cheap frame-step extractor for framework tests: a frame's feature is its own index, through a real model call."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from extract import FrameStepExtractor, StepPolicy, WeightsSpec
from store import FeatureSpec


@dataclass
class Batch:
    """Duck-typed extract.decode.FrameBatch."""

    frames: np.ndarray
    times: np.ndarray
    index: np.ndarray


def batches(n_frames: int, size: int = 7, hw: tuple[int, int] = (4, 6)) -> list[Batch]:
    """25 fps frames whose every pixel equals the frame index (mod 256), in batches of `size`."""
    out = []
    for s in range(0, n_frames, size):
        idx = np.arange(s, min(s + size, n_frames), dtype=np.int64)
        frames = np.broadcast_to((idx % 256).astype(np.uint8)[:, None, None, None], (len(idx), *hw, 3)).copy()
        out.append(Batch(frames, idx / 25.0, idx))
    return out


ECHO_WEIGHTS = WeightsSpec("t", "t.pth", "", "https://example.org/t.pth", "imagenet_v1")  # unpinned


class IndexEcho(FrameStepExtractor):
    """Test extractor: the feature of a frame is its pixel value (= its index), via a real batched 'model'."""

    name = "index_echo"

    def __init__(self, *, fps: float | None = 1.0, count: int | None = None, max_steps: int = 64,
                 batch_size: int = 3, weights: WeightsSpec = ECHO_WEIGHTS, **common: Any) -> None:
        super().__init__(**common)
        self.policy = StepPolicy(fps=fps, max_steps=max_steps, count=count)
        self.batch_size = batch_size
        self.spec = FeatureSpec(name="index_echo", dim=2, max_steps=self.policy.steps, dtype="float32")
        self.calls: list[int] = []
        self.model = self.build_model(lambda: torch.nn.Linear(1, 2), weights)

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames[:, 0, 0, :1].astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        return torch.cat([x, x], dim=1)


def oom_above(limit: int, run: Callable[..., Any], seen: list[int]) -> Callable[..., Any]:
    """`run` that raises CUDA's out-of-memory error for inputs longer than `limit` (records every size tried)."""

    def wrapped(*args: Any) -> Any:
        seen.append(len(args[0]))
        if len(args[0]) > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake, batch {len(args[0])})")
        return run(*args)

    return wrapped
