"""Configuration of one extraction run: a dataclass, filled from defaults < YAML file < command line."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


RANDOM_IF_MISSING = "missing"  # random_weights value: real weights where they resolve, else seeded random


class ConfigError(Exception):
    """A configuration file or value is unusable; the message says which key and how to fix it."""


@dataclass
class ExtractConfig:
    """Everything `tvr-extract` needs; YAML keys are these field names (dashes accepted for underscores)."""

    source: str = ""  # dataset folder or manifest (.csv / .jsonl)
    store: str = ""  # feature store path or URL zarr/fsspec accepts
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
    fps: float = 25.0  # decode frame rate fed to every extractor
    decode_height: int | None = None  # decode frames at this height (None: native size)
    batch_size: int = 16  # frames per decoded batch
    caption_chunk: int | None = None  # caption rows per task (rounded to the feature's chunk_rows); None: chunk_rows
    queue_size: int = 4  # decoded batches buffered ahead of the models by a decode thread; 0: decode inline
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
            if k not in names:
                raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
            clean[k] = value
        if isinstance(clean.get("features"), str):
            clean["features"] = [f for f in clean["features"].split(",") if f.strip()]
        if isinstance(clean.get("plugins"), str):
            clean["plugins"] = [p for p in clean["plugins"].split(",") if p.strip()]
        return dataclasses.replace(self, **clean)

    def validate(self) -> "ExtractConfig":
        """Raise ConfigError for values no run can use."""
        if not self.source:
            raise ConfigError("no dataset SOURCE given: pass a folder or manifest, or set 'source' in --config")
        if not self.store:
            raise ConfigError("no --store given: pass the feature store path, or set 'store' in --config")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise ConfigError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.batch_size < 1 or self.queue_size < 0:
            raise ConfigError("--batch-size must be >= 1 and queue_size >= 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.random_weights not in (True, False, RANDOM_IF_MISSING):
            raise ConfigError(f"random_weights must be true, false or {RANDOM_IF_MISSING!r}, "
                              f"got {self.random_weights!r}")
        if self.fps <= 0:
            raise ConfigError(f"--fps must be > 0, got {self.fps}")
        return self

    def to_yaml(self) -> str:
        """The resolved configuration as YAML (saved next to the run's log)."""
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError naming the file if it is not one."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {str(p)!r} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data
