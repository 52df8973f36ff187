"""Through Ray and the CLI: I3D and VGGish with several items in flight per worker give the store of one at a time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from store.schema import Status
from tests._media import write_image, write_video
from tests._pipelines import open_store, run_extract, status_by_id

FEATURES = "vggish,i3d_rgb"
OPTIONS = """extractor_options:
  i3d_rgb: {stack_size: 9, step_size: 9, stack_batch: 4}
  vggish: {batch_size: 4, dtype: float32}
"""


def _dataset(root: Path) -> Path:
    """Short clips (one I3D stack, two VGGish examples each), one without audio, an image; a JSONL manifest."""
    rng = np.random.default_rng(5)
    rows = []
    for i in range(5):
        frames = rng.integers(0, 256, (14 + i, 16, 24, 3), dtype=np.uint8)
        t = np.arange(int((2.0 + 0.2 * i) * 16000)) / 16000
        audio = 0.4 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.1 * rng.standard_normal(t.size)
        write_video(root / f"v{i}.mkv", frames, audio=None if i == 3 else audio)
        rows.append({"id": f"v{i}", "path": f"v{i}.mkv"})
    write_image(root / "img.png", rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    rows.append({"id": "img", "path": "img.png", "kind": "image"})
    man = root / "manifest.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return man


@pytest.mark.slow
def test_items_in_flight_give_the_same_i3d_and_vggish_store(ray_session: None, tmp_path: Path) -> None:
    man = _dataset(tmp_path)
    cfg = tmp_path / "options.yaml"
    cfg.write_text(OPTIONS)
    common = ("--config", str(cfg), "--random-weights", "all", "--workers", "1", "--no-download")
    assert run_extract(man, tmp_path / "one.zarr", *common, features=FEATURES) == 0
    assert run_extract(man, tmp_path / "four.zarr", *common, "--items-in-flight", "4", features=FEATURES) == 0
    a, b = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "four.zarr")
    for f in FEATURES.split(","):
        assert status_by_id(a, f) == status_by_id(b, f), f
        ra, rb = a.read(f), b.read(f)
        np.testing.assert_array_equal(ra.mask, rb.mask)
        np.testing.assert_array_equal(ra.time, rb.time)
        top = np.abs(ra.values).max()
        assert top > 0
        # the same features up to float summation order: CPU conv kernels vary with the batch size (~1e-7
        # relative), so a float16 i3d_rgb value may round to the neighbouring step (at most one step of the largest
        # value apart); vggish is stored as float32
        step = float(np.spacing(np.float16(top)))
        tol = dict(rtol=0.0, atol=step) if f == "i3d_rgb" else dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ra.values.astype(np.float32), rb.values.astype(np.float32), **tol, err_msg=f)
    ok = (int(Status.OK), "")
    assert [status_by_id(b, "i3d_rgb")[f"v{i}"] for i in range(5)] == [ok] * 5
    assert status_by_id(b, "vggish")["v3"][1] == "no_audio" and status_by_id(b, "vggish")["v0"] == ok
