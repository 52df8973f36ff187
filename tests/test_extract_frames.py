"""`frames` extractor: uint8 RGB frames equal to the reference's test transform, sampling policies, the store's
uint8 values (written and read back as uint8), and a `tvr-extract --features frames` run with resume."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from extract import create_extractor
from extract.sampling import frame_indices, frame_times, uniform_times
from store.schema import FeatureRows, FeatureSpec, Status
from tests._fakes import TinyStoreFactory
from tests._media import write_video

ROOT = Path(__file__).resolve().parents[1]
FPS = 25


def pattern(n: int, h: int = 60, w: int = 80) -> np.ndarray:
    """Smooth colour gradient with a bright square moving right 2 px per frame, uint8 (n, h, w, 3)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    out = np.repeat(base[None], n, 0)
    for k in range(n):
        x0 = (2 * k) % (w - 10)
        out[k, 20:30, x0 : x0 + 10] = (250, 30, 30)
    return out


def run_session(ex, frames: np.ndarray, kind: str = "video") -> FeatureRows:  # type: ignore[no-untyped-def]
    """Stream frames in batches of 8 through a session, as the pipeline does."""
    from extract.decode import FrameBatch

    duration = 0.0 if kind == "image" else len(frames) / FPS
    s = ex.start(SimpleNamespace(path="x.mkv", kind=kind, duration=duration, has_audio=False))
    for i in range(0, len(frames), 8):
        idx = np.arange(i, min(len(frames), i + 8))
        s.add_frames(FrameBatch(frames=frames[idx], times=idx / FPS, index=idx))
    return s.finish()


def reference_test_transform(frame: np.ndarray, size: int) -> np.ndarray:
    """The reference's clip_test transform before Normalize, on a float tensor: Resize(size, BICUBIC), CenterCrop."""
    import torch
    from torchvision import transforms

    t = torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size)])
    return (tf(t).clamp(0, 1) * 255.0).permute(1, 2, 0).numpy()


def test_frames_equal_the_reference_test_transform_and_uniform_times() -> None:
    frames = pattern(50)  # 2 s
    ex = create_extractor("frames", size=32)
    r = run_session(ex, frames)
    assert r.status == Status.OK and r.values.dtype == np.uint8 and r.values.shape == (12, 32 * 32 * 3)
    want_idx = frame_indices(uniform_times(2.0, 12))
    np.testing.assert_allclose(r.times, frame_times(want_idx))
    for step, k in enumerate(want_idx):
        ref = reference_test_transform(frames[k], 32)
        got = r.values[step].reshape(32, 32, 3).astype(np.float64)
        assert np.abs(got - ref).max() <= 1.01, (step, np.abs(got - ref).max())  # uint8 rounding only
    assert ex.provenance()["options"]["policy"] == {"fps": None, "max_steps": 12, "count": 12}
    assert ex.spec == FeatureSpec("frames", 32 * 32 * 3, 12, dtype="uint8", modality="frames")


def test_rate_policy_keeps_more_frames_for_random_training_samples() -> None:
    ex = create_extractor("frames", size=16, fps=2.0, max_steps=48)
    r = run_session(ex, pattern(50))
    np.testing.assert_allclose(r.times, frame_times(frame_indices(np.array([0.0, 0.5, 1.0, 1.5]))))  # 25 fps grid
    assert ex.spec.max_steps == 48 and ex.provenance()["options"]["policy"]["fps"] == 2.0
    img = run_session(ex, pattern(1), kind="image")
    assert img.values.shape == (1, 16 * 16 * 3) and img.times.tolist() == [0.0]


def test_store_keeps_uint8_values_without_a_float_copy(tiny_store: TinyStoreFactory) -> None:
    from store.zarr_store import FeatureStore

    spec = FeatureSpec("frames", 8 * 8 * 3, 4, dtype="uint8", modality="frames")
    fs = tiny_store(2, captions=0, fill=False, name="s.zarr")
    fs.ensure_feature(spec, {"weights": {"file": "none", "sha256": ""}})
    vals = np.random.default_rng(0).integers(0, 256, (3, spec.dim), dtype=np.uint8)
    fs.write("frames", 1, FeatureRows(Status.OK, vals, np.array([0.0, 0.1, 0.2], np.float32)))
    b = FeatureStore.open(fs.url).read("frames")
    assert b.values.dtype == np.uint8 and b.values.shape == (2, 4, spec.dim)
    np.testing.assert_array_equal(b.values[1, :3], vals)
    assert b.available.tolist() == [False, True] and b.mask[1].tolist() == [True, True, True, False]
    assert not b.values[0].any()  # PENDING row reads as zeros, marked unavailable


def test_bad_size_or_batch_is_a_clear_error() -> None:
    assert create_extractor("frames").batch_size == 32  # no model: cheap resizes, batched as before on every device
    with pytest.raises(ValueError, match="frames: size must be >= 8 pixels, got 4"):
        create_extractor("frames", size=4)
    with pytest.raises(ValueError, match="frames: batch_size must be > 0, got 0"):
        create_extractor("frames", batch_size=0)


def test_frames_is_not_a_default_feature() -> None:
    from pipelines.run import default_features

    assert "frames" not in default_features(True) and "clip" in default_features(True)


@pytest.mark.slow
@pytest.mark.ray
def test_tvr_extract_frames_on_a_generated_video_resumes(ray_session: None, tmp_path: Path) -> None:
    from PIL import Image

    from extract.frames import resize_center_crop
    from pipelines.cli import main
    from store.zarr_store import FeatureStore

    frames = pattern(40)
    write_video(tmp_path / "v.mkv", frames)
    img = pattern(1, 30, 50)[0]
    Image.fromarray(img).save(tmp_path / "i.png")
    (tmp_path / "bad.mp4").write_text("not a video")
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "v", "path": "v.mkv", "captions": ["a red square moves right"]},
        {"id": "i", "path": "i.png", "kind": "image"}, {"id": "bad", "path": "bad.mp4"}]))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("extractor_options:\n  frames: {size: 24}\n")
    store = tmp_path / "s.zarr"
    argv = [str(man), "--store", str(store), "--features", "frames", "--config", str(cfg), "--no-progress"]
    assert main(argv) == 1  # the corrupt file is FAILED, the rest OK
    fs = FeatureStore.open(str(store))
    rows = {str(i): r for r, i in enumerate(fs.items().id)}
    st = fs.status("frames")
    assert st[rows["v"]] == Status.OK and st[rows["i"]] == Status.OK and st[rows["bad"]] == Status.FAILED
    b = fs.read("frames")
    assert b.values.dtype == np.uint8 and b.values.shape == (3, 12, 24 * 24 * 3)
    assert b.mask[rows["v"]].all() and b.mask[rows["i"]].tolist() == [True] + [False] * 11
    want = resize_center_crop(frames[frame_indices(uniform_times(40 / FPS, 12))], 24).numpy()
    np.testing.assert_array_equal(b.values[rows["v"]], want)  # lossless video: exactly the decoded frames
    np.testing.assert_array_equal(b.values[rows["i"], 0], resize_center_crop(img[None], 24).numpy()[0])
    assert fs.provenance("frames")["options"]["policy"]["count"] == 12
    assert main(argv) == 1  # rerun: resumes, OK rows are kept, the FAILED one stays FAILED
    fs2 = FeatureStore.open(str(store))
    np.testing.assert_array_equal(fs2.read("frames").values, b.values)
    np.testing.assert_array_equal(fs2.status("frames"), st)
