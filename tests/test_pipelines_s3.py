"""`tvr-extract` with real local Ray into an s3:// store on a real S3-compatible server (tests/_s3.py), then a
resume that redoes nothing, `tvr-store info` and xarray on the result.

Ray's workers inherit the endpoint and credentials from the driver's environment (the fixture sets them before Ray
starts), as they would from a cluster node's environment.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests._media import tiny_video
from tests._pipelines import run_extract
from tests._s3 import S3Server, objects, s3_server  # noqa: F401 (s3_server: the fixture)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

N_VIDEOS = 8


@pytest.fixture(scope="module")
def ray_s3(s3_server: S3Server, ray_session: None) -> S3Server:
    """The S3 server, with a local Ray started after its environment was set (workers inherit it)."""
    return s3_server


def _dataset(root: Path, n: int) -> tuple[Path, dict[str, np.ndarray]]:
    """n lossless videos (every other one with audio), two captions each, in a JSONL manifest."""
    rows, frames = [], {}
    for i in range(n):
        audio = np.sin(np.arange(4000) * (0.01 + i * 0.01)) * 0.5 if i % 2 == 0 else None
        v = tiny_video(root / f"v{i}.mkv", 6 + i, size=(12, 16), audio=audio)
        frames[f"v{i}"] = v.frames
        rows.append({"id": f"v{i}", "path": str(v.path), "captions": [f"video {i}", f"clip number {i}"]})
    man = root / f"manifest{n}.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return man, frames


def _extract(man: Path, url: str) -> str:
    """tvr-extract with the test extractors; its summary (stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_extract(man, url)  # type: ignore[arg-type]  (a URL where a path is usual)
    assert code == 0, out.getvalue()
    return out.getvalue()


def _mean_colours(f: np.ndarray) -> np.ndarray:
    return f.reshape(len(f), -1, 3).astype(np.float64).mean(axis=1) / 255.0


def _rerun_lists(server: S3Server, man: Path, url: str) -> list[str]:
    """Rerun a finished extraction: nothing to do, nothing written; the prefixes it listed."""
    before = {k: v for k, v in objects(server, "extract.zarr/").items() if "/.tvr/locks/" not in k}
    mark = server.mark()
    out = _extract(man, url)
    assert "\n0 task(s)" in out, out
    seen = server.requests(since=mark)
    writes = sorted({r.path for r in seen if r.method in ("PUT", "POST", "DELETE") and "/.tvr/locks/" not in r.path})
    assert not writes, writes  # no row, shard, status or metadata object written again
    after = {k: v for k, v in objects(server, "extract.zarr/").items() if "/.tvr/locks/" not in k}
    assert after == before  # same objects, same ETags
    lists = [r.prefix for r in seen if r.is_list]
    assert "" not in lists  # never the whole bucket
    return lists


def test_extract_into_s3_resume_redoes_nothing_info_and_xarray(ray_s3: S3Server, tmp_path: Path) -> None:
    from store.cli import main as store_main
    from store.zarr_store import FeatureStore

    url, half = "s3://tvr/extract.zarr", N_VIDEOS // 2
    small, _ = _dataset(tmp_path, half)
    full, frames = _dataset(tmp_path, N_VIDEOS)
    assert "\n0 task(s)" not in _extract(small, url)
    lists_small = _rerun_lists(ray_s3, small, url)
    out = _extract(full, url)  # the manifest grew: the new items are extracted
    assert "\n0 task(s)" not in out
    fs = FeatureStore.open(url)
    rows = {str(i): r for r, i in enumerate(fs.items().id)}
    mean = fs.read("test_mean")
    for item, f in frames.items():  # exact per-frame mean colours of the lossless inputs
        np.testing.assert_allclose(mean.values[rows[item], : len(f)], _mean_colours(f), rtol=0, atol=1e-6)
    assert fs.staged_count("test_mean") == 0  # the driver packed everything into shards
    lists_full = _rerun_lists(ray_s3, full, url)
    # a rerun lists the same prefixes (store metadata, the staging area) for 4 items as for 8: none per item
    assert Counter(lists_full) == Counter(lists_small), (lists_small, lists_full)

    info = io.StringIO()
    with contextlib.redirect_stdout(info):
        assert store_main(["info", url, "--json"]) == 0
    doc = json.loads(info.getvalue())
    assert doc["items"] == N_VIDEOS
    assert doc["features"]["test_mean"] == {"ok": N_VIDEOS, "absent": 0, "failed": 0, "pending": 0}
    assert doc["features"]["test_rms"] == {"ok": N_VIDEOS // 2, "absent": N_VIDEOS // 2, "failed": 0, "pending": 0}
    assert doc["features"]["test_caption"]["ok"] == 2 * N_VIDEOS
    ds = FeatureStore.open(url).to_xarray("test_mean")
    f = frames["v5"]
    np.testing.assert_allclose(ds["values"].sel(item="v5").values[: len(f)], _mean_colours(f), rtol=0, atol=1e-6)
