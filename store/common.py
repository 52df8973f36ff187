"""Helpers every layer shares, defined once: config errors and YAML, URL test, tvr version, device choice.

They live in `store/` because it is the bottom layer (extract, train and pipelines all import it, it imports none
of them) and because the core install (store + train, no extras) must have them. torch is imported only by
`pick_device`, so `tvr-store` never pays for it.
"""
from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import tomllib
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch

__all__ = ["RANDOM_IF_MISSING", "REDACTED", "ConfigError", "DeviceError", "add_storage_options_argument", "is_url",
           "load_yaml", "parse_storage_options", "pick_device", "redact_secrets", "tvr_version"]

# random weights value (--random-weights missing, random_init="missing"): real weights where they resolve, else
# seeded random ones
RANDOM_IF_MISSING = "missing"


class ConfigError(ValueError):
    """A configuration file or value is unusable; the message names the key (and file) and how to fix it."""


class DeviceError(ValueError):
    """A requested torch device does not exist on this machine or is not one tvr runs on."""

    def __init__(self, reason: str, fix: str = "use 'auto' or 'cpu'") -> None:
        self.reason, self.fix = reason, fix  # callers with their own flag names (tvr-train) reword the fix
        super().__init__(f"{reason}; {fix}")


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping (an empty file is {}); ConfigError naming the file when it is missing or not one."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {str(p)!r} does not exist") from e
    except OSError as e:  # a folder, no permission: name the file rather than show a traceback
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` locations (object stores, http, file://); False for plain paths and PathLikes."""
    return not isinstance(path, os.PathLike) and "://" in path


@functools.cache
def tvr_version() -> str:
    """The installed tvr version, else the source checkout's pyproject version, else "0+unknown"."""
    try:
        return importlib.metadata.version("tvr")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "0+unknown"


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve "auto" | "cpu" | "cuda" | "cuda:N" to a torch.device; "auto" is CUDA when available, else CPU.

    DeviceError for a name torch does not know, a device other than CPU/CUDA, or CUDA on a machine without it.
    """
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise DeviceError(f"device {device!r} is not a torch device", "use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for CUDA but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r}: only CPU and CUDA are supported")
    return dev


# storage option keys whose values are never written or printed (s3fs: key, secret, token; gcsfs: token; others)
SECRET_PARTS = ("secret", "key", "token", "password", "passwd", "credential", "session", "auth")
REDACTED = "<redacted>"
STORAGE_OPTIONS_HELP = ("fsspec storage options of the store URL (s3fs: endpoint_url via client_kwargs, key, secret, "
                        "...) as a JSON object, or the path of a JSON/YAML file holding one (keeps secrets out of "
                        "the process list); they reach every process that opens the store; secret values are "
                        "never saved or printed")


def parse_storage_options(value: str | Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Storage options from a JSON object text, a JSON/YAML file path or a mapping; ConfigError naming `where`."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        data: object = value
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: storage options must be a mapping, got {type(value).__name__}")
    elif value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"{where}: storage options are not valid JSON ({e}); pass an object such as "
                              '\'{"client_kwargs": {"endpoint_url": "http://host:9000"}}\' or a file path') from None
    else:
        try:
            data = load_yaml(value)  # JSON is YAML
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}; pass a JSON object or the path of a JSON/YAML file") from None
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{where}: storage options must be a mapping of option names to values, got "
                          f"{type(data).__name__}")
    return dict(data)


def _is_secret(name: str) -> bool:
    """Whether an option name looks like it holds a credential."""
    low = name.lower()
    return any(part in low for part in SECRET_PARTS)


def redact_secrets(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `options` with the values of credential-like keys (at any depth) replaced by REDACTED."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if _is_secret(str(k)):
            out[k] = REDACTED
        else:
            out[k] = redact_secrets(v) if isinstance(v, Mapping) else v
    return out


def add_storage_options_argument(parser: argparse.ArgumentParser) -> None:
    """`--storage-options JSON|FILE`, the same on every tvr command (parse it with parse_storage_options)."""
    parser.add_argument("--storage-options", metavar="JSON|FILE", default=None, help=STORAGE_OPTIONS_HELP)
