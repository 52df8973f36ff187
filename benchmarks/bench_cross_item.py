"""Items/s of I3D (rgb) and VGGish on many short clips with K items in flight (cross-item model batches) vs K = 1.

Decode is excluded: each clip's stream (25 fps frame batches, or 16 kHz audio chunks) is made up front, and K items'
streams are fed round-robin to their sessions (extract.engine.run_group + interleave, as a model worker with
`--items-in-flight K` reads them), so one model batch holds stacks / examples of up to K items. K = 1 and each other
K are timed alternately (1, K, 1, K, ...) in the same run, best of `--repeat`; random weights.
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_cross_item.py` (~3 min on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import create_extractor, engine  # noqa: E402
from extract.decode import FrameBatch, MediaInfo  # noqa: E402

SR = 16000


def clip_streams(name: str, n: int, seconds: float) -> list[tuple[MediaInfo, list[tuple[str, Any]]]]:
    """`n` seeded synthetic clips of `seconds`: (info, stream events) each."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if name == "vggish":
            audio = (0.3 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
            info = MediaInfo(f"c{i}.mkv", "audio", seconds, False, True)
            out.append((info, [("audio", c) for c in np.array_split(audio, 4)]))
            continue
        frames = rng.integers(0, 256, (int(seconds * 25), 128, 160, 3), dtype=np.uint8)
        idx = [np.arange(s, min(s + 16, len(frames))) for s in range(0, len(frames), 16)]
        events = [("frames", FrameBatch(frames[ix], ix / 25, ix)) for ix in idx]
        out.append((MediaInfo(f"c{i}.mkv", "video", seconds, True, False), events))
    return out


def run_items(ex: Any, name: str, clips: Sequence[tuple[MediaInfo, list[tuple[str, Any]]]], k: int) -> float:
    """Seconds to extract every clip, `k` in flight at a time; every row must come back OK."""
    t = time.perf_counter()
    for g in range(0, len(clips), k):
        group = dict(enumerate(clips[g : g + k]))
        runs = {j: engine.ItemRun({name: ex}, info, [name]) for j, (info, _) in group.items()}
        for _, outcome in engine.run_group(runs, engine.interleave({j: iter(ev) for j, (_, ev) in group.items()})):
            outcome.row_or_raise(name)
    return time.perf_counter() - t


def main(argv: Sequence[str] | None = None) -> int:
    """Print items/s per extractor for K = 1 and `--k`, and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="items in flight (compared with 1)")
    ap.add_argument("--repeat", type=int, default=2, help="timings are the best of this many runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setups = {  # short clips: one I3D stack (16 frames + 1) or one VGGish example each
        "i3d_rgb": (dict(stack_size=16, step_size=16, stack_batch=args.k), 8, 0.7),
        "vggish": (dict(batch_size=args.k * 8), 64, 1.2),
    }
    print(f"{'extractor':10} {'items':>5} {'K=1 items/s':>12} {f'K={args.k} items/s':>12} {'ratio':>6}  options")
    for name, (opts, n, seconds) in setups.items():
        ex = create_extractor(name, random_init=True, device="cpu", **opts)
        clips = clip_streams(name, n, seconds)
        run_items(ex, name, clips[:2], 1)  # warm-up
        best = {1: float("inf"), args.k: float("inf")}
        for _ in range(args.repeat):
            for k in best:
                best[k] = min(best[k], run_items(ex, name, clips, k))
        one, many = n / best[1], n / best[args.k]
        print(f"{name:10} {n:5d} {one:12.2f} {many:12.2f} {many / one:6.2f}  {opts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
