"""Decode stage and frame selection, on a CPU machine with a simulated accelerator (benchmarks/sim_accelerator.py).

1. Frame selection: decoding an item for resnet152 (1 fps) + clip (12 frames) converts only their frames; frames/s
   of `iter_frames` with and without `keep`, on the same files.
2. Decode stage: a stand-in model that needs every frame and sleeps a fixed time per batch (GIL free), calibrated
   to need `--need` x the frames/s one decode CPU delivers (measured first, in this run). Share of the run the
   model is busy: today's in-worker decode thread vs `--decode-workers N`, same videos, same run.
Run: `.venv/bin/python benchmarks/bench_decode_stage.py [--items 12 --seconds 6 --decoders 2 --need 1.4]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import make_videos  # noqa: E402

PLUGIN = str(ROOT / "benchmarks" / "sim_accelerator.py")


def decode_rate(paths: list[Path], keep_for: list[str] | None = None) -> tuple[float, float]:
    """(grid frames/s, converted frames per grid frame) decoding `paths` on one thread; `keep_for`: features."""
    from extract import decode, engine
    from extract._registry import create_extractor

    exs = [create_extractor(f, random_init=True, device="cpu") for f in keep_for or []]
    grid = kept = 0
    t0 = time.perf_counter()
    for p in paths:
        info = decode.probe(p)
        keep = engine.plan_streams(exs, info).keep if exs else None
        n = info.n_output_frames()
        for b in decode.iter_frames(p, batch_size=16, threads=1, keep=keep):
            kept += len(b)
        grid += n
    return grid / (time.perf_counter() - t0), kept / max(grid, 1)


def run_sim(paths: list[Path], tmp: Path, decoders: int, batch: int, batch_seconds: float,
            tag: str) -> tuple[float, float]:
    """(model busy share, process seconds) of one pipeline run with one model worker."""
    from pipelines.config import ExtractConfig
    from pipelines.run import run

    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(f'{{"id": "{p.stem}", "path": "{p}"}}\n' for p in paths))
    cfg = ExtractConfig(source=str(manifest), store=str(tmp / f"sim_{tag}.zarr"), features=["sim_accel"],
                        random_weights=True, workers=1, progress=False, plugins=[PLUGIN], decode_workers=decoders,
                        extractor_options={"sim_accel": {"batch": batch, "batch_seconds": batch_seconds}})
    res = run(cfg)
    assert res.exit_code == 0, res.table()
    return res.model_seconds["sim_accel"] / res.process_seconds, res.process_seconds


def main(argv: list[str] | None = None) -> int:
    """Measure and print both tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--size", type=int, nargs=2, default=(360, 640), help="height width")
    ap.add_argument("--decoders", type=int, default=2)
    ap.add_argument("--need", type=float, default=1.4, help="model frames/s as a multiple of one decode CPU")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    import ray

    import extract  # noqa: F401
    from pipelines.worker import import_plugins

    import_plugins([PLUGIN])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = make_videos(tmp, args.items, args.seconds, tuple(args.size))
        full, _ = decode_rate(paths)
        sel, share = decode_rate(paths, ["resnet152", "clip"])
        full2, _ = decode_rate(paths)  # again: the machine is shared, so bracket the selective run
        one_cpu = (full + full2) / 2
        print(f"frame selection ({args.items} x {args.seconds:g}s {args.size[0]}x{args.size[1]} H.264, 1 thread): "
              f"all frames {one_cpu:.0f} grid frames/s (runs {full:.0f}, {full2:.0f}); resnet152+clip keep "
              f"{share:.1%} of the frames: {sel:.0f} grid frames/s ({sel / one_cpu:.2f}x)", flush=True)
        batch_seconds = args.batch / (args.need * one_cpu)
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            rows = [(n, *run_sim(paths, tmp, n, args.batch, batch_seconds, str(i)))
                    for i, n in enumerate((0, args.decoders, 0, args.decoders))]
        finally:
            ray.shutdown()
    print(f"\nsimulated accelerator: {args.batch} frames per {batch_seconds * 1000:.1f} ms = "
          f"{args.need:g}x one decode CPU ({one_cpu:.0f} frames/s); {os.cpu_count()} CPUs; 1 model worker")
    print(f"{'decode':<34}{'model busy':>11}{'process s':>11}")
    for n, busy, secs in rows:
        name = "in-worker decode thread (today)" if n == 0 else f"decode stage, {n} decode workers"
        print(f"{name:<34}{busy:>11.0%}{secs:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
