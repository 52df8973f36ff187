"""A simulated accelerator for CPU benchmarks (a tvr plugin) and the benchmark that uses it.

The stand-in model (`sim_accel`) reads every 25 fps frame (one value per frame: its mean pixel on a coarse grid)
and spends a fixed wall time per model batch outside the GIL (time.sleep), like a GPU kernel the host waits for.
It is a frame-step extractor, so with `--items-in-flight K` frames of several items share its batches, and like a
model on a CUDA device it overlaps the host (`overlaps_host`): its batches run on the pool's model thread while the
worker's thread reads and prepares the next.
Options (extractor_options: {sim_accel: {...}}): `batch` frames per model call, `batch_seconds` per call.

Benchmark (`python benchmarks/sim_accelerator.py`): one decode CPU's frames/s is measured first (one thread, the
same decode height, bracketed before and after); the stand-in is then calibrated to need `--need` times that.
One model worker runs with 0 (its own decode threads), 1 and 2 decode actors, in one run. "Busy" is the useful
work the accelerator did: frames processed / its capacity (batch / batch_seconds) / processing wall time, so
padded last batches and idle waits both count against it. Run under `flock /tmp/tvr-bench.lock`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cpu_account import CpuSampler  # noqa: E402
from extract._api import FrameStepExtractor, StepPolicy  # noqa: E402
from extract._registry import register_extractor  # noqa: E402
from store.schema import FeatureSpec  # noqa: E402

PLUGIN = str(Path(__file__).resolve())


def _register(cls: type) -> type:
    """Register as `sim_accel`, except in `__main__`: the benchmark imports this file again as its plugin."""
    return cls if __name__ == "__main__" else register_extractor("sim_accel")(cls)


@_register
class SimAccelerator(FrameStepExtractor):
    """Every frame's coarse mean pixel; each model batch costs `batch_seconds` of GIL-free wall time."""

    has_weights: ClassVar[bool] = False

    def __init__(self, *, batch: int = 32, batch_seconds: float = 0.05, max_steps: int = 4096, **kw: Any) -> None:
        """`batch`: frames per model call; `batch_seconds`: wall time per call; `max_steps`: frames kept."""
        super().__init__(**kw)
        self.batch_size, self.batch_seconds = int(batch), float(batch_seconds)
        self.policy = StepPolicy(fps=25.0, max_steps=int(max_steps))
        self.spec = FeatureSpec(name="sim_accel", dim=1, max_steps=int(max_steps), dtype="float32")
        self.weights_identity = {"file": "none (simulated accelerator)", "sha256": ""}
        self.preset, self.variant = "none", "sim"
        self.options = {"batch": self.batch_size, "batch_seconds": self.batch_seconds}
        self.overlaps_host = True  # an accelerator: batches run on the pool's model thread, as a CUDA model's do

    def preprocess(self, frames: np.ndarray) -> Any:
        """uint8 (B, H, W, 3) -> (B, 1) float32: the mean of every 8th pixel (cheap host work)."""
        import torch

        coarse = np.asarray(frames)[:, ::8, ::8].reshape(len(frames), -1)
        return torch.from_numpy(coarse.mean(axis=1, dtype=np.float32)[:, None])

    def forward(self, x: Any) -> Any:
        """The accelerator works: the GIL is free for decoding and reading meanwhile."""
        time.sleep(self.batch_seconds)
        return x


def one_cpu_rate(paths: list[Path], height: int | None) -> tuple[float, float]:
    """Grid frames per wall second and per CPU second of decoding `paths` on one thread at `height` (every frame
    converted, as sim_accel needs). They differ by the CPU share other processes left this thread."""
    from extract import decode

    n = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    for p in paths:
        for b in decode.iter_frames(p, batch_size=16, threads=1, height=height):
            n += len(b)
    return n / (time.perf_counter() - t0), n / (time.thread_time() - c0)


def videos(root: Path, n: int, seconds: float, spread: float, size: tuple[int, int]) -> list[Path]:
    """`n` synthetic videos of `seconds` each, or of lengths spread evenly over seconds x (1 +- spread), shuffled."""
    from benchmarks.bench_pipeline import make_videos

    if not spread:
        return make_videos(root, n, seconds, size)
    lengths = np.random.default_rng(0).permutation(np.linspace(1 - spread, 1 + spread, n)) * seconds
    out = []
    for i, sec in enumerate(lengths):
        (root / f"v{i:03d}").mkdir()
        out += make_videos(root / f"v{i:03d}", 1, max(0.2, float(sec)), size)
    return out


def run_sim(paths: list[Path], tmp: Path, decoders: int, in_flight: int, opts: dict[str, Any],
            height: int | None, queue: int, tag: str) -> tuple[float, float, float, tuple[float, float]]:
    """(accelerator busy share, share of time inside the extractor's calls, process seconds, processing window
    in perf_counter time) of one pipeline run with one model worker."""
    from extract import decode
    from pipelines.config import ExtractConfig
    from pipelines.run import run

    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(f'{{"id": "{p.parent.name}_{p.stem}", "path": "{p}"}}\n' for p in paths))
    cfg = ExtractConfig(source=str(manifest), store=str(tmp / f"sim_{tag}.zarr"), features=["sim_accel"],
                        random_weights=True, workers=1, progress=False, plugins=[PLUGIN], decode_workers=decoders,
                        items_in_flight=in_flight, decode_height=height, queue_size=queue,
                        extractor_options={"sim_accel": opts})
    res = run(cfg)
    assert res.exit_code == 0, res.table()
    frames = sum(decode.probe(p).n_output_frames() for p in paths)
    busy = frames * opts["batch_seconds"] / opts["batch"] / res.process_seconds
    return busy, res.model_seconds["sim_accel"] / res.process_seconds, res.process_seconds, res.process_window


def main(argv: list[str] | None = None) -> int:
    """Calibrate, run every configuration in one Ray session, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=48, help="videos (start-up, ~0.2 s per run, weighs less with more)")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--spread", type=float, default=0.0, help="video lengths vary evenly over seconds x (1 +- "
                    "spread), as real datasets' do (0: all equal)")
    ap.add_argument("--size", type=int, nargs=2, default=(360, 640), help="source height width")
    ap.add_argument("--decode-height", type=int, default=224, help="frames are decoded (resized) to this height, "
                    "the model's input size: decoders send only that many bytes (0: native)")
    ap.add_argument("--need", type=float, default=1.15, help="model frames/s as a multiple of one decode CPU (on 2 "
                    "CPUs, much more leaves no CPU for the model worker, Ray and the driver)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--in-flight", type=int, default=4, help="items per model worker call (cross-item batches)")
    ap.add_argument("--queue", type=int, default=8, help="decoded batches buffered per stream (--decode-queue)")
    ap.add_argument("--configs", default="0:1,0:K,1:K,2:K,2:1", help="decode workers:items in flight per run "
                    "(K: --in-flight)")
    ap.add_argument("--by-cpu", action="store_true", help="calibrate on decode frames per CPU second (what one "
                    "CPU delivers on a quiet machine) instead of per wall second under the current load")
    args = ap.parse_args(argv)
    import ray

    from extract import decode
    from pipelines.worker import import_plugins

    import_plugins([PLUGIN])  # registers sim_accel in this process too

    height = args.decode_height or None
    configs = [(int(n), args.in_flight if k == "K" else int(k))
               for n, k in (c.split(":") for c in args.configs.split(","))]
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        paths = videos(tmp, args.items, args.seconds, args.spread, tuple(args.size))
        rates = [one_cpu_rate(paths, height), one_cpu_rate(paths, height)]
        one_cpu = sum(r[1 if args.by_cpu else 0] for r in rates) / 2
        opts = {"batch": args.batch, "batch_seconds": args.batch / (args.need * one_cpu)}
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            with CpuSampler() as sampler:
                rows = [(n, k, *run_sim(paths, tmp, n, k, opts, height, args.queue, f"{i}"))
                        for i, (n, k) in enumerate(configs)]
        finally:
            ray.shutdown()
        rates.append(one_cpu_rate(paths, height))  # after: did the machine's load move during the runs?
        frames = sum(decode.probe(p).n_output_frames() for p in paths)
    load.append(os.getloadavg()[0])
    shown = ", ".join(f"{w:.0f}/s wall {c:.0f}/s CPU" for w, c in rates)
    lengths = f"{args.seconds:g}s" + (f" +- {args.spread:.0%}" if args.spread else "")
    print(f"\n{args.items} videos x {lengths} {args.size[0]}x{args.size[1]} H.264, decoded at height "
          f"{height or 'native'}; one decode CPU: {one_cpu:.0f} frames/s (per {'CPU' if args.by_cpu else 'wall'} "
          f"second; runs {shown}, the last after the pipeline runs); {os.cpu_count()} CPUs; 1-min load "
          f"{load[0]:.2f} before, {load[1]:.2f} after")
    print(f"simulated accelerator: {args.batch} frames per {opts['batch_seconds'] * 1000:.1f} ms = "
          f"{args.need:g}x one decode CPU ({args.need * one_cpu:.0f} frames/s); 1 model worker; "
          f"decode queue {args.queue}")
    print(f"{'decode':<30}{'items in flight':>16}{'busy':>7}{'in extractor':>14}{'process s':>11}")
    for n, k, busy, inside, secs, _ in rows:
        name = "in-worker decode threads" if n == 0 else f"{n} decode worker(s)"
        print(f"{name:<30}{k:>16}{busy:>7.0%}{inside:>14.0%}{secs:>11.1f}")
    print_cpu(sampler, [(f"{n} dec, {k} in flight", w) for n, k, *_, w in rows])
    print(f"{'session CPU s / 1000 frames':<28}" + "".join(
        f"{sum(v for r, v in sampler.account(*w).items() if not r.startswith('other')) * 1000 / frames:>22.2f}"
        for *_, w in rows) + f"   (one decode thread alone: {1000 / (sum(r[1] for r in rates) / 3):.2f})")
    return 0


def print_cpu(sampler: CpuSampler, windows: list[tuple[str, tuple[float, float]]]) -> None:
    """CPU seconds per process role in each run's processing window (and per wall second: CPUs used)."""
    accounts = [sampler.account(*w) for _, w in windows]
    roles = sorted({r for a in accounts for r in a}, key=lambda r: -sum(a.get(r, 0.0) for a in accounts))
    roles = [r for r in roles if max(a.get(r, 0.0) for a in accounts) >= 0.05]
    print(f"\nCPU seconds in each processing window, per process role (the sampler's own cost: {sampler.own:.1f} s "
          "in the driver)")
    print(f"{'role':<28}" + "".join(f"{name:>22}" for name, _ in windows))
    for r in roles + ["total (session + other)"]:
        vals = [sum(a.values()) if r.startswith("total") else a.get(r, 0.0) for a in accounts]
        print(f"{r:<28}" + "".join(f"{v:>13.1f} ({v / (w[1] - w[0]):.2f}/s)" for v, (_, w) in zip(vals, windows)))


if __name__ == "__main__":
    sys.exit(main())
