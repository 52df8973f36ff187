"""Training configuration: one dataclass, per-model defaults, YAML load/save with key checking.

Precedence (lowest first): per-model defaults (`MODEL_DEFAULTS`), a named recipe (`RECIPES`, `--recipe` or the
`recipe` key), `--config FILE.yaml`, command-line flags.
The resolved config is saved as `RUN/config.yaml` and is what `--resume` and `tvr-train eval` read back.

Defaults follow the reference implementations (see docs): MEE uses Adam, lr 1e-4 (the MSR-VTT README recipe is
lr 4e-4 with batch 64 and 100 epochs), lr x0.95 per epoch, batch 128, 50 epochs and COCO-style image mixing at
rate 0.5. T-MASS/X-Pool use AdamW (weight decay 0.2), cosine schedule with 10% linear warm-up, gradient
clipping at 1.0, batch 32, 5 epochs, lr 1e-5 (the non-CLIP lr; 3e-5 in the MSR-VTT-9k README), and no images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from store.common import ConfigError, load_yaml

MODELS = ("mee", "tmass", "xpool")


@dataclass
class TrainConfig:
    """Everything a run needs except the store path."""

    model: str = "mee"  # mee | tmass | xpool
    model_config: dict[str, Any] = field(default_factory=dict)  # fields of the model's config dataclass
    recipe: str = ""  # named reference recipe (RECIPES) applied over the model defaults; "" = none
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    schedule: str = "exponential"  # exponential (x lr_decay per epoch) | cosine (per step, with warm-up)
    lr_decay: float = 0.95  # per-epoch factor for the exponential schedule
    warmup: float = 0.0  # warm-up fraction of all steps for the cosine schedule
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1
    image_rate: float = 0.5  # alpha: min(n_images, alpha * n_videos) random images mixed in per epoch; 0 = off
    caption_sampling: str = "per_video"  # per_video: one random caption per video per epoch | all_pairs: every pair
    drop_last: bool = False  # drop a partial final batch (the MEE reference does; one of < 2 pairs is always dropped)
    eval_chunk: int = 256  # texts per similarity chunk at evaluation
    cache_bytes: int = 2 * 1024**3  # memory budget of feature reads (--cache-gb): cached when they fit, else streamed
    train_reads: str = "auto"  # auto: cached when the features fit cache_bytes, else streamed | cached | stream
    zero_fill_missing: bool = False  # ablation: missing modalities as zero vectors marked available
    val_split: str = "val"  # split used to pick the best checkpoint (never test)
    test_split: str = "test"  # split for the final metrics.json


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mee": dict(
        epochs=50, batch_size=128, lr=1e-4, optimizer="adam", weight_decay=0.0, schedule="exponential",
        lr_decay=0.95, warmup=0.0, grad_clip=0.0, image_rate=0.5, seed=1,
    ),
    "tmass": dict(
        epochs=5, batch_size=32, lr=1e-5, optimizer="adamw", weight_decay=0.2, schedule="cosine",
        lr_decay=1.0, warmup=0.1, grad_clip=1.0, image_rate=0.0, seed=24,
    ),
    "xpool": dict(
        epochs=5, batch_size=32, lr=1e-5, optimizer="adamw", weight_decay=0.2, schedule="cosine",
        lr_decay=1.0, warmup=0.1, grad_clip=1.0, image_rate=0.0, seed=24,
    ),
}

# Reference recipes (paper READMEs), applied over MODEL_DEFAULTS and under --config / flags.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "mee": {
        # MEE README, MSR-VTT with COCO; the reference DataLoader drops the last partial batch
        "msrvtt": dict(lr=4e-4, batch_size=64, epochs=100, image_rate=0.5, drop_last=True),
        "lsmdc": dict(lr=1e-4, batch_size=512, epochs=50, drop_last=True),  # MEE README, MPII/LSMDC
    },
    # T-MASS / X-Pool references train on every (video, caption) pair per epoch
    "tmass": {
        "msrvtt": dict(lr=3e-5, caption_sampling="all_pairs", model_config={"support_weight": 0.8}),  # README, 9k
        "lsmdc": dict(lr=1e-5, caption_sampling="all_pairs",
                      model_config={"support_weight": 0.0, "prior": "normal", "prior_std": 3e-3}),
        "didemo": dict(lr=1e-5, caption_sampling="all_pairs", model_config={"support_weight": 0.0, "dropout": 0.4}),
    },
    "xpool": {
        "msrvtt": dict(lr=3e-5, caption_sampling="all_pairs"),  # X-Pool README, MSR-VTT-9k
        "lsmdc": dict(lr=1e-5, caption_sampling="all_pairs"),
    },
}

_CHOICES = {
    "model": MODELS,
    "optimizer": ("adam", "adamw"),
    "schedule": ("exponential", "cosine"),
    "device": ("auto", "cpu", "cuda"),
    "caption_sampling": ("per_video", "all_pairs"),
    "train_reads": ("auto", "cached", "stream"),
}


# keys a --resume may change: they do not alter what is trained (where it runs, eval chunking). cache_bytes and
# train_reads are not free: streamed reads shuffle within a buffer sized from the budget
RESUME_FREE = ("device", "eval_chunk")


def _resolved_model_config(model: str, model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of the model's config dataclass, defaults filled in."""
    from train.models._api import config_class, resolve_config

    return asdict(resolve_config(config_class(model), dict(model_config), {}))


def resume_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """'key: saved -> new' for every key a resume would change that alters training (model_config key by key)."""
    out = []
    for key in field_names():
        if key in RESUME_FREE:
            continue
        a, b = getattr(saved, key), getattr(new, key)
        if key == "model_config":  # compared after resolving defaults, so an explicit default is no change
            a, b = _resolved_model_config(saved.model, a), _resolved_model_config(new.model, b)
            out += [f"model_config.{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def field_names() -> list[str]:
    """Names of every TrainConfig field."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check/convert one value to its field's type; ConfigError names the key."""
    default = getattr(TrainConfig(), key)
    if key == "model_config":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: key 'model_config' must be a mapping, got {type(value).__name__}")
        return dict(value)
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError
            out: Any = value
        elif isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            out = int(value)
        elif isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError
            out = float(value)
        else:
            out = str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: key {key!r} must be {type(default).__name__}, got {value!r}"
        ) from None
    if key in _CHOICES and out not in _CHOICES[key]:
        raise ConfigError(f"{where}: key {key!r} must be one of {_CHOICES[key]}, got {out!r}")
    return out


def build_config(model: str, overrides: Mapping[str, Any] = (), where: str = "config") -> TrainConfig:
    """TrainConfig for `model`: its defaults, then `overrides` (unknown keys raise ConfigError naming them)."""
    if model not in MODELS:
        raise ConfigError(f"{where}: unknown model {model!r}; choose one of {MODELS}")
    values: dict[str, Any] = {"model": model, **MODEL_DEFAULTS[model]}
    overrides = dict(overrides)
    recipe = overrides.get("recipe") or ""
    if recipe:
        if recipe not in RECIPES[model]:
            raise ConfigError(f"{where}: unknown recipe {recipe!r} for {model}; choose one of {sorted(RECIPES[model])}")
        values.update({k: (dict(v) if k == "model_config" else v) for k, v in RECIPES[model][recipe].items()})
    names = set(field_names())
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(names))}")
        if key == "model" and value != model:
            raise ConfigError(f"{where}: key 'model' is {value!r} but the command trains {model!r}")
        value = _coerce(key, value, where)
        # model_config merges over the recipe's keys instead of replacing them
        values[key] = {**values.get("model_config", {}), **value} if key == "model_config" else value
    cfg = TrainConfig(**values)
    validate(cfg, where)
    return cfg


def validate(cfg: TrainConfig, where: str = "config") -> None:
    """Range checks that types alone do not catch."""
    checks = [
        ("epochs", cfg.epochs >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 2, ">= 2 (the losses contrast items within a batch)"),
        ("lr", cfg.lr > 0, "> 0"),
        ("image_rate", cfg.image_rate >= 0, ">= 0"),
        ("eval_chunk", cfg.eval_chunk >= 1, ">= 1"),
        ("cache_bytes", cfg.cache_bytes >= 0, ">= 0"),
        ("warmup", 0 <= cfg.warmup < 1, "in [0, 1)"),
        ("val_split", cfg.val_split in ("train", "val", "test"), "train, val or test"),
        ("test_split", cfg.test_split in ("train", "val", "test"), "train, val or test"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise ConfigError(f"{where}: key {key!r} must be {need}, got {getattr(cfg, key)!r}")


def save_yaml(cfg: TrainConfig, path: str | Path, extra: Mapping[str, Any] = ()) -> None:
    """Write the resolved config (plus `extra` run info such as the store path) as YAML."""
    data = asdict(cfg) | dict(extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def config_from_run_yaml(path: str | Path) -> tuple[TrainConfig, dict[str, Any]]:
    """Inverse of `save_yaml`: (config, extra keys such as `store`)."""
    data = load_yaml(path)
    names = set(field_names())
    extra = {k: v for k, v in data.items() if k not in names}
    model = data.get("model")
    if model not in MODELS:
        raise ConfigError(f"{path}: key 'model' must be one of {MODELS}, got {model!r}")
    cfg = build_config(model, {k: v for k, v in data.items() if k in names}, where=str(path))
    return cfg, extra
