"""ResNet-152 appearance features: torchvision ResNet-152 with `fc = Identity`, i.e. the 2048-d global average pool.

Weights: torchvision's ImageNet checkpoints. The full sha256 of these files is not published (torchvision's enum
only carries the 8-hex prefix in the file name, which torch.hub's check_hash verifies with startswith), so the
specs pin that prefix and `resolve_weights` checks it the same way; provenance records the file's full digest.
Preprocessing is the weights' own (`ResNet152_Weights.<variant>.transforms()`), applied batched on the device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extract._api import FrameStepExtractor, WeightsSpec
from extract._registry import register_extractor
from extract._weights import WeightsError, load_state_dict
from extract.sampling import StepPolicy
from extract.transforms import frames_to_tensor, imagenet_classification
from store.schema import FeatureSpec

FEATURE_DIM = 2048


def _spec(tag: str, digest_prefix: str, preset: str, acc1: float) -> WeightsSpec:
    """A torchvision ResNet-152 ImageNet checkpoint."""
    filename = f"resnet152-{digest_prefix}.pth"
    return WeightsSpec(
        name=tag,
        filename=filename,
        sha256=digest_prefix,  # prefix only: checked with startswith, exactly like torch.hub.check_hash
        url=f"https://download.pytorch.org/models/{filename}",
        preset=preset,
        meta={"arch": "resnet152", "torchvision_enum": f"ResNet152_Weights.{tag}", "imagenet_acc1": acc1,
              "num_params": 60192808},
    )


WEIGHTS: dict[str, WeightsSpec] = {
    "IMAGENET1K_V1": _spec("IMAGENET1K_V1", "394f9c45", "imagenet_v1", 78.312),
    "IMAGENET1K_V2": _spec("IMAGENET1K_V2", "f82ba261", "imagenet_v2", 82.284),
}
DEFAULT_VARIANT = "IMAGENET1K_V1"  # the video_features / MEE convention (resize 256, crop 224)


def build_backbone(zero_init_residual: bool = False) -> nn.Module:
    """torchvision ResNet-152 (no weights) with the classifier removed.

    Random-weights runs use `zero_init_residual=True`: with torchvision's default init and eval-mode batch norm
    (running stats 0/1) the 50 residual blocks blow activations past float16's range (inf in the store).
    """
    from torchvision.models import resnet152

    model = resnet152(weights=None, zero_init_residual=zero_init_residual)
    model.fc = nn.Identity()  # output = global average pool (2048)
    return model


def load_without_fc(model: nn.Module, path: Path) -> None:
    """Load a torchvision ResNet-152 checkpoint (with its 1000-way fc) into the fc-less backbone, strictly."""
    sd = load_state_dict(path)
    if "fc.weight" not in sd:
        raise WeightsError(f"weights file {path}: no 'fc.weight' key - not a torchvision ResNet-152 classifier checkpoint")
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True)


@register_extractor("resnet152")
class ResNet152(FrameStepExtractor):
    """2048-d ResNet-152 pool features at 1 fps (at most `max_steps`, spread uniformly beyond)."""

    def __init__(
        self,
        *,
        variant: str = DEFAULT_VARIANT,
        fps: float = 1.0,
        max_steps: int = 64,
        batch_size: int | None = None,
        **common: Any,
    ) -> None:
        """variant: "IMAGENET1K_V1" | "IMAGENET1K_V2"; fps/max_steps: step policy; batch_size: frames per forward
        (None: by device, `FrameStepExtractor.model_batch`)."""
        super().__init__(**common)
        if variant not in WEIGHTS:
            raise ValueError(f"resnet152: unknown variant {variant!r}; choose one of {sorted(WEIGHTS)}")
        self.policy = StepPolicy(fps=fps, max_steps=max_steps)
        self.batch_size = self.model_batch(batch_size)
        self.spec = FeatureSpec(
            name="resnet152", dim=FEATURE_DIM, max_steps=self.policy.steps, dtype="float16", modality="appearance"
        )
        self.model = self.build_model(lambda: build_backbone(self.random_init), WEIGHTS[variant], hub="torch",
                                      load=load_without_fc)
        self.options = {"policy": self.policy.to_dict(), "half": self.half, "layer": "avgpool"}

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """The weights' ImageClassification transform, batched on the device."""
        return imagenet_classification(frames_to_tensor(frames, self.device), self.preset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) -> (B, 2048) pooled features."""
        return self.model(x)
