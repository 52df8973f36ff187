"""The main job on a built-in default: sample dataset -> `tvr-extract` (every feature) -> store summary -> training.

Run with `make demo` (or `python -m pipelines.demo --out demo-out`). Weights that cannot be found on this machine
(no `--weights-dir`, no hub cache, offline) are replaced by seeded random weights, and the output says so for each
feature; dlib's models and GloVe vectors ship inside registry packages, so those two are always real.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence


# RAFT dominates I3D flow (~1.6 s per frame pair for raft_large on 2 CPU cores, extract/i3d.py): on CPU the demo
# cuts the pairs per video (2 stacks of 16 frames) and their cost (raft_small), so it finishes in minutes.
_CPU_STACKS = "stack_size: 16, step_size: 16, max_steps: 2"
CPU_I3D_CONFIG = ("extractor_options:\n"
                  f"  i3d_flow: {{raft: raft_small.C_T_V2, num_flow_updates: 12, {_CPU_STACKS}}}\n"
                  f"  i3d_rgb: {{{_CPU_STACKS}}}\n")


def _has_cuda() -> bool:
    """Whether torch sees a GPU (the Ray workers run on this machine)."""
    from store.common import pick_device

    return pick_device("auto").type == "cuda"


_T0 = time.perf_counter()


def _banner(text: str) -> None:
    """Print a section heading with the time since the demo started."""
    print(f"\n=== {text} (t={time.perf_counter() - _T0:.0f}s) ===", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when every stage behaved as expected."""
    from pipelines.cli import main as extract_main
    from pipelines.samples import CORRUPT_ID, make_sample_dataset
    from store.cli import main as store_main
    from train.cli import main as train_main
    from train.metrics import format_table

    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="folder for the sample data, stores and runs (recreated)")
    p.add_argument("--weights-dir", default=None, help="folder with real weight files (used where present)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per model")
    p.add_argument("--full-flow", action="store_true", help="default RAFT (raft_large, 20 updates) even on CPU")
    args = p.parse_args(argv)
    global _T0
    _T0 = time.perf_counter()

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    _banner("1/4 sample dataset")
    manifest = make_sample_dataset(out / "samples")
    print(f"wrote {manifest} (videos with and without audio, a face video, still images, captions, one corrupt file)")

    _banner("2/4 tvr-extract (every feature)")
    store = out / "features.zarr"
    extract_args = [str(manifest), "--store", str(store), "--random-weights", "missing"]
    if args.weights_dir:
        extract_args += ["--weights-dir", args.weights_dir]
    if not args.full_flow and not _has_cuda():
        cfg = out / "demo-extract.yaml"
        cfg.write_text(CPU_I3D_CONFIG)
        extract_args += ["--config", str(cfg)]
        print("no GPU: I3D runs a CPU-sized recipe here (written to demo-extract.yaml and recorded in each store "
              "group's provenance): 16-frame stacks, at most 2 per video, flow from raft_small with 12 updates. "
              "The defaults (64-frame stacks, raft_large with 20 updates) cost ~40 s of CPU per second of video; "
              "pass --full-flow to use them anyway.")
    code = extract_main(extract_args)
    # The sample set holds one corrupt file on purpose, so exactly that item must fail.
    from store import FeatureStore, Status

    fs = FeatureStore.open(str(store))
    failed = {
        fs.items().id[row]
        for name in fs.features
        if fs.spec(name).axis == "item"
        for row in (fs.status(name) == Status.FAILED).nonzero()[0]
    }
    print(f"tvr-extract exit code {code}; failed items: {sorted(failed)}")
    if code != 1 or failed != {CORRUPT_ID}:
        print("demo: expected exactly the corrupt sample to fail", file=sys.stderr)
        return 1

    _banner("3/4 store summary (tvr-store info)")
    if store_main(["info", str(store)]) != 0:
        return 1

    _banner("4/4 training on a synthetic store (tvr-store synth, tvr-train)")
    synth = out / "synth.zarr"
    if store_main(["synth", str(synth), "--items", "600", "--captions-per-item", "3", "--images", "100",
                   "--missing", "face=0.5,audio=0.2", "--seed", "0", "--small"]) != 0:
        return 1
    results: dict[str, dict] = {}
    # T-MASS's reference lr (1e-5) is for fine-tuning CLIP; on frozen features a few epochs need a larger one.
    extra = {"mee": [], "tmass": ["--lr", "1e-4"]}
    for model in ("mee", "tmass"):
        run_dir = out / "runs" / model
        if train_main([model, "--store", str(synth), "--out", str(run_dir), "--epochs", str(args.epochs),
                       "--seed", "0", *extra[model]]) != 0:
            return 1
        results[model] = json.loads((run_dir / "metrics.json").read_text())
    print("\ntest-split metrics on the synthetic store (percent; ranks 1-based)")
    for model, metrics in results.items():
        print(f"{model}\n{format_table(metrics)}")
    print(f"\ndemo finished in {time.perf_counter() - _T0:.0f}s; all outputs under {out}/ "
          f"(open {store} with xarray: see docs/inspect_store.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
