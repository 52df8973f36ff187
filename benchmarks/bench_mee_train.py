"""MEE training throughput (pairs/s) from a synthetic store with real feature dims vs bare forward+backward.

The bare loop steps through pre-made batches already collated on the device, so `loader / bare` shows what
reading, sampling and collating from the store costs (same model and optimiser, interleaved, best of `--rounds`).
Run: `flock /tmp/tvr-bench.lock .venv/bin/python benchmarks/bench_mee_train.py`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

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


def _loader_rate(model, opt, data: StoreData, cfg, device: torch.device, epoch: int, steps: int) -> float:
    """pairs/s of `steps` training steps fed straight from the store loader (batches of one epoch)."""
    batches = data.train_batches(epoch, cfg.seed, cfg.batch_size, cfg.image_rate)
    _sync(device)
    t0, n_pairs = time.perf_counter(), 0
    for i, (text, video) in enumerate(batches):
        _step(model, opt, _to(text, device), _to(video, device))
        n_pairs += len(next(iter(text.values())))
        if i + 1 >= steps:
            break
    _sync(device)
    return n_pairs / (time.perf_counter() - t0)


def _bare_rate(model, opt, batches: list, device: torch.device) -> float:
    """pairs/s of one training step per pre-made batch (already collated and on the device)."""
    _sync(device)
    t0, n_pairs = time.perf_counter(), 0
    for text, video in batches:
        _step(model, opt, text, video)
        n_pairs += len(next(iter(text.values())))
    _sync(device)
    return n_pairs / (time.perf_counter() - t0)


def measure(data: StoreData, cfg, device: torch.device, steps: int, rounds: int = 3) -> tuple[float, float]:
    """(pairs/s through the store loader, pairs/s on `steps` distinct pre-made batches), best of `rounds`.

    The pre-made batches are distinct (not one batch reused, which would stay in the CPU cache), so the ratio
    isolates reading, sampling and collating. Interleaving and keeping each one's best makes it robust to other
    load on a shared machine.
    """
    model = build_model(cfg, data).to(device)
    opt = make_optimizer(cfg, model)
    model.train()
    premade = [(_to(t, device), _to(v, device))
               for t, v in itertools.islice(data.train_batches(99, cfg.seed, cfg.batch_size, cfg.image_rate), steps)]
    for text, video in premade[:2]:  # warm-up: allocator, BLAS and Adam state
        _step(model, opt, text, video)
    loader, bare = 0.0, 0.0
    for r in range(rounds):
        loader = max(loader, _loader_rate(model, opt, data, cfg, device, r, steps))
        bare = max(bare, _bare_rate(model, opt, premade, device))
    return loader, bare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--captions-per-item", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; each figure is the best")
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
        print(f"device {device}, batch {args.batch_size}, best of {args.rounds} x {args.steps} timed steps, "
              f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, dims {dims}")
        print(f"{'loader':<28}{'store->model pairs/s':>22}{'pre-made batches pairs/s':>26}{'ratio':>8}")
        for label, budget in (("cached in memory", cfg.cache_bytes), ("read per batch (no cache)", 0)):
            data = StoreData(store, "mee", cache_bytes=budget)
            loader, bare = measure(data, cfg, device, args.steps, args.rounds)
            print(f"{label:<28}{loader:>22.1f}{bare:>26.1f}{loader / bare:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
