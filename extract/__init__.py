"""tvr feature extractors: registry, weights resolution, streaming sessions; importing registers every extractor."""
from __future__ import annotations

from extract._api import (
    RANDOM_IF_MISSING,
    CaptionExtractor,
    Extractor,
    FrameStepExtractor,
    FrameStepSession,
    ItemSession,
    RandomWeightsWarning,
    StepPolicy,
    WeightsSpec,
)
from extract._registry import create_extractor, extractor_class, list_extractors, register_extractor, weights_available
from extract._weights import UnpinnedWeightsWarning, WeightsError, WeightsNotFound, resolve_weights

# Registration happens on import.
from extract import clip_frames, clip_text, dlib_face, frames, i3d, resnet152, vggish, word_vectors  # noqa: E402,F401  isort: skip

__all__ = [
    "CaptionExtractor",
    "Extractor",
    "FrameStepExtractor",
    "FrameStepSession",
    "ItemSession",
    "RANDOM_IF_MISSING",
    "RandomWeightsWarning",
    "StepPolicy",
    "UnpinnedWeightsWarning",
    "WeightsError",
    "WeightsNotFound",
    "WeightsSpec",
    "create_extractor",
    "extractor_class",
    "list_extractors",
    "register_extractor",
    "resolve_weights",
    "weights_available",
]
