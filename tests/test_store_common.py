"""store/common.py: the helpers every layer shares, and a check that each is defined there and nowhere else."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch

from store.common import RANDOM_IF_MISSING, ConfigError, DeviceError, is_url, load_yaml, pick_device, tvr_version

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "store", "train", "pipelines")
HOME = Path("store/common.py")


def test_load_yaml_reads_a_mapping_and_names_the_file_otherwise(tmp_path: Path) -> None:
    good = tmp_path / "c.yaml"
    good.write_text("workers: 2\nfeatures: [clip]\n")
    assert load_yaml(good) == {"workers": 2, "features": ["clip"]}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml' must hold a mapping of keys to values, got list"):
        load_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml' is not valid YAML"):
        load_yaml(broken)
    with pytest.raises(ConfigError, match=r"nope\.yaml' does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot be read"):  # a folder: an error naming it, not a traceback
        load_yaml(tmp_path)
    assert issubclass(ConfigError, ValueError)


def test_is_url_version_and_random_if_missing() -> None:
    assert is_url("s3://bucket/store.zarr") and is_url("file:///tmp/x") and is_url("https://host/v.mp4")
    assert not is_url("/data/v.mp4") and not is_url("relative/v.mp4") and not is_url(Path("/data/v.mp4"))
    assert tvr_version() and tvr_version() != "0+unknown"  # installed (editable) or read from pyproject.toml
    assert RANDOM_IF_MISSING == "missing"


def test_pick_device() -> None:
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu") and pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceError, match="'tpu-ish:x' is not a torch device; use 'auto', 'cpu' or 'cuda"):
        pick_device("tpu-ish:x")
    with pytest.raises(DeviceError, match="only CPU and CUDA"):
        pick_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="is_available\\(\\) is False; use 'auto' or 'cpu'") as e:
            pick_device("cuda:0")
        assert e.value.reason.startswith("device 'cuda:0'") and e.value.fix == "use 'auto' or 'cpu'"


def _definitions() -> dict[str, list[str]]:
    """Where tvr's packages define each shared helper (or test for URLs / CUDA inline), as 'path:line' lists."""
    found: dict[str, list[str]] = {}
    for path in itertools.chain.from_iterable(sorted((ROOT / p).rglob("*.py")) for p in PACKAGES):
        rel = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            key = None
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in (
                    "ConfigError", "DeviceError", "load_yaml", "is_url", "tvr_version", "pick_device"):
                key = node.name
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RANDOM_IF_MISSING"
                                                      for t in node.targets):
                key = "RANDOM_IF_MISSING"
            elif isinstance(node, ast.Constant) and node.value == "://":
                key = '"://" (a URL test)'
            elif (isinstance(node, ast.Attribute) and node.attr == "is_available"
                  and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda"):
                key = "cuda.is_available (a device choice)"
            elif isinstance(node, ast.Constant) and node.value == "MnR":
                key = '"MnR" (a metrics table)'
            if key is not None:
                found.setdefault(key, []).append(f"{rel}:{node.lineno}")
    return found


def test_each_shared_helper_has_one_home() -> None:
    found = _definitions()
    homes = {'"MnR" (a metrics table)': Path("train/metrics.py")}  # the metrics and their one printer, together
    for key, places in found.items():
        home = homes.get(key, HOME)
        strays = [p for p in places if Path(p.split(":")[0]) != home]
        assert not strays, (f"{key} at {strays}: defined or re-implemented outside {home}; import it from there "
                            "(store.common holds the helpers every layer shares)")
    for key in ("ConfigError", "load_yaml", "is_url", "tvr_version", "pick_device", "RANDOM_IF_MISSING"):
        assert len(found.get(key, [])) == 1, f"{key}: {found.get(key)}"
