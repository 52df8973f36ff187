"""Preprocessing presets, named by `WeightsSpec.preset`: the preprocessing that belongs to a weights file.

Every preset is deterministic (no random crops, no jitter). Other extractor modules add their own presets with
`register_preset(name, description)` at import time (e.g. I3D's, RAFT's, VGGish's log-mel frontend).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """A named preprocessing recipe; `describe` is what provenance and docs show."""

    name: str
    describe: str


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, describe: str) -> Preset:
    """Add (or re-declare identically) a preset; a different description under a taken name raises."""
    old = PRESETS.get(name)
    if old is not None and old.describe != describe:
        raise ValueError(f"preprocessing preset {name!r} is already registered as {old.describe!r}")
    PRESETS[name] = Preset(name, describe)
    return PRESETS[name]


register_preset("imagenet_v1", "resize short side 256 bilinear antialias, centre-crop 224, /255, ImageNet mean/std")
register_preset("imagenet_v2", "resize short side 232 bilinear antialias, centre-crop 224, /255, ImageNet mean/std")
register_preset("open_clip", "open_clip image_transform of the model's preprocess_cfg (eval: resize, centre crop, mean/std)")
register_preset("open_clip_tokenizer", "open_clip.get_tokenizer(model): CLIP BPE, context length 77, truncated")
register_preset("word_tokens", "lowercase; letter/digit runs joined by inner ' or -; GloVe clitic split; OOV dropped")

IMAGENET_SIZES = {"imagenet_v1": (256, 224), "imagenet_v2": (232, 224)}  # preset -> (resize, crop)


def frames_to_tensor(frames: np.ndarray, device: Any = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB numpy -> uint8 (B, 3, H, W) tensor on `device` (copy only where needed)."""
    import torch

    arr = np.ascontiguousarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (B, H, W, 3) RGB, got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2)


def imagenet_classification(x: torch.Tensor, preset: str) -> torch.Tensor:
    """torchvision ImageClassification eval transform on a uint8 (B, 3, H, W) batch (same ops, batched)."""
    import torch
    from torchvision.transforms import functional as F
    from torchvision.transforms import InterpolationMode

    resize, crop = IMAGENET_SIZES[preset]
    x = F.resize(x, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
    x = F.center_crop(x, [crop])
    x = F.convert_image_dtype(x, torch.float)
    return F.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def open_clip_image_transform(model: Any, pretrained_cfg: dict[str, Any] | None = None) -> Callable[[Any], Any]:
    """open_clip's own eval transform (PIL in, tensor out) for `model`, with the pretrained tag's overrides."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    base = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pp = PreprocessCfg(**merge_preprocess_dict(base, pretrained_cfg or {}))
    return open_clip.image_transform(
        pp.size,
        is_train=False,
        mean=pp.mean,
        std=pp.std,
        interpolation=pp.interpolation,
        resize_mode=pp.resize_mode,
        fill_color=pp.fill_color,
    )


def apply_pil_transform(frames: np.ndarray, transform: Callable[[Any], Any], device: Any = "cpu") -> torch.Tensor:
    """Apply a PIL-based transform frame by frame to uint8 (B, H, W, 3); stacked float tensor on `device`."""
    import torch
    from PIL import Image

    return torch.stack([transform(Image.fromarray(np.ascontiguousarray(f))) for f in frames]).to(device)
