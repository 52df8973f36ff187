"""Raw RGB frames for fine-tuning CLIP end to end (T-MASS / X-Pool as the papers train them): uint8, one row per item.

Each step is one frame, resized so its short side is `size` (bicubic, antialiased) and centre-cropped to a
`size` x `size` square: exactly the reference's test transform (X-Pool / T-MASS `clip_test`: Resize(224, BICUBIC),
CenterCrop(224)) before normalisation, so evaluation on stored frames matches the reference. The reference's
train-time RandomResizedCrop(scale 0.5-1) + horizontal flip then runs on the stored square (train.finetune_data);
unlike the reference it cannot reach the parts of a wide frame outside the centre square (documented in
train/README.md).

Values are (T, size*size*3) uint8 (one flattened HWC frame per step; `frame_shape()` gives (size, size, 3)),
stored raw with the store's zstd codec. Sampling (recorded in provenance `options.policy`):
- `count=12` (default): the reference's 12 uniform test frames (segment middles), as the `clip` feature takes;
- `fps=F, max_steps=M`: F frames per second, at most M spread uniformly, so training can draw the reference's
  random one-frame-per-segment samples (train.finetune_data picks segment middles at test time).
There is no model, so there are no weights: provenance names none, and --random-weights changes nothing.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from extract._api import FrameStepExtractor
from extract._registry import register_extractor
from extract.sampling import StepPolicy
from extract.transforms import register_preset
from store.schema import FeatureSpec

NO_WEIGHTS = {"file": "none (raw pixels, no model)", "sha256": ""}  # the store needs a weights identity
PRESET = register_preset("frames_rgb", "resize short side to size, bicubic antialias, centre-crop size x size, uint8 RGB HWC")


@register_extractor("frames")
class Frames(FrameStepExtractor):
    """uint8 RGB frames at a fixed short side, centre-cropped square, at the step times of a StepPolicy."""

    in_default_features: ClassVar[bool] = False  # 150 kB per frame: extracted only when asked for (--features frames)
    has_weights: ClassVar[bool] = False  # no model: the weights identity is NO_WEIGHTS whatever random_init says

    def __init__(self, *, size: int = 224, count: int | None = 12, fps: float | None = None, max_steps: int = 48,
                 batch_size: int = 32, **common: Any) -> None:
        """size: short side and crop; count: uniform frames per item, or fps (+ max_steps) for a rate."""
        common.setdefault("device", "cpu")  # resizing is cheap; moving pixels to a GPU and back is not
        super().__init__(**common)
        if size < 8:
            raise ValueError(f"frames: size must be >= 8 pixels, got {size}")
        if fps is not None:
            count = None
        self.policy = StepPolicy(fps=fps, max_steps=max_steps, count=count)
        self.size, self.batch_size = int(size), self.model_batch(batch_size)
        self.half = False  # pixels stay uint8
        self.spec = FeatureSpec(name="frames", dim=self.size * self.size * 3, max_steps=self.policy.steps,
                                dtype="uint8", modality="frames")
        self.weights_identity = dict(NO_WEIGHTS)
        self.preset, self.variant = PRESET.name, f"rgb{self.size}"
        self.options = {"size": self.size, "layout": "HWC", "resize": "short side, bicubic, antialias",
                        "crop": "center square", "policy": self.policy.to_dict()}

    def frame_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of one stored frame."""
        return (self.size, self.size, 3)

    def preprocess(self, frames: np.ndarray) -> Any:
        """uint8 (B, H, W, 3) -> uint8 (B, size*size*3): short side to `size` (bicubic), centre square crop."""
        return resize_center_crop(frames, self.size)

    def forward(self, x: Any) -> Any:
        """Identity: the pixels are the feature."""
        return x

    def prepare(self, frames: np.ndarray) -> Any:
        """`preprocess` only (no fp16 cast: pixels stay uint8)."""
        return self.preprocess(frames)

    def infer(self, x: Any) -> np.ndarray:
        """uint8 (B, size*size*3) numpy."""
        return x.cpu().numpy()


def resize_center_crop(frames: np.ndarray, size: int) -> Any:
    """uint8 (B, H, W, 3) RGB -> uint8 torch (B, size*size*3) HWC: Resize(size, BICUBIC) then CenterCrop(size)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from extract.transforms import frames_to_tensor

    x = frames_to_tensor(frames)  # (B, 3, H, W) uint8
    h, w = x.shape[-2:]
    if min(h, w) != size:
        x = F.resize(x, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = F.center_crop(x, [size, size])
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1).contiguous().to(torch.uint8)
