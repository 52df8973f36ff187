"""Training reads: BlockStream (budget = features/4) vs the in-memory cached path, same batch size, one run.

Builds a synthetic store of `--items` rows with the scale benchmark's resnet152, vggish and clip specs (small
dims), then times one epoch of batches: in-memory (every row read first, batches gathered from a seeded
permutation) and streamed through train.stream.BlockStream, once with store._shard_io's bulk shard reads and
once with zarr's per-inner-chunk reads (the baseline, same store, same run). Also times scattered-row
FeatureStore.read calls both ways.
Run: `.venv/bin/python benchmarks/bench_train_stream.py [--items 30000] [--batch 256] [--dim 512]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_store_scale import PROV, SPECS, _rows, stream_bench  # noqa: E402
from store import FeatureStore, ItemRecord  # noqa: E402
from train.stream import from_budget  # noqa: E402

FEATURES = ["resnet152", "vggish", "clip"]


def build(path: Path, n: int, block: int = 1024, dim: int = 0) -> FeatureStore:
    """A store of n items with FEATURES written and packed; `dim` > 0 replaces the specs' (small) dims."""
    rng = np.random.default_rng(0)
    specs = [dataclasses.replace(sp, dim=dim or sp.dim) for sp in SPECS if sp.name in FEATURES]
    s = FeatureStore.create(path, [ItemRecord(f"v{i:07d}", "/x") for i in range(n)],
                            features=[(sp, PROV) for sp in specs])
    pool = {sp.name: _rows(sp, block, rng) for sp in specs}
    for sp in specs:
        for lo in range(0, n, block):
            s.write_block(sp.name, lo, pool[sp.name][:min(block, n - lo)])
    s.pack_ready(partial=True)
    return FeatureStore.open(path)


def scattered(s: FeatureStore, size: int = 3, k: int = 20) -> float:
    """Seconds per FeatureStore.read of `size` scattered rows."""
    rng = np.random.default_rng(5)
    picks = [np.sort(rng.choice(s.n_items, size, replace=False)) for _ in range(k)]
    t0 = time.perf_counter()
    for p in picks:
        s.read("resnet152", p)
    return (time.perf_counter() - t0) / k


def block_reads(s: FeatureStore, rows: int) -> float:
    """Rows/s of read_many(FEATURES) over consecutive `rows`-row blocks (what a BlockStream reader does)."""
    blocks = [np.arange(lo, min(lo + rows, s.n_items)) for lo in range(0, min(s.n_items, 40 * rows), rows)]
    t0 = time.perf_counter()
    for b in blocks:
        s.read_many(FEATURES, b)
    return sum(len(b) for b in blocks) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Build, measure both read paths, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=30_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=0, help="feature dim of all three features (0: the small dims)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = build(Path(tmp) / "s.zarr", args.items, dim=args.dim)
        print(f"store: {args.items} items, features {FEATURES} (dim {args.dim or 'small'}), "
              f"built in {time.perf_counter() - t0:.1f} s")
        for name in ("zarr per-chunk reads (before)", "bulk shard reads (after)"):
            before = "before" in name  # the baseline: no bulk layout, so every array goes through zarr
            with mock.patch.object(FeatureStore, "_layout", return_value=None) if before else contextlib.nullcontext():
                c, st, budget, data = stream_bench(s, FEATURES, args.batch)
                sc, sc256 = scattered(s), scattered(s, 256, 5)
                blk = from_budget(s, FEATURES, data // 4).block_rows
                br = block_reads(s, blk)
            print(f"  {name}: in-memory {c:.0f} rows/s, streamed {st:.0f} rows/s (budget {budget / 2**20:.1f} MiB "
                  f"= 1/4 of {data / 2**20:.1f} MiB), ratio {st / c:.2f}; FeatureStore.read of 3 scattered rows "
                  f"{sc * 1e3:.1f} ms, of 256 random rows {256 / sc256:.0f} rows/s; read_many of {blk}-row blocks "
                  f"(one reader thread) {br:.0f} rows/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
