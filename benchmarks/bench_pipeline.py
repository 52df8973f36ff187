"""Pipeline throughput and efficiency: `tvr-extract` on Ray vs the bare extractors on pre-decoded frames.

efficiency = pipeline items/s (while processing: workers up, models loaded) / bare items/s, where "bare" feeds the
same extractors' sessions with frames decoded beforehand, in this process, without Ray, using every core. Both are
measured in one run on the same synthetic videos with random weights. End-to-end items/s (including Ray start,
actor and model loading) is reported alongside. Run: `.venv/bin/python benchmarks/bench_pipeline.py [--items 8]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    """Lossless RGB video."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264rgb", rate=fps)
        vs.width, vs.height, vs.pix_fmt, vs.options = w, h, "rgb24", {"crf": "0"}
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)


def make_videos(root: Path, n: int, seconds: float, size: tuple[int, int]) -> list[Path]:
    """`n` smooth synthetic videos (moving gradients, cheap to encode and decode)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        frames = np.stack([
            np.stack([(xx + 3 * t + 10 * i) % 256, (yy + 2 * t) % 256, (xx + yy + t * (i + 1)) % 256], -1)
            for t in range(int(seconds * 25))
        ]).astype(np.uint8)
        p = root / f"bench_{i:02d}.mkv"
        write_video(p, frames)
        paths.append(p)
    return paths


def bare_throughput(paths: list[Path], features: list[str], device: str, threads: int) -> float:
    """Items/s of the extractors' sessions fed pre-decoded frames in this process (no Ray, no decode in timing)."""
    import torch

    import extract  # noqa: F401
    from extract import decode
    from extract._registry import create_extractor

    torch.set_num_threads(threads)
    exs = {f: create_extractor(f, random_init=True, seed=0, device=device) for f in features}
    decoded = [(decode.probe(p), list(decode.iter_frames(p, fps=25.0, batch_size=16))) for p in paths]
    # warm-up on one item so lazy init (kernels, allocator) is not timed
    info, batches = decoded[0]
    for ex in exs.values():
        s = ex.start(info)
        for b in batches:
            s.add_frames(b)
        s.finish()
    t0 = time.perf_counter()
    for info, batches in decoded:
        for ex in exs.values():
            s = ex.start(info)
            for b in batches:
                s.add_frames(b)
            s.finish()
    return len(paths) / (time.perf_counter() - t0)


def pipeline_throughput(paths: list[Path], features: list[str], workers: int, tmp: Path, gpus: float,
                        plugins: list[str], queue_size: int = 4) -> tuple[float, float]:
    """(processing items/s, end-to-end items/s) of `pipelines.run` on a fresh store."""
    from pipelines.config import ExtractConfig
    from pipelines.run import run

    store = tmp / f"store_w{workers}_g{gpus:g}_q{queue_size}.zarr"
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(f'{{"id": "{p.stem}", "path": "{p}"}}\n' for p in paths))
    cfg = ExtractConfig(source=str(manifest), store=str(store), features=features, random_weights=True,
                        workers=workers, gpus_per_worker=gpus, progress=False, plugins=plugins,
                        queue_size=queue_size)
    t0 = time.perf_counter()
    res = run(cfg)
    total = time.perf_counter() - t0
    assert res.exit_code == 0, res.table()
    return len(paths) / res.process_seconds, len(paths) / total


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, nargs=2, default=(144, 192))
    ap.add_argument("--features", default="resnet152,clip")
    ap.add_argument("--plugins", default="", help="modules or .py files registering extra extractors")
    args = ap.parse_args(argv)
    from pipelines.worker import import_plugins

    plugins = [p for p in args.plugins.split(",") if p]
    import_plugins(plugins)
    import ray
    import torch

    features = args.features.split(",")
    cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = make_videos(tmp, args.items, args.seconds, tuple(args.size))
        bare_cpu = bare_throughput(paths, features, "cpu", cpus)
        for w, q in ((1, 4), (2, 4), (1, 0), (2, 0)):
            proc, e2e = pipeline_throughput(paths, features, w, tmp, 0.0, plugins, q)
            rows.append((f"cpu q{q}", w, bare_cpu, proc, e2e))
        if gpus:
            bare_gpu = bare_throughput(paths, features, "cuda", cpus)
            proc, e2e = pipeline_throughput(paths, features, gpus, tmp, 1.0, plugins)
            rows.append((f"{gpus}xgpu q4", gpus, bare_gpu * gpus, proc, e2e))
    ray.shutdown()
    print(f"\n{args.items} videos x {args.seconds:g}s {args.size[0]}x{args.size[1]}, features {features}, "
          f"random weights, {cpus} CPUs, {gpus} GPUs")
    print("q4: decode thread with a 4-batch queue inside each worker; q0: decode inline in the worker")
    print(f"{'device':<10}{'workers':>8}{'bare it/s':>11}{'pipeline it/s':>15}{'end-to-end it/s':>17}{'efficiency':>12}")
    for dev, w, bare, proc, e2e in rows:
        print(f"{dev:<10}{w:>8}{bare:>11.3f}{proc:>15.3f}{e2e:>17.3f}{proc / bare:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
