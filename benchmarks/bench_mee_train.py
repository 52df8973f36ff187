"""MEE training throughput (pairs/s) from a synthetic store with real feature dims vs bare forward+backward.

The bare loop reuses one pre-made batch already on the device, so `loader / bare` shows what reading,
sampling and collating from the store costs. Run: `.venv/bin/python benchmarks/bench_mee_train.py`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from store import synth  # noqa: E402
from store.zarr_store import FeatureStore  # noqa: E402
from train.config import build_config  # noqa: E402
from train.data import StoreData  # noqa: E402
from train.engine import _to, build_model, make_optimizer, resolve_device  # noqa: E402


def _step(model, opt, text, video) -> None:
    loss, _ = model.loss(model.encode_text(text), model.encode_video(video))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(data: StoreData, cfg, device: torch.device, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(pairs/s through the store loader, pairs/s on a reused pre-made batch)."""
    model = build_model(cfg, data).to(device)
    opt = make_optimizer(cfg, model)
    model.train()
    batches = data.train_batches(0, cfg.seed, cfg.batch_size, cfg.image_rate)
    n_pairs, t0 = 0, None
    for i, (text, video) in enumerate(batches):
        if i == warmup:
            _sync(device)
            t0, n_pairs = time.perf_counter(), 0
        _step(model, opt, _to(text, device), _to(video, device))
        n_pairs += len(next(iter(text.values())))
        if i + 1 >= warmup + steps:
            break
    _sync(device)
    loader = n_pairs / (time.perf_counter() - t0)

    text, video = next(iter(data.train_batches(1, cfg.seed, cfg.batch_size, cfg.image_rate)))
    text, video = _to(text, device), _to(video, device)
    for _ in range(warmup):
        _step(model, opt, text, video)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(model, opt, text, video)
    _sync(device)
    bare = steps * cfg.batch_size / (time.perf_counter() - t0)
    return loader, bare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--captions-per-item", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--store", help="reuse an existing synthetic store instead of generating one")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or str(Path(tmp) / "bench.zarr")
        if not args.store:
            t0 = time.perf_counter()
            synth.generate(url, items=args.items, captions_per_item=args.captions_per_item, images=args.items // 2,
                           missing={"dlib_face": 0.5, "vggish": 0.2}, seed=0)
            print(f"synthetic store (real dims): {args.items} videos + {args.items // 2} images in "
                  f"{time.perf_counter() - t0:.1f} s")
        store = FeatureStore.open(url)
        cfg = build_config("mee", {"batch_size": args.batch_size, "device": args.device})
        dims = {n: store.spec(n).dim for n in ("resnet152", "i3d_flow", "vggish", "dlib_face", "glove")}
        print(f"device {device}, batch {args.batch_size}, {args.steps} timed steps, dims {dims}")
        print(f"{'loader':<28}{'store->model pairs/s':>22}{'bare fwd+bwd pairs/s':>22}{'ratio':>8}")
        for label, budget in (("cached in memory", cfg.cache_bytes), ("read per batch (no cache)", 0)):
            data = StoreData(store, url, "mee", cache_bytes=budget)
            loader, bare = measure(data, cfg, device, args.steps)
            print(f"{label:<28}{loader:>22.1f}{bare:>22.1f}{loader / bare:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
