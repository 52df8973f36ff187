"""`tvr-extract`: extract features of a dataset into a feature store, locally or on a Ray cluster.

Exit codes: 0 nothing FAILED, 1 some rows FAILED (see the summary table), 2 unusable input or configuration.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipelines.config import ExtractConfig
from extract.decode import FRAME_RULES
from pipelines.dataset import DatasetError
from store.common import RANDOM_IF_MISSING, ConfigError, add_storage_options_argument, load_yaml

_RANDOM_MODES = {"all": True, RANDOM_IF_MISSING: RANDOM_IF_MISSING}


def _csv(text: str) -> list[str]:
    """Split a comma-separated option."""
    return [t.strip() for t in text.split(",") if t.strip()]


def _random_mode(text: str) -> bool | str:
    """`--random-weights [all|missing]` value."""
    if text not in _RANDOM_MODES:
        raise argparse.ArgumentTypeError(f"expected 'all' or {RANDOM_IF_MISSING!r}, got {text!r}")
    return _RANDOM_MODES[text]


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """A bare `--random-weights` means 'all', so it never swallows the SOURCE that may follow it."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--random-weights" and (i + 1 == len(out) or out[i + 1] not in _RANDOM_MODES):
            out[i] = "--random-weights=all"
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option defaults to None so --config values are not overridden silently."""
    p = argparse.ArgumentParser(
        prog="tvr-extract",
        description="Extract video/image/caption features into a tvr feature store (Zarr v3) with Ray. "
        "Rerunning the same command resumes: rows already OK or ABSENT are skipped.",
    )
    p.add_argument("source", nargs="?", help="dataset folder (searched recursively) or manifest (.csv / .jsonl)")
    p.add_argument("--store", help="feature store path (shared filesystem on a cluster) or zarr/fsspec URL")
    add_storage_options_argument(p)
    p.add_argument("--features", type=_csv, help="comma-separated extractors (default: all registered; caption "
                   "features only when the dataset has captions)")
    p.add_argument("--weights-dir", help="folder with weight files")
    p.add_argument("--random-weights", type=_random_mode, metavar="{all,missing}", default=None,
                   help="seeded random weights: 'all' (the default when given bare; tests, benchmarks) or 'missing' "
                   "(only for models whose weights are not found; the output names them)")
    p.add_argument("--no-download", dest="allow_download", action="store_false", default=None,
                   help="never download weights (default: torchvision / open_clip download missing ones into their "
                   "caches when online; TVR_OFFLINE=1 does the same as this flag)")
    p.add_argument("--seed", type=int, help="seed for --random-weights (default 0)")
    p.add_argument("--workers", type=int, help="number of model-holding workers (default: one per GPU, else cpus//2)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker, fractions allowed (default 1 with GPUs)")
    p.add_argument("--cpus-per-worker", type=float, help="Ray CPUs per worker (default: cluster CPUs / workers)")
    p.add_argument("--retry-failed", action="store_true", default=None, help="redo rows that FAILED earlier")
    p.add_argument("--strict", action="store_true", default=None,
                   help="error out listing missing files instead of recording them FAILED missing_file")
    p.add_argument("--max-retries", type=int, help="retries of an item whose worker died (default 2)")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--fps", help=argparse.SUPPRESS)  # removed; parse_config explains why (config.REMOVED)
    p.add_argument("--decode-height", type=int, help="decode frames at this height in px, >= 1 (default: native); "
                   "recorded per feature, a rerun with another height is refused")
    p.add_argument("--frame-rule", choices=FRAME_RULES, help="which source frame each 25 fps output frame shows: "
                   "'nearest' (FFmpeg's fps filter, the default) or 'floor' (the latest one not after it); "
                   "recorded per feature like --decode-height")
    p.add_argument("--update-manifest", action="store_true", default=None,
                   help="on a rerun whose manifest changed an item's path/kind/split or a caption's text: update "
                   "the store's tables and redo those rows (default: refuse, listing the changes)")
    p.add_argument("--batch-size", type=int, help="frames per decoded batch (default 16)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="model precision (default fp32): fp16 runs "
                   "the models in half precision on CUDA, bf16 autocasts frame-step models; recorded per feature "
                   "and compared on reruns")
    p.add_argument("--decode-workers", type=int, help="CPU actors that decode items and stream frame batches to "
                   "the model workers through Ray's object store (default 0: each model worker decodes its own)")
    p.add_argument("--items-in-flight", type=int, help="items each model worker runs at once, their frames "
                   "sharing model batches (default 1); e.g. 32 short items fill ResNet batches at 1 fps")
    p.add_argument("--decode-queue", dest="queue_size", type=int,
                   help="frame batches a decode thread buffers ahead of the models (default 4; 0: decode inline)")
    p.add_argument("--caption-chunk", type=int, help="caption rows per task (default: one store chunk)")
    p.add_argument("--plugins", type=_csv, help="comma-separated modules or .py files that register extractors")
    p.add_argument("--config", help="YAML file with any of these options (command line wins)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    return p


def parse_config(argv: Sequence[str] | None) -> ExtractConfig:
    """Defaults < --config YAML < command line."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(_normalise_argv(raw)))
    cfg = ExtractConfig()
    config_file = args.pop("config")
    if config_file:
        cfg = cfg.updated(load_yaml(config_file), where=f"config file {config_file!r}")
    return cfg.updated({k: v for k, v in args.items() if v is not None}, where="command line")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tvr-extract`; returns the exit code."""
    from pipelines.run import run
    from store.schema import StoreError

    try:
        cfg = parse_config(argv)
        result = run(cfg)
    except (ConfigError, DatasetError, StoreError) as e:
        print(f"tvr-extract: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    print(result.weights_table())
    print(result.time_line())
    print(f"{result.tasks} task(s) in {result.seconds:.1f}s; {result.retried} retried after a worker died; "
          f"exit code {result.exit_code}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
