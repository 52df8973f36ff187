"""`tvr-train tmass|xpool --finetune-clip ...` and `tvr-train eval RUN` for fine-tuning runs (dispatched from
train/cli.py). Many GPUs: `torchrun --nproc-per-node N -m train tmass --finetune-clip ...` (rank 0 writes).

    tvr-train tmass|xpool --finetune-clip --store STORE --out RUN [--config FILE.yaml] [--clip-model ViT-B-32]
              [--clip-pretrained openai|FILE] [--random-init] [--epochs E] [--batch-size B] [--lr LR]
              [--clip-lr LR] [--num-frames F] [--device auto|cpu|cuda] [--seed S] [--grad-checkpointing]
              [--amp auto|off] [--resume] [--stop-after N]
    tvr-train eval RUN [--store STORE] [--split test] [--checkpoint best|last] [--device ...] [--json PATH]

Precedence: FinetuneConfig defaults < RUN/config.yaml (with --resume) < --config < flags.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from train.finetune_config import FinetuneConfigError, build, is_finetune_run, load

if TYPE_CHECKING:
    from store.zarr_store import FeatureStore

FLAG = "--finetune-clip"
_FLAGS = ("clip_model", "clip_pretrained", "epochs", "batch_size", "lr", "clip_lr", "num_frames", "device", "seed",
          "amp")


def wants_finetune(argv: Sequence[str]) -> bool:
    """Whether `tvr-train argv` is a fine-tuning command (the flag, or `eval` of a fine-tuning run)."""
    if FLAG in argv:
        return True
    if len(argv) >= 2 and argv[0] == "eval" and not argv[1].startswith("-"):
        return is_finetune_run(Path(argv[1]))
    return False


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvr-train", description="Fine-tune CLIP with a T-MASS / X-Pool head on "
                                "frames from a tvr store (the papers' training), or evaluate such a run.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("tmass", "xpool"):
        t = sub.add_parser(name)
        t.add_argument(FLAG, action="store_true", required=True, help="fine-tune CLIP end to end on the frames feature")
        t.add_argument("--store")
        t.add_argument("--out", required=True, metavar="RUN")
        t.add_argument("--config", metavar="FILE.yaml", help="FinetuneConfig keys (model_config, clip_model_cfg nested)")
        t.add_argument("--clip-model", help="open_clip architecture (default ViT-B-32; ViT-B-16 selectable)")
        t.add_argument("--clip-pretrained", help="open_clip tag (default openai) or checkpoint file")
        t.add_argument("--random-init", action="store_true", help="seeded random CLIP weights (tests; recorded)")
        t.add_argument("--epochs", type=int)
        t.add_argument("--batch-size", type=int, help="global batch (all processes together)")
        t.add_argument("--lr", type=float, help="head lr (reference noclip_lr)")
        t.add_argument("--clip-lr", type=float, help="CLIP lr (reference 1e-6)")
        t.add_argument("--num-frames", type=int)
        t.add_argument("--device", choices=("auto", "cpu", "cuda"))
        t.add_argument("--seed", type=int)
        t.add_argument("--amp", choices=("auto", "off"))
        t.add_argument("--grad-checkpointing", action="store_true")
        t.add_argument("--resume", action="store_true")
        t.add_argument("--stop-after", type=int, metavar="N")
    e = sub.add_parser("eval")
    e.add_argument("run", metavar="RUN")
    e.add_argument("--store")
    e.add_argument("--split", default="test", choices=("train", "val", "test"))
    e.add_argument("--checkpoint", default="best", choices=("best", "last"))
    e.add_argument("--device", choices=("auto", "cpu", "cuda"))
    e.add_argument("--json", metavar="PATH")
    return p


def _open(url: str) -> FeatureStore:
    """The store at `url` (a path or an fsspec URL such as s3://); its StoreError names the URL and the fix."""
    from store.zarr_store import FeatureStore

    return FeatureStore.open(url)


def _train(args: argparse.Namespace) -> int:
    from train.finetune import CONFIG, LAST, FinetuneError, fit

    run = Path(args.out)
    if run.exists() and not run.is_dir():
        raise FinetuneError(f"--out {run} is a file, not a run directory; choose another --out")
    overrides: dict[str, Any] = {"model": args.command}
    saved, url, extra = None, args.store, {}
    if args.resume:
        if not (run / LAST).is_file():
            raise FinetuneError(f"--resume: {run / LAST} does not exist; start without --resume")
        saved, extra = load(run / CONFIG)
        overrides.update(vars(saved))
        url = url or extra.get("store")
    elif (run / LAST).exists():
        raise FinetuneError(f"{run} already holds a run ({LAST}); pass --resume or choose another --out")
    if args.config:
        from train.config import load_yaml

        overrides.update(load_yaml(args.config))
    overrides.update({k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})
    if args.random_init:
        overrides["random_init"] = True
    if args.grad_checkpointing:
        overrides["grad_checkpointing"] = True
    cfg = build(overrides, where=args.config or "command line")
    if not url:
        raise FinetuneConfigError("--store STORE is required")
    store = _open(url)
    if saved is not None and extra.get("store_id") and extra["store_id"] != store.store_id:
        raise FinetuneError(f"--resume: {run} was trained on store {extra.get('store')!r} (id {extra['store_id']}), "
                            f"not {url!r}; resume with --store {extra.get('store')} or use another --out")
    metrics = fit(cfg, store, url, run, resume=args.resume, stop_after=args.stop_after, saved=saved)
    if metrics is not None:
        print(json.dumps({"t2v": metrics["t2v"], "v2t": metrics["v2t"], "best_epoch": metrics["best_epoch"]}))
        print(f"wrote {run}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses

    from train.finetune import BEST, CONFIG, LAST, _load, evaluate, make_session

    run = Path(args.run)
    cfg, extra = load(run / CONFIG)
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    cfg = dataclasses.replace(cfg, random_init=True)  # the checkpoint replaces every weight: no download needed
    url = args.store or extra.get("store")
    s = make_session(cfg, _open(url), url, splits=(args.split,))
    ck = run / (BEST if args.checkpoint == "best" else LAST)
    s.model.load_state_dict(_load(ck)["model"])
    metrics = evaluate(s, args.split)
    out = Path(args.json) if args.json else run / f"metrics_{args.split}.json"
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({"t2v": metrics["t2v"], "v2t": metrics["v2t"]}))
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for fine-tuning commands; returns the exit code (2 on a refused run)."""
    from store.schema import StoreError
    from train import distributed as D
    from train.clip_backbone import ClipLoadError
    from train.finetune import FinetuneError
    from train.finetune_data import FrameDataError
    from train.models._api import ModelConfigError

    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _eval(args) if args.command == "eval" else _train(args)
    except (FinetuneConfigError, FinetuneError, FrameDataError, ClipLoadError, ModelConfigError, StoreError,
            FileNotFoundError) as exc:
        print(f"tvr-train {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.shutdown()
