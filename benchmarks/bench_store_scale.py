"""Store at dataset scale: a synthetic 100k-item store with every feature (small dims) on local disk.

Reports, in one run:
  * build: creation (items + captions), writing every row (item features in `--block`-row blocks through
    `write_block`, caption features per chunk, a `--per-row` sample through `write` one row at a time), and
    `pack_ready` — seconds each, files per item (whole store and per feature group), bytes on disk;
  * full status scan (`status()` of every feature), `tvr-store info` in-process (text, stdout discarded);
  * resume planning over `--plan-rows` status rows (a 1M-row store with one tiny feature, statuses planted
    straight into the sharded status array): `status()`, `items()`, entries and `pipelines.plan.plan_items` as
    the driver runs them, with the old per-item planning loop as the baseline;
  * read throughput: whole-feature reads in shard-sized blocks and random 256-row batches (`FeatureStore.read`).
Run: `.venv/bin/python benchmarks/bench_store_scale.py [--items 100000] [--plan-rows 1000000] [--keep DIR]`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import (CaptionRecord, ExtraSpec, FeatureRows, FeatureSpec, FeatureStore, ItemRecord,  # noqa: E402
                   Status)
from store.maintain import layout_info  # noqa: E402

PROV = {"weights": {"random": True, "seed": 0}, "preset": "bench", "variant": "scale"}
SPECS = [FeatureSpec("resnet152", 16, 8), FeatureSpec("i3d_flow", 16, 4, modality="motion"),
         FeatureSpec("vggish", 16, 8, modality="audio"),
         FeatureSpec("dlib_face", 16, 4, slots=2, modality="face", extras=(ExtraSpec("box", (4,)),)),
         FeatureSpec("clip", 16, 4, dtype="float32", modality="clip"),
         FeatureSpec("clip_text", 16, 1, dtype="float32", modality="text", axis="caption", chunk_rows=256),
         FeatureSpec("glove", 8, 6, dtype="float32", modality="words", axis="caption", chunk_rows=256)]


def _rows(spec: FeatureSpec, n: int, rng: np.random.Generator) -> list[FeatureRows]:
    """n OK rows (every 10th ABSENT) of random values."""
    out = []
    for i in range(n):
        if i % 10 == 9 and spec.axis == "item":
            out.append(FeatureRows.absent(spec, "no_face"))
            continue
        k = int(rng.integers(1, spec.max_steps + 1))
        shape = (k, spec.slots, spec.dim) if spec.slots else (k, spec.dim)
        extras = {"box": np.ones((k, spec.slots, 4), np.float32)} if spec.extras else {}
        out.append(FeatureRows(Status.OK, rng.standard_normal(shape).astype(np.float32), np.arange(k, dtype=np.float32),
                               extras=extras))
    return out


def build(path: Path, n: int, block: int, per_row: int) -> dict[str, float]:
    """Create, write and pack the store; seconds per phase."""
    rng = np.random.default_rng(0)
    items = [ItemRecord(f"v{i:07d}", f"/data/v{i:07d}.mp4", split=("train", "val", "test")[i % 3]) for i in range(n)]
    caps = [CaptionRecord(f"v{i:07d}#{j}", f"v{i:07d}", f"caption {j} of item {i}") for i in range(n) for j in range(2)]
    t0 = time.perf_counter()
    s = FeatureStore.create(path, items, caps, features=[(sp, PROV) for sp in SPECS])
    t = {"create": time.perf_counter() - t0}
    t0 = time.perf_counter()
    pool = {sp.name: _rows(sp, block, rng) for sp in SPECS}  # reused row objects: the benchmark times the store
    for sp in SPECS:
        total = n if sp.axis == "item" else 2 * n
        step = block if sp.axis == "item" else sp.chunk_rows * max(1, block // sp.chunk_rows)
        start = per_row if sp.axis == "item" else 0
        for lo in range(start, total, step):
            s.write_block(sp.name, lo, pool[sp.name][: min(step, total - lo)])
    t["write blocks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for sp in SPECS:
        if sp.axis == "item":
            for row in range(per_row):
                s.write(sp.name, row, pool[sp.name][row % block])
    t[f"write {per_row} rows x {sum(sp.axis == 'item' for sp in SPECS)} features one by one"] = \
        time.perf_counter() - t0
    t0 = time.perf_counter()
    s.pack_ready(partial=True)
    t["pack_ready"] = time.perf_counter() - t0
    return t


def timed(fn, repeats: int = 1) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _plan_loop(items, statuses, features, retry_failed):  # type: ignore[no-untyped-def]
    """The per-item loop plan_items used before it was vectorised (the baseline of the planning figure)."""
    from pipelines.plan import ItemTask, needs_work

    todo = {f: needs_work(statuses[f], retry_failed) for f in features}
    out = []
    for row, item_id, path, kind in items:
        feats = tuple(f for f in features if todo[f][row])
        if feats:
            out.append(ItemTask(row=row, item_id=item_id, path=path, kind=kind, features=feats))
    return out


def plan_bench(path: Path, n: int) -> tuple[float, float, int, dict[str, float]]:
    """(status s, status + items + plan s, tasks, seconds per step) over an n-row store with one tiny feature.

    Steps as the driver runs them: status(), items() (the id table), the (row, id, path, kind) entries,
    plan_items; plus the old per-item loop on the same entries as the baseline (same tasks checked)."""
    from pipelines.plan import plan_items

    items = [ItemRecord(f"v{i:07d}", f"/d/{i}.mp4") for i in range(n)]
    s = FeatureStore.create(path, items, features=[(FeatureSpec("tiny", 1, 1), PROV)])
    st = np.random.default_rng(1).choice(np.array([0, 1, 2, 3], np.uint8), n, p=[0.1, 0.8, 0.05, 0.05])
    zarr.open_array(str(path / "tiny" / "status"), mode="r+")[:] = st
    s = FeatureStore.open(path)
    t_status = timed(lambda: s.status("tiny"), 2)
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    statuses = {"tiny": s.status("tiny")}
    steps["status"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    table = s.items()
    steps["items"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    entries = [(r, str(i), str(p), str(k)) for r, (i, p, k) in enumerate(zip(table.id, table.path, table.kind))]
    steps["entries"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    tasks = plan_items(entries, statuses, ["tiny"], retry_failed=True)
    steps["plan_items"] = time.perf_counter() - t1
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    old = _plan_loop(entries, statuses, ["tiny"], True)
    steps["plan_items before (per-item loop)"] = time.perf_counter() - t1
    assert old == tasks
    return t_status, total, len(tasks), steps


def stream_bench(s: FeatureStore, features: list[str], batch: int = 256) -> tuple[float, float, int, int]:
    """(cached rows/s, streamed rows/s, budget bytes, feature bytes): one epoch of batches each, same batch size.

    Cached: every row read into memory first (not timed), batches gathered from it in a seeded permutation, as
    the in-memory training path does. Streamed: train.stream.BlockStream with a budget 4x smaller than the rows.
    """
    from train.stream import BlockStream, from_budget, row_bytes

    rows = np.arange(s.n_items)
    whole = s.read_many(features, rows)
    perm = np.random.default_rng(0).permutation(len(rows))
    t0 = time.perf_counter()
    for lo in range(0, len(rows), batch):
        pos = perm[lo:lo + batch]
        _ = {f: (b.values[pos], b.mask[pos], b.available[pos]) for f, b in whole.items()}
    t_cached = time.perf_counter() - t0
    del whole
    data = row_bytes(s, features) * len(rows)
    cfg = from_budget(s, features, data // 4, batch_size=batch)
    t0 = time.perf_counter()
    n = sum(len(b[features[0]].rows) for b in BlockStream(s, features, rows, cfg).epoch(0))
    t_stream = time.perf_counter() - t0
    assert n == len(rows)
    return len(rows) / t_cached, len(rows) / t_stream, data // 4, data


def main(argv: list[str] | None = None) -> int:
    """Build, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--block", type=int, default=1024, help="rows per write_block call of item features")
    ap.add_argument("--per-row", type=int, default=2000, help="item rows written one at a time through write()")
    ap.add_argument("--plan-rows", type=int, default=1_000_000, help="status rows of the resume-planning check")
    ap.add_argument("--keep", type=Path, default=None, help="build in this folder and keep the store")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_s:
        base = args.keep or Path(tmp_s)
        base.mkdir(parents=True, exist_ok=True)
        path = base / "scale.zarr"
        t = build(path, args.items, args.block, args.per_row)
        s = FeatureStore.open(path)
        info = layout_info(s)
        print(f"synthetic store: {args.items} items, {2 * args.items} captions, {len(SPECS)} features (small dims)")
        for k, v in t.items():
            print(f"  {k}: {v:.1f} s")
        print(f"  files: {info['files']} ({info['files'] / args.items:.4f} per item; "
              f"{info['files_per_item_per_feature']:.4f} per item per feature group), "
              f"bytes: {info['bytes'] / 2**20:.1f} MiB")
        for name, d in info["features"].items():
            print(f"    {name:<10} S={d['shard_rows']:<6} files={d['files']:<5} "
                  f"{d['files'] / args.items:.4f}/item  {d['bytes'] / 2**20:.1f} MiB  staged={d['staged']}")
        print(f"  full status scan, {len(SPECS)} features: {timed(lambda: [s.status(f) for f in s.features], 2):.2f} s")
        from store.cli import main as store_main

        with contextlib.redirect_stdout(io.StringIO()):
            t_info = timed(lambda: store_main(["info", str(path)]), 2)
        print(f"  tvr-store info: {t_info:.2f} s (target <= 5 s)")
        rows = np.arange(s.n_items)
        t_all = timed(lambda: [s.read("resnet152", slice(lo, lo + 4096)) for lo in range(0, s.n_items, 4096)])
        mb = s.n_items * 8 * 16 * 2 / 1e6
        batches = [np.sort(np.random.default_rng(i).choice(rows, 256, replace=False)) for i in range(20)]
        t_rand = timed(lambda: [s.read("resnet152", b) for b in batches])
        print(f"  read resnet152 whole in 4096-row blocks: {t_all:.1f} s ({mb / t_all:.1f} MB/s of values, "
              f"{s.n_items / t_all:.0f} rows/s); random 256-row batches: {20 * 256 / t_rand:.0f} rows/s")
        c, st, budget, data = stream_bench(s, ["resnet152", "vggish", "clip"])
        print(f"  training reads, 3 features, batch 256: in-memory cached {c:.0f} rows/s, streamed (budget "
              f"{budget / 2**20:.1f} MiB = 1/4 of {data / 2**20:.1f} MiB) {st:.0f} rows/s, ratio {st / c:.2f}")
        if args.plan_rows:
            ts, tp, n, steps = plan_bench(base / "plan.zarr", args.plan_rows)
            print(f"  resume planning over {args.plan_rows} status rows: status() {ts:.2f} s, status + items + "
                  f"plan_items {tp:.2f} s ({n} tasks) (target <= 5 s); "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
