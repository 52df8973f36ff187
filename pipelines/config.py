"""Configuration of one extraction run: a dataclass, filled from defaults < YAML file < command line."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from store.common import RANDOM_IF_MISSING, ConfigError, parse_storage_options, redact_secrets

__all__ = ["ConfigError", "ExtractConfig"]  # ConfigError: what validate() raises

REMOVED = {  # options that no longer exist -> why, and what to do instead
    "fps": "every extractor picks its steps from the fixed 25 fps decode grid (extract.sampling.DECODE_FPS), so "
           "another decode rate would mislabel step times; set a feature's own step rate instead, e.g. "
           "extractor_options: {resnet152: {fps: 2}} in --config",
}


@dataclass
class ExtractConfig:
    """Everything `tvr-extract` needs; YAML keys are these field names (dashes accepted for underscores)."""

    source: str = ""  # dataset folder or manifest (.csv / .jsonl)
    store: str = ""  # feature store path or URL zarr/fsspec accepts
    # fsspec options of the store URL (endpoint, credentials); passed to every process opening the store; never
    # printed (repr) or saved unredacted (to_yaml)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    features: list[str] | None = None  # None: every registered item feature (+ caption features when captions exist)
    weights_dir: str | None = None  # folder holding weight files (see extract/_weights.py for the lookup order)
    random_weights: bool | str = False  # True: seeded random weights for every model; "missing": only where not found
    allow_download: bool = True  # torchvision / open_clip download missing weights into their caches when online
    seed: int = 0  # seed for random weights
    workers: int | None = None  # actors holding models; None: one per GPU, else max(1, cpus // 2)
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # None: cluster CPUs / workers (may be fractional, see docs/cluster.md)
    retry_failed: bool = False  # redo rows marked FAILED by an earlier run
    strict: bool = False  # error out (listing them) when manifest files are missing, instead of FAILED missing_file
    max_retries: int = 2  # re-runs of an item whose worker process died, before FAILED worker_died
    address: str | None = None  # Ray cluster address; None: $RAY_ADDRESS, else start a local Ray
    decode_height: int | None = None  # decode frames at this height (None: native size)
    frame_rule: str = "nearest"  # which source frame an output frame shows (extract.decode.FRAME_RULES)
    update_manifest: bool = False  # rerun with changed paths/captions/splits: update the store and redo those rows
    batch_size: int = 16  # frames per decoded batch
    caption_chunk: int | None = None  # caption rows per task (rounded to the feature's chunk_rows); None: chunk_rows
    queue_size: int = 4  # decoded batches buffered ahead of the models by a decode thread; 0: decode inline
    decode_workers: int = 0  # CPU decode actors streaming batches to the model workers (0: decode inside them)
    items_in_flight: int = 1  # items a model worker runs at once; their frames share model batches (cross-item)
    precision: str = "fp32"  # model precision: fp32 | fp16 (CUDA) | bf16 (autocast, frame-step extractors)
    plugins: list[str] = field(default_factory=list)  # modules (or .py files) imported before creating extractors
    extractor_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-feature constructor options
    progress: bool = True  # live progress bar on stderr

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "config") -> "ExtractConfig":
        """Build from a mapping, rejecting unknown keys."""
        return cls().updated(data, where)

    def updated(self, data: Mapping[str, Any], where: str = "config") -> "ExtractConfig":
        """A copy with the keys of `data` replaced (unknown keys raise ConfigError)."""
        names = {f.name for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for key, value in data.items():
            k = str(key).replace("-", "_")
            if k in REMOVED:
                raise ConfigError(f"{where}: {key!r} was removed: {REMOVED[k]}")
            if k not in names:
                raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
            clean[k] = value
        if isinstance(clean.get("features"), str):
            clean["features"] = [f for f in clean["features"].split(",") if f.strip()]
        if isinstance(clean.get("plugins"), str):
            clean["plugins"] = [p for p in clean["plugins"].split(",") if p.strip()]
        if "storage_options" in clean:  # JSON text or a file path (command line), or a mapping (YAML)
            clean["storage_options"] = parse_storage_options(clean["storage_options"], f"{where}: storage_options")
        return dataclasses.replace(self, **clean)

    def validate(self) -> "ExtractConfig":
        """Raise ConfigError for values no run can use; every numeric option is range-checked."""
        if not self.source:
            raise ConfigError("no dataset SOURCE given: pass a folder or manifest, or set 'source' in --config")
        if not self.store:
            raise ConfigError("no --store given: pass the feature store path, or set 'store' in --config")
        for name, low, optional in _INT_RANGES:
            _check_number(self, name, low, optional, integer=True)
        for name, low, optional in _FLOAT_RANGES:
            _check_number(self, name, low, optional, integer=False)
        if self.random_weights not in (True, False, RANDOM_IF_MISSING):
            raise ConfigError(f"random_weights must be true, false or {RANDOM_IF_MISSING!r}, "
                              f"got {self.random_weights!r}")
        from extract.decode import FRAME_RULES

        from extract._api import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.frame_rule not in FRAME_RULES:
            raise ConfigError(f"--frame-rule must be one of {', '.join(FRAME_RULES)}, got {self.frame_rule!r}")
        for key in ("retry_failed", "strict", "allow_download", "progress", "update_manifest"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        return self

    def to_yaml(self) -> str:
        """The resolved configuration as YAML (saved next to the run's log), credentials redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact_secrets(self.storage_options)
        return yaml.safe_dump(data, sort_keys=False)


# (field, smallest allowed value, None allowed) for every numeric option; "--x-y" in messages
_INT_RANGES = (("workers", 1, True), ("max_retries", 0, False), ("seed", 0, False), ("decode_height", 1, True),
               ("batch_size", 1, False), ("queue_size", 0, False), ("caption_chunk", 1, True),
               ("decode_workers", 0, False), ("items_in_flight", 1, False))
_FLOAT_RANGES = (("gpus_per_worker", 0.0, True), ("cpus_per_worker", 0.0, True))
_FLAGS = {"queue_size": "--decode-queue"}  # fields whose command-line flag is not --<field-with-dashes>


def _check_number(cfg: ExtractConfig, name: str, low: float, optional: bool, *, integer: bool) -> None:
    """ConfigError unless cfg.<name> is a finite number >= low (> 0 for CPU counts), or None when optional."""
    value, flag = getattr(cfg, name), _FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be {'an integer' if integer else 'a number'}, got {value!r}")
    strict = name == "cpus_per_worker"  # a worker needs some CPU; a GPU share of 0 means CPU-only
    if value < low or (strict and value <= low):
        raise ConfigError(f"{flag} must be {'>' if strict else '>='} {low:g}, got {value!r}")
