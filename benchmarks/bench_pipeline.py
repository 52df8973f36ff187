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
from typing import Any, Callable

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_video(path: Path, frames: np.ndarray, fps: int = 25, lossless: bool = False) -> None:
    """H.264 as datasets ship it (yuv420p, crf 23), or lossless RGB (libx264rgb crf 0, ~5x costlier to decode)."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        vs.width, vs.height = w, h
        vs.pix_fmt, vs.options = ("rgb24", {"crf": "0"}) if lossless else ("yuv420p", {"crf": "23"})
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)


def make_videos(root: Path, n: int, seconds: float, size: tuple[int, int], lossless: bool = False) -> list[Path]:
    """`n` synthetic videos: a textured scene panning under moving colour gradients (seeded)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    texture = np.random.default_rng(0).integers(0, 96, (h, w + max(256, 2 * int(seconds * 25)), 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        frames = np.stack([
            np.stack([(xx + 3 * t + 10 * i) % 160, (yy + 2 * t) % 160, (xx + yy + t * (i + 1)) % 160], -1)
            + texture[:, 2 * t : 2 * t + w]
            for t in range(int(seconds * 25))
        ]).astype(np.uint8)
        p = root / f"bench_{i:02d}.mkv"
        write_video(p, frames, lossless=lossless)
        paths.append(p)
    return paths


def bare_runner(paths: list[Path], features: list[str], device: str, threads: int) -> Callable[[], float]:
    """A function measuring items/s of the extractors' sessions fed pre-decoded frames (no Ray, no decode timed)."""
    import torch

    import extract  # noqa: F401
    from extract import decode
    from extract._registry import create_extractor

    torch.set_num_threads(threads)
    exs = {f: create_extractor(f, random_init=True, seed=0, device=device) for f in features}
    decoded = [(decode.probe(p), list(decode.iter_frames(p, fps=25.0, batch_size=16))) for p in paths]

    def one(info: Any, batches: list[Any]) -> None:
        for ex in exs.values():
            s = ex.start(info)
            for b in batches:
                s.add_frames(b)
            s.finish()

    one(*decoded[0])  # warm-up, so lazy init (kernels, allocator) is not timed

    def measure() -> float:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        for info, batches in decoded:
            one(info, batches)
        return len(paths) / (time.perf_counter() - t0)

    return measure


def pipeline_throughput(paths: list[Path], features: list[str], workers: int, tmp: Path, gpus: float,
                        plugins: list[str], queue_size: int = 4, in_flight: int = 1,
                        run_no: int = 0) -> tuple[float, float, float]:
    """(processing items/s, end-to-end items/s, share of worker time inside the models) on a fresh store;
    `in_flight`: items per worker call (--items-in-flight, cross-item model batches); `run_no` keeps a repeated
    row's store apart (a reused store would have nothing left to extract)."""
    from pipelines.config import ExtractConfig
    from pipelines.run import run

    store = tmp / f"store{run_no}_w{workers}_g{gpus:g}_q{queue_size}_k{in_flight}.zarr"
    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(f'{{"id": "{p.stem}", "path": "{p}"}}\n' for p in paths))
    cfg = ExtractConfig(source=str(manifest), store=str(store), features=features, random_weights=True,
                        workers=workers, gpus_per_worker=gpus, progress=False, plugins=plugins,
                        queue_size=queue_size, items_in_flight=in_flight)
    t0 = time.perf_counter()
    res = run(cfg)
    total = time.perf_counter() - t0
    assert res.exit_code == 0, res.table()
    busy = sum(res.model_seconds.values()) / (res.process_seconds * workers)
    in_task = res.task_seconds / (res.process_seconds * workers)
    print(f"workers={workers} q{queue_size} k{in_flight}: {in_task:.0%} of worker time inside tasks, {busy:.0%} inside models; "
          f"{res.time_line()}", flush=True)
    return len(paths) / res.process_seconds, len(paths) / total, busy


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, nargs=2, default=(240, 320), help="height width (MSR-VTT: 240 320)")
    ap.add_argument("--lossless", action="store_true", help="lossless RGB H.264 inputs (decode-heavy worst case)")
    ap.add_argument("--features", default="resnet152,clip")
    ap.add_argument("--plugins", default="", help="modules or .py files registering extra extractors")
    ap.add_argument("--in-flight", type=int, default=4, help="items per worker call in the cross-item row")
    ap.add_argument("--rows", default="1:4:1,2:4:1,1:0:1,2:0:1,1:4:K", help="CPU rows to run, each "
                    "workers:queue:items in flight (K: --in-flight)")
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
        paths = make_videos(tmp, args.items, args.seconds, tuple(args.size), args.lossless)
        kbps = sum(p.stat().st_size for p in paths) * 8 / 1000 / (args.items * args.seconds)
        # The machine is shared: the bare rate is measured right before and after each pipeline run, and the
        # efficiency uses their mean, so load that changes between runs moves both sides alike.
        bare_cpu = bare_runner(paths, features, "cpu", cpus)
        last = bare_cpu()
        for n, (w, q, k) in enumerate((int(w), int(q), args.in_flight if k == "K" else int(k))
                                      for w, q, k in (r.split(":") for r in args.rows.split(","))):
            proc, e2e, busy = pipeline_throughput(paths, features, w, tmp, 0.0, plugins, q, k, run_no=n)
            after = bare_cpu()
            rows.append((f"cpu q{q} k{k}", w, (last + after) / 2, proc, e2e, busy,
                         abs(after - last) / (last + after) * 2))
            last = after
        if gpus:
            bare_gpu = bare_runner(paths, features, "cuda", cpus)
            before = bare_gpu()
            proc, e2e, busy = pipeline_throughput(paths, features, gpus, tmp, 1.0, plugins)
            after = bare_gpu()
            rows.append((f"{gpus}xgpu q4", gpus, (before + after) / 2 * gpus, proc, e2e, busy,
                         abs(after - before) / (before + after) * 2))
    ray.shutdown()
    codec = "lossless RGB H.264" if args.lossless else "H.264 yuv420p crf 23"
    print(f"\n{args.items} videos x {args.seconds:g}s {args.size[0]}x{args.size[1]} {codec} ({kbps:.0f} kbit/s), "
          f"features {features}, random weights, {cpus} CPUs, {gpus} GPUs")
    print("q4: decode thread with a 4-batch queue inside each worker; q0: decode inline in the worker; kK: K items "
          "per worker call sharing model batches (--items-in-flight)")
    print("in-model: share of each worker's processing time spent inside the extractors (the rest: waiting for "
          "decode, store writes, Ray)")
    print("bare: mean of the bare rate measured just before and just after that row's pipeline run (+-: their "
          "relative difference, a gauge of how much the machine's load moved)")
    print(f"{'device':<13}{'workers':>8}{'bare it/s':>11}{'+-':>6}{'pipeline it/s':>15}{'end-to-end it/s':>17}"
          f"{'efficiency':>12}{'in-model':>10}")
    for dev, w, bare, proc, e2e, busy, spread in rows:
        print(f"{dev:<13}{w:>8}{bare:>11.3f}{spread:>6.0%}{proc:>15.3f}{e2e:>17.3f}{proc / bare:>12.2f}{busy:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
