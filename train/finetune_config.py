"""Configuration of a CLIP fine-tuning run (`tvr-train tmass|xpool --finetune-clip`): one dataclass, reference
defaults (T-MASS / X-Pool config/all_config.py and READMEs), YAML round trip and the resume check."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

FINETUNE_KEY = "finetune_clip"  # marks a fine-tuning run in RUN/config.yaml (tvr-train eval dispatches on it)
RESUME_FREE = ("device", "prefetch", "eval_batch", "eval_chunk")  # do not change what is trained


class FinetuneConfigError(ValueError):
    """A fine-tuning config value is invalid; the message names the key and the file."""


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run needs except the store path; defaults are the reference's."""

    model: str = "tmass"  # tmass | xpool (the head)
    model_config: dict[str, Any] = field(default_factory=dict)  # head config fields (TMASSConfig / XPoolConfig)
    clip_model: str = "ViT-B-32"  # open_clip architecture (ViT-B-16 selectable)
    clip_pretrained: str = "openai"  # open_clip tag or checkpoint file (open_clip resolves it)
    clip_model_cfg: dict[str, Any] = field(default_factory=dict)  # custom open_clip architecture for clip_model
    random_init: bool = False  # seeded random CLIP weights (tests); recorded as {"random": True, "seed": seed}
    frames_feature: str = "frames"  # store feature of uint8 frames (extract/frames.py)
    num_frames: int = 12  # frames per video fed to CLIP (reference num_frames)
    epochs: int = 5
    batch_size: int = 32  # GLOBAL batch: world size x per-rank batch
    lr: float = 1e-5  # head (reference noclip_lr; 3e-5 in its MSR-VTT-9k README)
    clip_lr: float = 1e-6  # every CLIP parameter (reference clip_lr)
    weight_decay: float = 0.2  # AdamW, eps 1e-6, on every parameter (as the reference)
    warmup: float = 0.1  # cosine schedule with this warm-up fraction of all steps
    grad_clip: float = 1.0
    caption_sampling: str = "all_pairs"  # all_pairs (reference loader) | per_video
    seed: int = 24
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto: bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing), off on CPU | off
    grad_checkpointing: bool = False  # activation checkpointing in both CLIP towers (less memory, ~30% slower)
    prefetch: int = 2  # batches read ahead by a loader thread (loader memory ~ (prefetch + 1) batches of frames)
    eval_batch: int = 32  # videos (and texts x 8) per encoding batch at evaluation
    eval_chunk: int = 256  # texts per similarity chunk
    val_split: str = "val"  # picks the best checkpoint ("" = none: the last epoch is the best)
    test_split: str = "test"


_CHOICES = {"model": ("tmass", "xpool"), "caption_sampling": ("all_pairs", "per_video"),
            "device": ("auto", "cpu", "cuda"), "amp": ("auto", "off")}


def field_names() -> list[str]:
    """FinetuneConfig field names."""
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def build(overrides: Mapping[str, Any], where: str = "config") -> FinetuneConfig:
    """Defaults updated by `overrides`; unknown keys and bad values raise FinetuneConfigError naming them."""
    names = set(field_names())
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise FinetuneConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; fine-tuning keys: "
                                  f"{', '.join(sorted(names))}")
    base = FinetuneConfig()
    values: dict[str, Any] = {}
    for k, v in overrides.items():
        default = getattr(base, k)
        try:
            values[k] = _coerce(default, v)
        except (TypeError, ValueError):
            raise FinetuneConfigError(f"{where}: key {k!r} must be {type(default).__name__}, got {v!r}") from None
        if k in _CHOICES and values[k] not in _CHOICES[k]:
            raise FinetuneConfigError(f"{where}: key {k!r} must be one of {_CHOICES[k]}, got {values[k]!r}")
    cfg = dataclasses.replace(base, **values)
    checks = [("epochs", cfg.epochs >= 1), ("batch_size", cfg.batch_size >= 2), ("lr", cfg.lr > 0),
              ("clip_lr", cfg.clip_lr >= 0), ("num_frames", cfg.num_frames >= 1), ("warmup", 0 <= cfg.warmup < 1),
              ("prefetch", cfg.prefetch >= 0), ("eval_batch", cfg.eval_batch >= 1)]
    for key, ok in checks:
        if not ok:
            raise FinetuneConfigError(f"{where}: key {key!r} has an invalid value {getattr(cfg, key)!r}")
    return cfg


def _coerce(default: Any, v: Any) -> Any:
    """Convert `v` to the type of `default` (bools strictly)."""
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise TypeError
        return v
    if isinstance(default, dict):
        if not isinstance(v, Mapping):
            raise TypeError
        return dict(v)
    if isinstance(default, int):
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
            raise TypeError
        return int(v)
    if isinstance(default, float):
        if isinstance(v, bool):
            raise TypeError
        return float(v)
    return str(v)


def save(cfg: FinetuneConfig, path: Path, extra: Mapping[str, Any]) -> None:
    """RUN/config.yaml: the resolved config, the fine-tuning marker and run facts (store, store_id, weights)."""
    path.write_text(yaml.safe_dump({FINETUNE_KEY: True, **asdict(cfg), **dict(extra)}, sort_keys=False))


def load(path: Path) -> tuple[FinetuneConfig, dict[str, Any]]:
    """(config, extra keys) from RUN/config.yaml written by `save`."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FinetuneConfigError(f"{path}: cannot read the run config ({exc})") from None
    if not isinstance(data, dict) or not data.get(FINETUNE_KEY):
        raise FinetuneConfigError(f"{path} is not a fine-tuning run config (no '{FINETUNE_KEY}: true')")
    names = set(field_names())
    extra = {k: v for k, v in data.items() if k not in names and k != FINETUNE_KEY}
    return build({k: v for k, v in data.items() if k in names}, where=str(path)), extra


def resume_changes(saved: FinetuneConfig, new: FinetuneConfig) -> list[str]:
    """'key: saved -> new' for each key a resume would change that alters training."""
    return [f"{k}: {getattr(saved, k)!r} -> {getattr(new, k)!r}" for k in field_names()
            if k not in RESUME_FREE and getattr(saved, k) != getattr(new, k)]


def is_finetune_run(run: Path) -> bool:
    """Whether RUN/config.yaml is a fine-tuning run's."""
    path = run / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and bool(data.get(FINETUNE_KEY))
