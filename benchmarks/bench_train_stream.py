"""Training reads: tvr-train's streamed path (budget = features/4) vs its in-memory cached path, one run.

Builds a store of `--items` train videos (2 captions each) with frame, audio and CLIP features and a CLIP text
feature, then times one epoch of `StoreData.train_batches` (the (text, video) tensors a training step gets,
batch `--batch`) three ways in the same process: cached (every feature in memory: what tvr-train does when they
fit `--cache-gb`), streamed (train/stream_train.py with a budget 4x smaller than the features, as stored) and
the old path for that budget (cached where a feature fits, the rest read from the store per batch, one epoch).
Cached and streamed epochs alternate for `--rounds` rounds (one epoch is a fraction of a second, so load from
other processes swings single figures): medians of pairs/s and of process CPU per pair (all threads) are
reported with their ratios. A streamed epoch's allocations are traced (tracemalloc: numpy buffers included),
to compare with the budget; the process RSS includes the store build and the cached features. Torch runs
with one thread (`--threads`): with two threads on a loaded 2-core machine the cached path's index ops spin.
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_train_stream.py [--items 30000] [--dim 64]`.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import CaptionRecord, FeatureRows, FeatureSpec, FeatureStore, ItemRecord, Status  # noqa: E402
from train.data import StoreData, cache_need  # noqa: E402
from train.models._api import FeatureNeeds  # noqa: E402

PROV = {"weights": {"random": True, "seed": 0}, "preset": "bench"}
NEEDS = FeatureNeeds(video=("resnet152", "vggish", "clip"), text="clip_text", text_key="clip_text",
                     text_sequence=False)


def specs(dim: int) -> list[FeatureSpec]:
    """Frame (float16), audio (float16), CLIP frame (float32) and CLIP text features of width `dim`."""
    return [FeatureSpec("resnet152", dim, 8), FeatureSpec("vggish", dim, 8, modality="audio"),
            FeatureSpec("clip", dim, 12, dtype="float32", modality="clip"),
            FeatureSpec("clip_text", dim, 1, dtype="float32", modality="text", axis="caption", chunk_rows=256)]


def build(path: Path, n: int, dim: int, block: int = 1024) -> FeatureStore:
    """n train items (every 10th without audio), 2 captions each, every feature written and packed."""
    rng = np.random.default_rng(0)
    s = FeatureStore.create(path, [ItemRecord(f"v{i:07d}", "/x", split="train") for i in range(n)],
                            [CaptionRecord(f"v{i:07d}#{k}", f"v{i:07d}", "c") for i in range(n) for k in range(2)],
                            features=[(sp, PROV) for sp in specs(dim)])
    for sp in specs(dim):
        total = n * (2 if sp.axis == "caption" else 1)
        pool = [FeatureRows.absent(sp, "no_audio") if sp.name == "vggish" and i % 10 == 9 else FeatureRows(
            Status.OK, rng.standard_normal((sp.max_steps, sp.dim)).astype(np.float32),
            np.arange(sp.max_steps, dtype=np.float32)) for i in range(block)]
        for lo in range(0, total, block):
            s.write_block(sp.name, lo, pool[:min(block, total - lo)])
    s.pack_ready(partial=True)
    return FeatureStore.open(path)


def epoch_rate(data: StoreData, batch: int, epoch: int = 1) -> float:
    """Pairs/s of one epoch of train_batches, after an untimed epoch 0 (imports, caches)."""
    for _ in data.train_batches(0, 0, batch, 0.0):
        pass
    return timed_epoch(data, batch, epoch)[0]


def timed_epoch(data: StoreData, batch: int, epoch: int) -> tuple[float, float]:
    """(pairs/s, process CPU microseconds per pair, every thread) of one epoch of train_batches."""
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for _, video in data.train_batches(epoch, 0, batch, 0.0):
        n += len(video["clip"])
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


def rounds(cached: StoreData, streamed: StoreData, batch: int, n: int) -> list[tuple[tuple[float, float], ...]]:
    """`n` rounds of one cached and one streamed epoch back to back (which goes first alternates, so load that
    drifts during a round biases neither): [(cached (pairs/s, us/pair), streamed (pairs/s, us/pair))]."""
    for d in (cached, streamed):
        for _ in d.train_batches(0, 0, batch, 0.0):  # untimed: imports, caches
            pass
    out = []
    for r in range(n):
        first, second = (cached, streamed) if r % 2 == 0 else (streamed, cached)
        a, b = timed_epoch(first, batch, r + 1), timed_epoch(second, batch, r + 1)
        out.append((a, b) if r % 2 == 0 else (b, a))
    return out


def traced_peak(data: StoreData, batch: int, epoch: int = 0) -> int:
    """Peak bytes allocated (tracemalloc: numpy buffers included) during one epoch of train_batches."""
    tracemalloc.start()
    for _ in data.train_batches(epoch, 0, batch, 0.0):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def report(res: list[tuple[tuple[float, float], ...]], budget: int) -> None:
    """Per-round and median pairs/s, CPU per pair and streamed/cached ratios."""
    med = statistics.median
    for r, ((cr, cc), (sr, sc)) in enumerate(res):
        print(f"    round {r + 1}: cached {cr:>9.0f} pairs/s {cc:5.2f} us/pair | streamed {sr:>9.0f} pairs/s "
              f"{sc:5.2f} us/pair | ratio {sr / cr:.2f}")
    cr, sr = med(c[0] for c, _ in res), med(s[0] for _, s in res)
    cc, sc = med(c[1] for c, _ in res), med(s[1] for _, s in res)
    print(f"  cached (everything in memory)          {cr:>10.0f} pairs/s  {cc:5.2f} us CPU/pair (medians)")
    print(f"  streamed, budget {budget / 2**20:.1f} MiB = features/4 {sr:>10.0f} pairs/s  {sc:5.2f} us CPU/pair  "
          f"ratio {sr / cr:.2f} (median of rounds {med(s[0] / c[0] for c, s in res):.2f}; CPU {cc / sc:.2f})")


def main(argv: list[str] | None = None) -> int:
    """Build, measure the three read paths, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=64, help="feature width of every feature")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--rounds", type=int, default=5, help="cached/streamed epoch pairs timed (medians reported)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = build(Path(tmp) / "s.zarr", args.items, args.dim)
        feats = sum(cache_need(s.spec(f), s.n_rows(f)) for f in (*NEEDS.video, NEEDS.text))
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        print(f"store: {args.items} items, {2 * args.items} captions, dim {args.dim}: features {feats / 2**20:.1f} "
              f"MiB in memory as stored, {disk / 2**20:.1f} MiB on disk; built in {time.perf_counter() - t0:.1f} s; "
              f"batch {args.batch}, torch threads {args.threads}, load {os.getloadavg()[0]:.2f}")
        budget = feats // 4
        streamed = StoreData(s, NEEDS, cache_bytes=budget)
        assert streamed.stream is not None
        print(f"  {streamed.stream.describe(0.0, 'per_video', args.batch)}")
        traced = traced_peak(streamed, args.batch)
        report(rounds(StoreData(s, NEEDS, cache_bytes=2 * feats), streamed, args.batch, args.rounds), budget)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        old = epoch_rate(StoreData(s, NEEDS, cache_bytes=budget, train_reads="cached"), args.batch)
        print(f"  old path for that budget (per batch)   {old:>10.0f} pairs/s (one epoch)")
        print(f"  streamed epoch: peak traced allocations {traced / 2**20:.1f} MiB (budget {budget / 2**20:.1f} MiB); "
              f"process max RSS {rss / 2**10:.0f} MiB (the store build and the cached features included), "
              f"load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
