"""Model registry: `@register_model("name")`, `create_model(name, **kw)`, `list_models()`.

Importing this package registers every model ("mee", "tmass", "xpool"); the modules are imported explicitly.
"""
from __future__ import annotations

from train.models._api import (
    FeatureNeeds,
    ModelConfigError,
    RetrievalModel,
    UnknownModelError,
    create_model,
    list_models,
    model_features,
    register_model,
)
from train.models.mee import MEE, MEEConfig  # noqa: E402  (registers "mee")
from train.models.xpool import XPoolConfig, XPoolHead, XPoolModel  # noqa: E402  (registers "xpool")
from train.models.tmass import TMASS, TMASSConfig  # noqa: E402  (registers "tmass")

__all__ = [
    "FeatureNeeds",
    "MEE",
    "MEEConfig",
    "ModelConfigError",
    "RetrievalModel",
    "TMASS",
    "TMASSConfig",
    "UnknownModelError",
    "XPoolConfig",
    "XPoolHead",
    "XPoolModel",
    "create_model",
    "list_models",
    "model_features",
    "register_model",
]
