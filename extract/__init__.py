"""tvr feature extractors: registry, weights resolution, streaming sessions; importing registers every extractor."""
from __future__ import annotations

import importlib

from extract._api import (
    CaptionExtractor,
    Extractor,
    FrameStepExtractor,
    FrameStepSession,
    ItemSession,
    StepPolicy,
    WeightsSpec,
)
from extract._registry import create_extractor, extractor_class, list_extractors, register_extractor
from extract._weights import WeightsError, resolve_weights

# Own extractors: plain imports (registration happens on import).
from extract import clip_frames, clip_text, resnet152, word_vectors  # noqa: E402,F401  isort: skip

# Extractors written in parallel: a missing MODULE is tolerated until integration; any other error propagates.
for _mod in ("i3d", "vggish", "dlib_face"):
    try:
        importlib.import_module(f"extract.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"extract.{_mod}":
            raise
del _mod

__all__ = [
    "CaptionExtractor",
    "Extractor",
    "FrameStepExtractor",
    "FrameStepSession",
    "ItemSession",
    "StepPolicy",
    "WeightsError",
    "WeightsSpec",
    "create_extractor",
    "extractor_class",
    "list_extractors",
    "register_extractor",
    "resolve_weights",
]
