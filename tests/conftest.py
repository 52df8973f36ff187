"""Shared pytest configuration: repo root on sys.path, GPU skip, quiet thread counts."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

if TYPE_CHECKING:  # the fixtures import these lazily: collecting a store-only module stays free of torch/PyAV
    from fractions import Fraction

    import numpy as np

    from store import FeatureStore
    from tests._fakes import FakeWeightsFactory, TinyStoreFactory
    from tests._media import TinyVideoFactory

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two cores: keep BLAS/torch from oversubscribing when tests run subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Tests never touch the network: no weights download, in this process and in every Ray worker / subprocess it starts.
os.environ["TVR_OFFLINE"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests when CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- CLIP fine-tuning fixtures (tests/test_train_finetune*.py, tests/test_train_distributed.py) ----------------
TINY_CLIP = {  # a few-layer open_clip architecture with random init: fine-tuning tests run in seconds on a CPU
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "pool_type": "avg"},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SHAPE_COLORS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 40, 230), "yellow": (230, 220, 30)}
SHAPE_DIRS = {"up": (-1, 0), "down": (1, 0)}  # not left/right: the reference's train-time flip swaps them


def shape_video(color: str, shape: str, direction: str, rng, steps: int = 8, size: int = 32):  # type: ignore[no-untyped-def]
    """uint8 (steps, size, size, 3): a coloured circle or horizontal bar moving from near the centre towards an edge."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size]
    bg = rng.integers(0, 60, 3)
    dy, dx = SHAPE_DIRS[direction]
    cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    r = size / 5 + rng.uniform(-0.5, 0.5)
    out = np.empty((steps, size, size, 3), np.uint8)
    for k in range(steps):
        y, x = cy + dy * k * size / (2.5 * steps), cx + dx * k * size / (2.5 * steps)
        inside = (yy - y) ** 2 + (xx - x) ** 2 <= r * r if shape == "circle" else \
            (abs(yy - y) <= r * 0.35) & (abs(xx - x) <= r * 1.6)
        out[k] = bg
        out[k][inside] = SHAPE_COLORS[color]
    return out


def make_shapes_store(path, per_combo_train: int = 6, seed: int = 0, steps: int = 8, size: int = 32):  # type: ignore[no-untyped-def]
    """A store with a uint8 `frames` feature of moving-shape videos captioned "a red circle moves up";
    per combination (4 colours x 2 shapes x 2 directions) `per_combo_train` train videos, one val and one test."""
    import itertools

    import numpy as np

    from store.schema import CaptionRecord, FeatureRows, FeatureSpec, ItemRecord, Status
    from store.zarr_store import FeatureStore

    rng = np.random.default_rng(seed)
    items, caps, videos = [], [], []
    combos = list(itertools.product(SHAPE_COLORS, ("circle", "bar"), SHAPE_DIRS))
    for split, n in (("train", per_combo_train), ("val", 1), ("test", 1)):
        for i, (c, s, d) in enumerate(combos * n):
            vid = f"{split}{i:03d}"
            items.append(ItemRecord(vid, f"{vid}.mp4", duration=steps / 4, split=split))
            caps.append(CaptionRecord(f"{vid}#0", vid, f"a {c} {s} moves {d}"))
            videos.append(shape_video(c, s, d, rng, steps, size))
    fs = FeatureStore.create(str(path), items, caps)
    spec = FeatureSpec("frames", size * size * 3, steps, dtype="uint8", modality="frames")
    fs.ensure_feature(spec, {"weights": {"file": "none (raw pixels, no model)", "sha256": ""}})
    for row, v in enumerate(videos):
        fs.write("frames", row, FeatureRows(Status.OK, v.reshape(steps, -1), np.arange(steps, dtype=np.float32) / 4))
    if hasattr(fs, "pack_ready"):
        fs.pack_ready(partial=True)
    return FeatureStore.open(str(path))


@pytest.fixture(scope="session")
def shapes_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A read-only moving-shapes frames store shared by the fine-tuning tests."""
    return make_shapes_store(tmp_path_factory.mktemp("shapes") / "shapes.zarr")


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One in-process local Ray for the module; workers get the repo root on their path."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


# ---- shared test data: tests/_media.py (video), tests/_fakes.py (store, weights) --------------------------------
@pytest.fixture
def tiny_video(tmp_path: Path) -> TinyVideoFactory:
    """Factory: a lossless video under tmp_path (frames or a count, fps, size, audio) and its exact decoded frames."""
    from tests._media import TinyVideo, tiny_video

    def make(frames: int | np.ndarray = 10, *, fps: int | Fraction = 25, size: tuple[int, int] = (16, 24),
             audio: np.ndarray | None = None, sample_rate: int = 16000, name: str = "tiny.mkv") -> TinyVideo:
        return tiny_video(tmp_path / name, frames, fps=fps, size=size, audio=audio, sample_rate=sample_rate)

    return make


@pytest.fixture
def tiny_store(tmp_path: Path) -> TinyStoreFactory:
    """Factory: a FeatureStore of n items with captions and seeded features under tmp_path (tests/_fakes.py)."""
    from tests._fakes import tiny_store

    def make(n: int = 4, *, name: str = "tiny.zarr", **kw: Any) -> FeatureStore:
        return tiny_store(tmp_path / name, n, **kw)

    return make


@pytest.fixture
def fake_weights(tmp_path: Path) -> FakeWeightsFactory:
    """Factory: a weights file (bytes or a state dict) under tmp_path, its sha256 and a WeightsSpec pinning it."""
    from tests._fakes import FakeWeights, fake_weights

    def make(content: Any = b"fake weights", filename: str = "net.pth", *, directory: Path | None = None,
             **kw: Any) -> FakeWeights:
        return fake_weights(directory if directory is not None else tmp_path, content, filename, **kw)

    return make


@pytest.fixture
def no_weights_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No TVR_WEIGHTS_DIR, HOME without caches, an empty torch hub dir (returned); torch hub downloads fail loudly."""
    import torch

    monkeypatch.delenv("TVR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return hub
