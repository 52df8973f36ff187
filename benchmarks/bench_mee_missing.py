"""MEE on a synthetic store with missing modalities: availability renormalisation vs zero-filling.

Both runs use the same store, seed, epochs and hyper-parameters; the zero-fill run marks every modality
available and feeds zero vectors for missing ones (`zero_fill_missing`, as the original MEE inputs without its
renormalisation). Run: `.venv/bin/python benchmarks/bench_mee_missing.py`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import synth  # noqa: E402
from store.zarr_store import FeatureStore  # noqa: E402
from train.config import build_config  # noqa: E402
from train.data import StoreData  # noqa: E402
from train.engine import fit  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--captions-per-item", type=int, default=5)
    p.add_argument("--missing", default="face=0.6,audio=0.5,motion=0.3")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=True, help="64-d features (default)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = str(Path(tmp) / "missing.zarr")
        synth.generate(url, items=args.items, captions_per_item=args.captions_per_item,
                       missing=synth.parse_missing(args.missing), images=0, seed=0, small=args.small)
        store = FeatureStore.open(url)
        for seed in (int(s) for s in args.seeds.split(",")):
            for label, zero_fill in (("renormalise", False), ("zero-fill", True)):
                cfg = build_config("mee", {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                           "seed": seed, "device": args.device, "zero_fill_missing": zero_fill,
                                           "image_rate": 0.0})
                data = StoreData(store, "mee", zero_fill_missing=zero_fill)
                t0 = time.perf_counter()
                m = fit(cfg, data, Path(tmp) / f"{label}-{seed}", store_url=url, log=lambda s: None, progress=False)
                rows.append((seed, label, m, time.perf_counter() - t0))
    print(f"store: {args.items} videos, missing {args.missing}, {args.epochs} epochs, batch {args.batch_size}, "
          f"lr {args.lr}; test split, best-val checkpoint")
    print(f"{'seed':>4} {'missing modalities':<20}{'t2v R@1':>9}{'R@5':>8}{'R@10':>8}{'MdR':>7}{'v2t R@1':>9}{'time s':>8}")
    for seed, label, m, dt in rows:
        t, v = m["t2v"], m["v2t"]
        print(f"{seed:>4} {label:<20}{t['R@1']:>9.2f}{t['R@5']:>8.2f}{t['R@10']:>8.2f}{t['MdR']:>7.1f}{v['R@1']:>9.2f}{dt:>8.1f}")
    summary: dict[tuple[str, str], np.ndarray] = {}
    for label in ("renormalise", "zero-fill"):
        for d in ("t2v", "v2t"):
            r1 = np.array([m[d]["R@1"] for _, lab, m, _ in rows if lab == label])
            summary[label, d] = r1
            sd = r1.std(ddof=1) if len(r1) > 1 else 0.0
            print(f"mean over {len(r1)} seeds, {label:<12} {d} R@1 {r1.mean():6.2f} +- {sd:.2f}")
    for d in ("t2v", "v2t"):
        diff = summary["renormalise", d] - summary["zero-fill", d]
        ratio = summary["renormalise", d].mean() / max(summary["zero-fill", d].mean(), 1e-9)
        print(f"renormalise - zero-fill, {d} R@1: {diff.mean():+.2f} points "
              f"(per seed: {', '.join(f'{x:+.2f}' for x in diff)}); ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
