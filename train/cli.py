"""`tvr-train`: train MEE / T-MASS / X-Pool on a tvr feature store, or evaluate a run.

    tvr-train mee|tmass|xpool --store STORE --out RUN [--recipe NAME] [--config FILE.yaml] [--epochs E] [--batch-size B]
              [--lr LR] [--device auto|cpu|cuda] [--seed S] [--image-rate A] [--zero-fill-missing] [--resume]
              [--stop-after N] [--cache-gb G] [--train-reads auto|cached|stream] [--storage-options JSON|FILE]
    tvr-train eval RUN [--store STORE] [--split test] [--checkpoint best|last] [--noise-seeds N]
              [--storage-options JSON|FILE]

--storage-options (fsspec options of an object-store URL, e.g. endpoint and credentials) are never written into
RUN/config.yaml; give them again to `eval` and `--resume`.

Config precedence: model defaults < --recipe < RUN/config.yaml (with --resume) < --config FILE.yaml < flags.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

from store.common import add_storage_options_argument, parse_storage_options
from train.config import MODELS, RECIPES, ConfigError, build_config, config_from_run_yaml, load_yaml, resume_changes

if TYPE_CHECKING:  # the store (zarr, xarray) is imported when a command needs it
    from store.zarr_store import FeatureStore

_FLAGS = {  # CLI dest -> TrainConfig key
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "device": "device",
    "seed": "seed",
    "image_rate": "image_rate",
    "eval_chunk": "eval_chunk",
    "recipe": "recipe",
    "train_reads": "train_reads",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvr-train", description="Train or evaluate text-video retrieval models on a tvr store.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{mee,tmass,xpool,eval}")
    for name in MODELS:
        t = sub.add_parser(name, help=f"train {name} (writes RUN/config.yaml, last.pt, best.pt, metrics*, PNGs)")
        t.add_argument("--store", help="tvr store path (required unless --resume finds it in RUN/config.yaml)")
        add_storage_options_argument(t)
        t.add_argument("--out", required=True, metavar="RUN", help="run directory")
        t.add_argument("--config", metavar="FILE.yaml", help="YAML with TrainConfig keys (model_config: nested)")
        t.add_argument("--recipe", choices=sorted(RECIPES[name]),
                       help="reference recipe over the defaults (e.g. msrvtt: " + ", ".join(
                           f"{k}={v}" for k, v in RECIPES[name]["msrvtt"].items()) + ")")
        t.add_argument("--epochs", type=int)
        t.add_argument("--batch-size", type=int)
        t.add_argument("--lr", type=float)
        t.add_argument("--device", choices=("auto", "cpu", "cuda"))
        t.add_argument("--seed", type=int)
        t.add_argument("--image-rate", type=float, help="alpha: images mixed in per epoch = min(n_images, alpha*n_videos)")
        t.add_argument("--eval-chunk", type=int, help="texts per similarity chunk at evaluation")
        t.add_argument("--cache-gb", type=float, metavar="G",
                       help="memory budget of feature reads in GiB: train data that fits is cached, else streamed")
        t.add_argument("--train-reads", choices=("auto", "cached", "stream"),
                       help="auto (default): cached when the features fit --cache-gb, else streamed within it")
        t.add_argument("--zero-fill-missing", action="store_true", help="ablation: missing modalities as zero vectors")
        t.add_argument("--resume", action="store_true", help="continue from RUN/last.pt")
        t.add_argument(
            "--stop-after", type=int, metavar="N", help="stop after N completed epochs (e.g. job time limits); then --resume"
        )
    e = sub.add_parser("eval", help="evaluate a run's checkpoint; prints a table and writes RUN/metrics_<split>.json")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--store", help="store path (default: the one in RUN/config.yaml)")
    add_storage_options_argument(e)
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--checkpoint", default="best", choices=("best", "last"))
    e.add_argument("--device", choices=("auto", "cpu", "cuda"))
    e.add_argument("--json", metavar="PATH", help="where to write the metrics (default RUN/metrics_<split>.json)")
    e.add_argument("--noise-seeds", type=int, default=1, metavar="N",
                   help="T-MASS: evaluate with N evaluation-noise seeds and report mean and std of every metric")
    return p


def _open_store(url: str, args: argparse.Namespace) -> FeatureStore:
    """The store at `url` (a path or an fsspec URL such as s3://) with --storage-options (never saved in the run:
    they may hold credentials); its StoreError names the URL and the fix."""
    from store.zarr_store import FeatureStore

    options = parse_storage_options(args.storage_options, "--storage-options")
    return FeatureStore.open(url, storage_options=options)


def _check_resume(run: Path, base, cfg, extra: dict[str, Any], store: FeatureStore) -> None:
    """RunError when a --resume would change training settings or continue on another store."""
    from train.engine import CONFIG_FILE, STORE_ID, RunError

    changes = resume_changes(base, cfg)
    if changes:
        raise RunError(f"--resume would change settings of {run} ({CONFIG_FILE}: saved -> requested): "
                       f"{'; '.join(changes)}. Resume with the run's own settings (drop those flags/keys) or start "
                       "a new run with another --out")
    saved, now = str(extra.get(STORE_ID) or ""), store.store_id
    if saved and saved != now:
        raise RunError(f"--resume: {run} was trained on store {extra.get('store')!r} (store id {saved}), but "
                       f"{store.url!r} is another store (store id {now or 'none'}); resume with --store "
                       f"{extra.get('store')} or start a new run with another --out")


def _train(args: argparse.Namespace) -> int:
    from train.data import StoreData
    from train.engine import CONFIG_FILE, LAST, RunError, fit
    from train.metrics import format_table

    run = Path(args.out)
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file, not a run directory; choose another --out")
    overrides: dict[str, Any] = {}
    store_url = args.store
    base, extra = None, {}
    if args.resume:
        if not (run / LAST).is_file():
            raise RunError(f"--resume: {run / LAST} does not exist; start without --resume")
        base, extra = config_from_run_yaml(run / CONFIG_FILE)
        if base.model != args.command:
            raise ConfigError(f"{run / CONFIG_FILE}: run trains {base.model!r}, not {args.command!r}")
        overrides.update({k: v for k, v in base.__dict__.items() if k != "model"})
        store_url = store_url or extra.get("store")
    elif (run / LAST).exists():
        raise RunError(f"{run} already holds a run ({LAST}); pass --resume to continue it or choose another --out")
    if args.config:
        overrides.update(load_yaml(args.config))
    for dest, key in _FLAGS.items():
        if getattr(args, dest) is not None:
            overrides[key] = getattr(args, dest)
    if args.zero_fill_missing:
        overrides["zero_fill_missing"] = True
    if args.cache_gb is not None:
        if not args.cache_gb >= 0:
            raise ConfigError(f"--cache-gb must be >= 0 GiB, got {args.cache_gb}")
        overrides["cache_bytes"] = int(args.cache_gb * 2**30)
    cfg = build_config(args.command, overrides, where=args.config or "command line")
    if not store_url:
        raise ConfigError("--store STORE is required")
    store = _open_store(store_url, args)
    if base is not None:
        _check_resume(run, base, cfg, extra, store)
    data = StoreData(store, cfg.model, model_config=cfg.model_config, cache_bytes=cfg.cache_bytes,
                     zero_fill_missing=cfg.zero_fill_missing, train_reads=cfg.train_reads)
    if data.stream is not None:
        print(data.stream.describe(cfg.image_rate, cfg.caption_sampling, cfg.batch_size), file=sys.stderr)
    metrics = fit(
        cfg, data, run, store_url=store_url, resume=args.resume, stop_after=args.stop_after,
        log=lambda s: print(s, file=sys.stderr),
    )
    if metrics is None:
        print(f"stopped early; continue with: tvr-train {cfg.model} --out {run} --resume")
        return 0
    print(f"test split ({cfg.test_split}), best epoch {metrics['best_epoch']}:")
    print(format_table(metrics))
    print(f"wrote {run}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses

    from train.data import StoreData
    from train.engine import BEST, CONFIG_FILE, LAST, RunError, evaluate_run
    from train.metrics import format_spread, format_table

    run = Path(args.run)
    if not (run / CONFIG_FILE).is_file():
        raise RunError(f"{run} is not a tvr-train run (no {CONFIG_FILE}); train with tvr-train MODEL --out {run}")
    cfg, extra = config_from_run_yaml(run / CONFIG_FILE)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    store_url = args.store or extra.get("store")
    if not store_url:
        raise ConfigError(f"{run / CONFIG_FILE} names no store; pass --store STORE")
    store = _open_store(store_url, args)
    saved_id = str(extra.get("store_id") or "")
    if saved_id and saved_id != store.store_id:
        # allowed (held-out data lives in other stores), but never silently
        print(f"note: {run} was trained on store {extra.get('store')} (id {saved_id}); evaluating on another store, "
              f"{store_url}", file=sys.stderr)
    if args.noise_seeds < 1:
        raise ConfigError(f"--noise-seeds must be >= 1, got {args.noise_seeds}")
    data = StoreData(store, cfg.model, model_config=cfg.model_config, cache_bytes=cfg.cache_bytes,
                     zero_fill_missing=cfg.zero_fill_missing, splits=(args.split,))
    metrics = evaluate_run(cfg, data, run, args.split, BEST if args.checkpoint == "best" else LAST,
                           noise_seeds=args.noise_seeds)
    out = Path(args.json) if args.json else run / f"metrics_{args.split}.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{run} ({args.checkpoint} checkpoint) on split {args.split}: {metrics['n_queries']} queries, {metrics['n_videos']} videos")
    print(format_table(metrics))
    if "noise_seeds" in metrics:
        print(format_spread(metrics["noise_seeds"]))
    print(f"wrote {out}")
    return 0


def passive_openmp_waits(argv: Sequence[str]) -> bool:
    """For `eval`, make torch's OpenMP workers sleep between ops (OMP_WAIT_POLICY=PASSIVE); True when it applies.

    T-MASS scoring alternates short torch ops with the numba trial kernel on its own threads. Spinning OpenMP
    workers (the default) hold the cores the kernel's threads need: 8x the kernel's wall time on a busy 2-core
    machine. Only possible before torch is imported (OpenMP reads it once), and never over the user's own setting.
    """
    if not argv or argv[0] != "eval" or "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tvr-train`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passive_openmp_waits(argv)
    from store.schema import StoreError
    from train.data import DataError
    from train.engine import RunError
    from train.models import ModelConfigError

    from train.finetune_cli import wants_finetune

    if wants_finetune(argv):  # CLIP fine-tuning (--finetune-clip, or eval of such a run): train/finetune_cli.py
        from train.finetune_cli import main as finetune_main

        return finetune_main(argv)
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return _eval(args) if args.command == "eval" else _train(args)
    except (ConfigError, DataError, ModelConfigError, RunError, StoreError, FileNotFoundError) as exc:
        print(f"tvr-train {args.command}: error: {exc}", file=sys.stderr)
        return 2


def console(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry (`tvr-train`, `python -m train`): main(), then exit with its code.

    After `eval` (all output written and closed) the process ends with os._exit: a torch process's normal exit
    runs the C++ static destructors of torch's shared libraries, which page in ~150 MB of their code and take
    ~0.5 s, 15% of a 1,000 x 1,000 X-Pool evaluation command. Training exits normally (its run is long, and
    background readers or user callbacks may still hold files).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    code = main(args)
    if args and args[0] == "eval":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
