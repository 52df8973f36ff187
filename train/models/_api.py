"""Retrieval-model base class, model registry and config helpers shared by MEE, T-MASS and X-Pool.

Batch contract (docs/design.md §3):
- video: for each feature `f` in `model.video_features`: `f` float32 (B, T, D), `f_mask` bool (B, T),
  `f_avail` bool (B,) (status OK); a feature in `FeatureNeeds.pooled` comes pooled over its valid steps, (B, 1, D).
- text: `words` (B, L, Dw) + `words_mask` (B, L) for MEE; `clip_text` (B, Dt) for T-MASS / X-Pool.

Embeddings returned by `encode_text` / `encode_video` are flat `dict[str, Tensor]` whose tensors all have the item
axis first, so a caller can encode in batches and concatenate each key along dim 0.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import torch
from torch import nn

from store.schema import FeatureSpec

Emb = dict[str, torch.Tensor]


class ModelConfigError(ValueError):
    """A model config or its feature dims are invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class FeatureNeeds:
    """The store features a model reads and the batch keys it expects; declared by its config (`.features()`)."""

    video: tuple[str, ...]  # item-axis feature groups served as `f`, `f_mask`, `f_avail`
    text: str  # caption-axis feature group behind the text batch
    text_key: str  # batch key of the text tensor ("words" for MEE, the feature name for CLIP text)
    text_sequence: bool  # True: (B, L, D) plus `<text_key>_mask`; False: one (B, D) vector per caption
    video_optional: bool = False  # True: any non-empty subset of `video` will do (MEE's experts)
    # (video feature, "max" | "mean") the model only pools over valid steps: the data layer serves it pooled when
    # read, (B, 1, D) with mask (B, 1) = "had a valid step", which the model's pooling returns unchanged (exact)
    pooled: tuple[tuple[str, str], ...] = ()


class RetrievalModel(nn.Module, abc.ABC):
    """Text-video retrieval model: encoders, pairwise similarity and the training loss."""

    video_features: tuple[str, ...] = ()  # store feature groups read from the video batch
    text_features: tuple[str, ...] = ()  # store feature groups behind the text batch

    @abc.abstractmethod
    def encode_text(self, text: Mapping[str, torch.Tensor]) -> Emb:
        """Embed a text batch; tensors have the caption axis first."""

    @abc.abstractmethod
    def encode_video(self, video: Mapping[str, torch.Tensor]) -> Emb:
        """Embed a video batch; tensors have the video axis first."""

    @abc.abstractmethod
    def similarity(self, text_emb: Emb, video_emb: Emb, *, chunk: int = 256) -> torch.Tensor:
        """(Nt, Nv) scores, computed `chunk` texts at a time so memory stays bounded."""

    @abc.abstractmethod
    def loss(self, text_emb: Emb, video_emb: Emb) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss for a batch where text i is paired with video i, plus named parts for logging."""

    def clamp_logit_scale(self) -> None:
        """Clamp a learnable logit scale after an optimiser step (no-op for models without one)."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups (one group at `lr` unless a model overrides it)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]


M = TypeVar("M", bound=Callable[..., RetrievalModel])
_REGISTRY: dict[str, Callable[..., RetrievalModel]] = {}
_CONFIGS: dict[str, type] = {}  # model name -> config dataclass (with a `features() -> FeatureNeeds` method)


class UnknownModelError(KeyError):
    """No model is registered under the requested name."""

    def __str__(self) -> str:
        """Plain message (KeyError would quote it)."""
        return str(self.args[0])


def register_model(name: str, *, config: type | None = None) -> Callable[[M], M]:
    """Decorator registering a keyword-only model builder (and its config dataclass) under `name`.

    A duplicate name raises ValueError. `config` lets `model_features` tell which store features the model reads
    before it is built (the data decides the model's input widths, so the model cannot be built first).
    """

    def deco(fn: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"a model is already registered under the name {name!r} ({_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        if config is not None:
            _CONFIGS[name] = config
        return fn

    return deco


def config_class(name: str) -> type:
    """The config dataclass registered with model `name`."""
    if name not in _REGISTRY:
        raise UnknownModelError(f"no model named {name!r}; registered: {', '.join(list_models()) or '(none)'}")
    if name not in _CONFIGS:
        raise ModelConfigError(f"model {name!r} was registered without a config class; pass config= to register_model")
    return _CONFIGS[name]


def model_features(name: str, model_config: Mapping[str, Any] | None = None) -> FeatureNeeds:
    """Store features the model `name` reads with `model_config` (e.g. `text_feature: word2vec`)."""
    return resolve_config(config_class(name), dict(model_config or {}), {}).features()


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> RetrievalModel:
    """Build the model registered under `name`.

    Args:
        name: registry name ("mee", "tmass", "xpool").
        **kwargs: builder keywords: `config=` (the model's config dataclass), `feature_dims=` ({feature: D}) or
            `specs=` ({feature: store FeatureSpec}), plus any config field as an override (e.g. `margin=0.1`).

    Returns:
        The model (in train mode, on CPU).
    """
    try:
        builder = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"no model named {name!r}; registered: {', '.join(list_models()) or '(none)'}") from None
    return builder(**kwargs)


C = TypeVar("C")


def resolve_config(cls: type[C], config: C | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> C:
    """Config dataclass from an instance or mapping, with field overrides; unknown keys raise ModelConfigError."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, cls):
        base = {f: getattr(config, f) for f in names}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ModelConfigError(f"config must be a {cls.__name__} or a mapping, got {type(config).__name__}")
    merged = {**base, **dict(overrides)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ModelConfigError(
            f"{cls.__name__}: unknown key(s) {', '.join(map(repr, unknown))} in model_config; valid keys: {', '.join(sorted(names))}"
        )
    return cls(**merged)


def feature_dims_from(feature_dims: Mapping[str, int] | None,
                      specs: Mapping[str, FeatureSpec | int] | None) -> dict[str, int]:
    """{feature: D} from explicit dims and/or store FeatureSpecs (or bare widths); explicit dims win."""
    dims: dict[str, int] = {}
    for name, spec in (specs or {}).items():
        dims[name] = spec.dim if isinstance(spec, FeatureSpec) else int(spec)
    dims.update({k: int(v) for k, v in (feature_dims or {}).items()})
    return dims
