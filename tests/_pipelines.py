"""Pipeline test helpers shared by test modules: the mixed sample dataset, the CLI run, store lookups."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pipelines.cli import main
from pipelines.worker import ExtractWorker, spec_from_description
from store import FeatureStore, ItemRecord
from tests._media import write_image, write_video

PLUGIN = os.environ.get("TVR_TEST_PLUGINS", "tests.pipelines_testext")  # cheap deterministic test extractors


def make_dataset(root: Path, n_good: int = 4) -> tuple[Path, dict[str, np.ndarray]]:
    """~10 items: videos (with/without audio), images, a scripted extractor failure and bad files; JSONL."""
    rng = np.random.default_rng(0)
    media = root / "media"
    media.mkdir(parents=True)
    expect: dict[str, np.ndarray] = {}
    rows = []
    for i in range(n_good):
        frames = rng.integers(0, 256, (8 + i, 12, 16, 3), dtype=np.uint8)
        audio = np.sin(np.arange(6000) * (0.01 + i * 0.01)) * 0.5 if i % 2 == 0 else None
        write_video(media / f"v{i}.mkv", frames, audio=audio)
        expect[f"v{i}"] = frames
        rows.append({"id": f"v{i}", "path": f"media/v{i}.mkv", "captions": [f"video {i}", f"clip number {i}"]})
    for i in range(2):
        img = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
        write_image(media / f"img{i}.png", img)
        expect[f"img{i}"] = img[None]
        rows.append({"id": f"img{i}", "path": f"media/img{i}.png", "kind": "image", "captions": [f"image {i}"]})
    frames = rng.integers(0, 256, (6, 12, 16, 3), dtype=np.uint8)
    write_video(media / "boom.mkv", frames)
    (media / "corrupt.mp4").write_text("this is not a video\n")
    (media / "zero.mp4").write_bytes(b"")
    good = (media / "v0.mkv").read_bytes()
    (media / "truncated.mkv").write_bytes(good[: len(good) // 2])
    rows += [{"id": "boom", "path": "media/boom.mkv", "captions": ["kaboom"]},
             {"id": "corrupt", "path": "media/corrupt.mp4"}, {"id": "zero", "path": "media/zero.mp4"},
             {"id": "truncated", "path": "media/truncated.mkv"}, {"id": "missing", "path": "media/missing.mp4"}]
    man = root / "manifest.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return man, expect


def run_extract(man: Path | str, store: Path, *extra: str, features: str = "test_mean,test_rms,test_caption") -> int:
    """tvr-extract in-process with the test extractors (PLUGIN), no progress bar; its exit code."""
    return main([str(man), "--store", str(store), "--features", features, "--plugins", PLUGIN, "--no-progress",
                 *extra])


def open_store(store: Path) -> FeatureStore:
    """The finished store, read-only."""
    return FeatureStore.open(str(store))


def status_by_id(fs: FeatureStore, feature: str) -> dict[str, tuple[int, str]]:
    """Item (or caption) id -> (status code, reason) of `feature`."""
    ids = [str(i) for i in fs.items().id] if fs.spec(feature).axis == "item" else [str(i) for i in fs.captions().id]
    return {i: (int(s), str(r)) for i, s, r in zip(ids, fs.status(feature), fs.reasons(feature))}


def worker_store(tmp_path: Path, worker: ExtractWorker, paths: dict[str, Path]) -> str:
    """A store at tmp_path/w.zarr holding `paths` (png = image) and every feature `worker` describes; its url."""
    url = str(tmp_path / "w.zarr")
    kinds = {k: ("image" if p.suffix == ".png" else "video") for k, p in paths.items()}
    fs = FeatureStore.create(url, [ItemRecord(id=k, path=str(p), kind=kinds[k]) for k, p in paths.items()])
    for d in worker.describe().values():
        fs.ensure_feature(spec_from_description(d), d["provenance"])
    return url


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process, from /proc (tests kill exactly the processes they started)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(d)] = (int(fields[1]), int(fields[2]))
    return out
