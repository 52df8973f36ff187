"""open_clip for fine-tuning: model construction, weights (open_clip's own resolution, or explicit random init),
custom model configs, tokenizer, and the reference's frame normalisation.

`train/` never imports `extract/` (docs/design.md layering), so the weights are resolved by open_clip itself:
`pretrained` is an open_clip tag (e.g. "openai": the file is looked up in open_clip's / the Hugging Face cache,
`cache_dir`, and downloaded only when online and TVR_OFFLINE is unset) or a local checkpoint file. Anything that
fails is a ClipLoadError naming the model, the tag or file and the fixes. `random_init=True` builds seeded random
weights (tests) and the run records `{"random": True, "seed": s}` as its weights identity.

`model_cfg` (a dict in open_clip's JSON config format) registers a custom architecture under `model`, e.g. the
tiny config the tests use; it is stored in the run's config so `--resume` / evaluation rebuild the same model.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # reference Normalize (X-Pool / T-MASS init_transform_dict)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLoadError(RuntimeError):
    """open_clip cannot build the requested model or find its weights; the message names them and the fix."""


def register_config(name: str, cfg: Mapping[str, Any]) -> None:
    """Make `name` an open_clip model with architecture `cfg` (open_clip JSON format) in this process."""
    import open_clip

    existing = open_clip.get_model_config(name)
    if existing is not None:
        if json.loads(json.dumps(existing)) != json.loads(json.dumps(dict(cfg))):
            raise ClipLoadError(f"open_clip model {name!r} already exists with another architecture; give the custom "
                                "config (clip_model_cfg) another clip_model name")
        return
    if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        raise ClipLoadError(f"clip_model_cfg for {name!r} needs embed_dim, vision_cfg and text_cfg (open_clip's JSON "
                            f"model config format), got keys {sorted(cfg)}")
    with tempfile.TemporaryDirectory() as d:  # add_model_config reads JSON files; the config is kept in memory
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(dict(cfg)))
        open_clip.add_model_config(path)


def _offline() -> bool:
    return os.environ.get("TVR_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def weights_identity(pretrained: str, random_init: bool, seed: int) -> dict[str, Any]:
    """What the run's CLIP started from: random (seed), a file (name + sha256) or an open_clip tag."""
    if random_init:
        return {"random": True, "seed": int(seed)}
    p = Path(pretrained)
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return {"file": p.name, "sha256": h.hexdigest()}
    return {"open_clip_tag": pretrained}


def build_clip(model: str, pretrained: str, *, random_init: bool = False, seed: int = 0,
               model_cfg: Mapping[str, Any] | None = None, cache_dir: str | None = None) -> nn.Module:
    """The open_clip model `model` with weights `pretrained` (tag or file), or seeded random weights."""
    import open_clip

    if model_cfg:
        register_config(model, model_cfg)
    if model not in open_clip.list_models():
        raise ClipLoadError(f"unknown open_clip model {model!r}; choose one of open_clip.list_models() (e.g. ViT-B-32, "
                            "ViT-B-16) or give clip_model_cfg")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if random_init:  # same architecture as with the tag's weights (OpenAI's need QuickGELU), so a checkpoint
            return open_clip.create_model(model, pretrained=None, force_quick_gelu=quick_gelu(model, pretrained))
        return _load_pretrained(model, pretrained, cache_dir)


def quick_gelu(model: str, pretrained: str) -> bool:
    """Whether `pretrained` (an open_clip tag of `model`) was trained with QuickGELU; False for files / unknown tags."""
    from open_clip.pretrained import get_pretrained_cfg

    if Path(pretrained).is_file():
        return False
    return bool((get_pretrained_cfg(model, pretrained) or {}).get("quick_gelu", False))


def _load_pretrained(model: str, pretrained: str, cache_dir: str | None) -> nn.Module:
    """open_clip.create_model with a tag or a file; errors name what was tried and how to fix it."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    is_file = Path(pretrained).is_file()
    cfg = {} if is_file else get_pretrained_cfg(model, pretrained)
    if not is_file and not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "(none)"
        raise ClipLoadError(f"clip_pretrained {pretrained!r} is neither a file nor an open_clip tag of {model} "
                            f"(tags: {tags}); pass a checkpoint file or --random-init")
    if _offline():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # find cached files only, never download
    try:
        return open_clip.create_model(model, pretrained=pretrained, cache_dir=cache_dir,
                                      force_quick_gelu=quick_gelu(model, pretrained))
    except Exception as exc:  # network, cache miss, or a file that does not fit the architecture
        where = f"file {pretrained}" if is_file else f"open_clip tag {pretrained!r} (cache_dir={cache_dir or 'default'})"
        raise ClipLoadError(
            f"open_clip could not load {model} weights from {where}: {type(exc).__name__}: {str(exc)[:300]}. "
            "Put the checkpoint in open_clip's cache (run once online, or TVR_OFFLINE unset), pass "
            "clip_pretrained=/path/to/file, or train from random weights with --random-init (recorded as such)"
        ) from None


def tokenizer(model: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer of `model` (CLIP BPE, its context length, truncated)."""
    import open_clip

    return open_clip.get_tokenizer(model)


def image_size(clip: nn.Module) -> int:
    """The square input size the vision tower expects."""
    size = getattr(clip.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def normalize_frames(x: torch.Tensor) -> torch.Tensor:
    """float (..., 3, H, W) in [0, 1] -> CLIP mean/std normalised."""
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std
