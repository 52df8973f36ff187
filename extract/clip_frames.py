"""CLIP frame features (open_clip): unnormalised `encode_image` of 12 uniformly spaced frames, float32.

T-MASS needs the raw norms, so nothing is L2-normalised here. The model is `open_clip.create_model(name)` with the
weights of a pretrained tag (default ViT-B-32 "openai") or a local file, resolved by `extract._weights` (hub cache:
open_clip's). Preprocessing is open_clip's own eval transform for the model and tag (PIL, bicubic shortest-side
resize, centre crop, CLIP mean/std). `load_clip` is shared with `extract.clip_text` so both use the same weights.

Activation. OpenAI-trained CLIP uses QuickGELU (x * sigmoid(1.702 x)), but open_clip's plain configs (``ViT-B-32``)
build nn.GELU unless told otherwise; the weights decide, so the activation is a fact of the weights spec
(``meta["quick_gelu"]``, from open_clip's pretrained config of the tag). A file given as ``pretrained=<file>`` gets
the spec of the tag whose pinned sha256 it has (OpenAI's release files); for any other file the activation cannot be
read from the weights and must be stated (``quick_gelu=True/False``, or ``pretrained=<tag>`` with
``weights_path=<file>`` to take that tag's spec for a converted copy). The activation actually built is recorded in
provenance, and one that differs from the spec's becomes part of the variant.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from extract._api import Extractor, FrameStepExtractor, WeightsSpec
from extract._registry import register_extractor
from extract._weights import WeightsError, expected_digest, sha256_file
from extract.sampling import StepPolicy
from extract.transforms import apply_pil_transform, open_clip_image_transform
from store.schema import FeatureSpec

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
HF_FILENAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's HF hub file names

_CACHE: dict[tuple[Any, ...], tuple[nn.Module, WeightsSpec, dict[str, Any]]] = {}  # one model per process


def _is_file_arg(pretrained: str) -> bool:
    """Whether `pretrained` names a local file rather than an open_clip tag."""
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.isfile(pretrained)


def clip_weights_spec(model_name: str, pretrained: str) -> WeightsSpec:
    """The WeightsSpec of an open_clip (model, tag) pair, or of a local checkpoint file."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if model_name not in open_clip.list_models():
        raise ValueError(f"clip: unknown open_clip model {model_name!r}; see open_clip.list_models()")
    if _is_file_arg(pretrained):
        return _file_spec(model_name, Path(pretrained))
    cfg = get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(
            f"clip: {pretrained!r} is neither a pretrained tag of {model_name} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name))}) nor a checkpoint file"
        )
    url = str(cfg.get("url") or "")
    digest = ""
    if "openaipublic" in url:
        digest = url.split("/")[-2]  # OpenAI URLs carry the file's full sha256
    meta = {
        "model": model_name,
        "pretrained": pretrained,
        "hf_hub": str(cfg.get("hf_hub") or ""),
        "hf_filenames": HF_FILENAMES,
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "preprocess": {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg},
    }
    filename = Path(url).name if url else f"{model_name}-{pretrained}.bin"
    return WeightsSpec(name=f"{model_name}.{pretrained}", filename=filename, sha256=digest, url=url or
                       f"https://huggingface.co/{meta['hf_hub'].strip('/')}", preset="open_clip", meta=meta)


def tag_specs(model_name: str) -> list[WeightsSpec]:
    """The WeightsSpec of every open_clip pretrained tag of `model_name`."""
    import open_clip

    return [clip_weights_spec(model_name, t) for t in open_clip.list_pretrained_tags_by_model(model_name)]


def _file_spec(model_name: str, path: Path) -> WeightsSpec:
    """A local checkpoint: the spec of the tag whose full pinned sha256 it has, else a file spec whose activation
    is unknown (meta["quick_gelu"] None)."""
    if path.is_file():
        digest = sha256_file(path)
        for spec in tag_specs(model_name):
            if len(spec.sha256) == 64 and spec.sha256 == digest:
                return spec
    return WeightsSpec(
        name=f"{model_name}.file", filename=path.name, sha256="", url=str(path),
        preset="open_clip", meta={"model": model_name, "pretrained": "file", "quick_gelu": None},
    )


def _activation(model_name: str, spec: WeightsSpec, quick_gelu: bool | None) -> bool:
    """Whether to force QuickGELU: the caller's choice, else the spec's fact, else the model config's own."""
    import open_clip

    if quick_gelu is not None:
        return bool(quick_gelu)
    fact = spec.meta.get("quick_gelu")
    if fact is not None:
        return bool(fact)
    if (open_clip.get_model_config(model_name) or {}).get("quick_gelu", False):
        return True  # a *-quickgelu config: the activation is part of the architecture
    raise ValueError(
        f"clip: stage 'build model': the checkpoint {spec.url} matches no pinned {model_name} release, so its "
        f"activation is unknown (OpenAI-trained weights need QuickGELU, most others GELU). Say which: "
        f"quick_gelu=True or False, or pretrained=<tag> with weights_path=<file> to use that tag's spec"
    )


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the built model's MLPs use open_clip's QuickGELU (else nn.GELU)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (OpenAI's released CLIP .pt files are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def load_clip_checkpoint(model: nn.Module, path: Path, spec: WeightsSpec) -> None:
    """Load a verified checkpoint strictly: state dicts with weights_only=True; a TorchScript archive only when
    `spec` pins its full sha256 (OpenAI's release files: the digest already matched, so it is that exact file)."""
    import open_clip

    if not is_torchscript(path):
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        return
    pinned = expected_digest(spec)
    if len(pinned) != 64 or sha256_file(path) != pinned:  # an explicit file is accepted unpinned: not this one
        raise WeightsError(
            f"clip: {path} is a TorchScript archive; tvr loads those only when their sha256 equals a full sha256 "
            "pin (the OpenAI release files of the built-in tags). Put it in --weights-dir and use its pretrained tag, "
            "or pass open_clip's safetensors/state-dict file instead"
        )
    sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    for key in ("input_resolution", "context_length", "vocab_size"):  # JIT-only attributes, not weights
        sd.pop(key, None)
    model.load_state_dict(sd, strict=True)


def load_clip(ex: Extractor, model_name: str, pretrained: str, quick_gelu: bool | None = None) -> nn.Module:
    """Build (or reuse within this process) the open_clip model for `ex`'s weights options; sets its provenance."""
    import open_clip

    spec = clip_weights_spec(model_name, pretrained)
    if _is_file_arg(pretrained) and ex.weights_path is None:
        ex.weights_path = pretrained
    qg = _activation(model_name, spec, quick_gelu)
    ex.resolve(spec, "open_clip", path=ex.weights_path)  # first: random_init="missing" may turn it random
    key = (model_name, pretrained, qg, str(ex.weights_path), str(ex.weights_dir), ex.random_init, ex.random_reason,
           ex.seed, str(ex.device), ex.half)
    if key in _CACHE:
        model, ex.weights, ex.weights_identity = _CACHE[key]
    else:
        def make() -> nn.Module:
            return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=qg, device="cpu")

        model = ex.build_model(make, spec, hub="open_clip", load=lambda m, p: load_clip_checkpoint(m, p, spec))
        _CACHE[key] = (model, spec, dict(ex.weights_identity))
    built = uses_quick_gelu(model)
    ex.quick_gelu = built  # type: ignore[attr-defined]  # the activation actually built, recorded in options
    ex.preset, ex.variant = spec.preset, spec.name
    if spec.meta.get("quick_gelu") is None or bool(spec.meta["quick_gelu"]) != built:  # not the spec's own
        ex.variant = f"{spec.name}+{'quick_gelu' if built else 'gelu'}"
    return model


@register_extractor("clip")
class ClipFrames(FrameStepExtractor):
    """Unnormalised CLIP image embeddings of `count` (default 12) uniformly spaced frames."""

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        pretrained: str = DEFAULT_PRETRAINED,
        quick_gelu: bool | None = None,
        count: int = 12,
        batch_size: int | None = None,
        **common: Any,
    ) -> None:
        """model/pretrained: open_clip name and tag (or a checkpoint file); count: frames per item; batch_size:
        frames per forward (None: by device, `FrameStepExtractor.model_batch`)."""
        super().__init__(**common)
        self.policy = StepPolicy(count=count)
        self.batch_size = self.model_batch(batch_size)
        self.model = load_clip(self, model, pretrained, quick_gelu)
        assert self.weights is not None
        self.transform: Callable[[Any], Any] = open_clip_image_transform(
            self.model, dict(self.weights.meta.get("preprocess", {}))
        )
        dim = int(self.model.visual.output_dim)
        self.spec = FeatureSpec(name="clip", dim=dim, max_steps=self.policy.steps, dtype="float32", modality="clip")
        self.options = {"model": model, "pretrained": str(self.weights.meta.get("pretrained", pretrained)),
                        "quick_gelu": self.quick_gelu, "policy": self.policy.to_dict(), "half": self.half,
                        "normalized": False}

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """open_clip's eval transform per frame (PIL), stacked on the device."""
        return apply_pil_transform(frames, self.transform, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D) unnormalised image embeddings."""
        return self.model.encode_image(x, normalize=False)
