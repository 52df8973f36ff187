"""The GPU check: the real pipeline on generated 640x360 videos vs each model alone, on a CUDA machine.

Per feature: pipeline model-frames/s (frames the model consumed / processing seconds, workers up and models loaded),
bare-model frames/s (the same extractor's preprocess + forward on decoded frames at the same batch size and
precision, no decoding, no Ray), their ratio, and the GPU utilisation sampled while the pipeline ran
(`torch.cuda.utilization()`, which needs NVML / pynvml; "n/a" without it). Random weights (the timing does not
depend on them). On a machine without CUDA it prints why and exits 0 without measuring anything.
Run: `.venv/bin/python benchmarks/bench_gpu.py [--items 32 --seconds 10 --features resnet152,clip --decode-workers 8]`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class UtilSampler:
    """Samples GPU utilisation (%) every `every` s in a thread; mean over the samples."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import torch

        while not self.stop.wait(self.every):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - no NVML: utilisation is unknown, say "n/a"
                return

    def __enter__(self) -> "UtilSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=2)

    def mean(self) -> str:
        return f"{np.mean(self.samples):.0f}%" if self.samples else "n/a"


def model_frames(feature: str, paths: list[Path], options: dict[str, Any]) -> int:
    """Frames the feature's model consumes over `paths` (its step frames; every grid frame for I3D)."""
    from extract import decode
    from extract._registry import create_extractor

    ex = create_extractor(feature, random_init=True, device="cpu", **options)
    total = 0
    for p in paths:
        info = decode.probe(p)
        need = ex.frames_needed(info)
        total += info.n_output_frames() if need is None else len(ex.step_times(info))
    return total


def bare_rate(feature: str, options: dict[str, Any], size: tuple[int, int], batch: int, reps: int) -> float:
    """Frames/s of preprocess + forward on random uint8 frames at `size`, batch `batch`, on CUDA."""
    import torch

    from extract._registry import create_extractor

    ex = create_extractor(feature, random_init=True, device="cuda", **options)
    frames = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    ex.run_batch(frames)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        ex.run_batch(frames)
    torch.cuda.synchronize()
    return reps * batch / (time.perf_counter() - t0)


def pipeline_rate(feature: str, options: dict[str, Any], paths: list[Path], tmp: Path, decoders: int,
                  n_frames: int) -> tuple[float, str]:
    """(model frames/s while processing, mean GPU utilisation) of one tvr-extract run of `feature`."""
    from pipelines.config import ExtractConfig
    from pipelines.run import run

    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(f'{{"id": "{p.stem}", "path": "{p}"}}\n' for p in paths))
    cfg = ExtractConfig(source=str(manifest), store=str(tmp / f"{feature}_d{decoders}.zarr"), features=[feature],
                        random_weights=True, progress=False, decode_workers=decoders,
                        extractor_options={feature: options})
    with UtilSampler() as util:
        res = run(cfg)
    if res.exit_code != 0:
        raise SystemExit(f"bench_gpu: the {feature} run failed:\n{res.table()}")
    return n_frames / res.process_seconds, util.mean()


def main(argv: list[str] | None = None) -> int:
    """Measure and print one line per feature; exit 0 with a message when there is no CUDA device."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--features", default="resnet152,clip")
    ap.add_argument("--batch", type=int, default=32, help="model batch size (extractor option batch_size)")
    ap.add_argument("--half", action="store_true", help="fp16 models (extractor option half)")
    ap.add_argument("--decode-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU node.")
        return 0
    import ray

    import extract  # noqa: F401
    from benchmarks.bench_pipeline import make_videos

    features = [f for f in args.features.split(",") if f]
    opts = {f: {"batch_size": args.batch, "half": args.half} for f in features}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = make_videos(tmp, args.items, args.seconds, (360, 640))
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            for f in features:
                n = model_frames(f, paths, opts[f])
                inline, _ = pipeline_rate(f, opts[f], paths, tmp, 0, n)
                staged, util = pipeline_rate(f, opts[f], paths, tmp, args.decode_workers, n)
                bare = bare_rate(f, opts[f], (360, 640), args.batch, args.reps)
                rows.append((f, bare, inline, staged, util))
        finally:
            ray.shutdown()
    print(f"\n{args.items} videos x {args.seconds:g}s 640x360 H.264; batch {args.batch}, "
          f"{'fp16' if args.half else 'fp32'}; {torch.cuda.get_device_name(0)}; decode stage: {args.decode_workers} "
          f"decode workers")
    print(f"{'feature':<12}{'bare fr/s':>11}{'in-worker fr/s':>16}{'staged fr/s':>13}{'staged/bare':>13}"
          f"{'GPU util':>10}")
    for f, bare, inline, staged, util in rows:
        print(f"{f:<12}{bare:>11.0f}{inline:>16.0f}{staged:>13.0f}{staged / bare:>13.2f}{util:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
