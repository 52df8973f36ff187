"""Training loop, evaluation and run-directory bookkeeping for `tvr-train`.

Fidelity notes:
- T-MASS / X-Pool train on FROZEN CLIP features read from the store ("clip" 12 frames, "clip_text"): unlike the
  papers, CLIP is not fine-tuned and there is no frame augmentation, so absolute numbers are lower. Their
  optimisation otherwise follows the reference: AdamW (wd 0.2), cosine schedule with 10% linear warm-up,
  gradient clipping at 1.0, logit-scale clamp (`model.clamp_logit_scale()`) after every step.
  The logit scale is its own parameter group at `logit_scale_lr` (1e-6, the reference's CLIP-group lr), scaled
  by the same schedule.
- MEE: Adam, lr x0.95 per epoch (`lr_decay`), no clipping.
- Model selection: after each epoch the val split is evaluated; the best checkpoint maximises
  t2v R@1 + R@5 + R@10 (ties keep the earlier epoch). The test split is only used for the final metrics.json.
- Reproducibility: the model is built after `torch.manual_seed(seed)`; each epoch reseeds torch with
  (seed, epoch) and samples its items/captions from `numpy.random.default_rng([seed, epoch])`, and evaluation
  reseeds too, so `--resume` from `last.pt` continues exactly as an uninterrupted run on CPU
  (deterministic algorithms are enabled on CPU).
- Learning rate is a pure function of the global step (no scheduler state to checkpoint).

Run directory: config.yaml, last.pt, best.pt, metrics.jsonl (one line per epoch), metrics.json (test split,
best checkpoint), loss.png, recall.png. Checkpoints hold only tensors and primitive containers and are loaded
with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from store.common import DeviceError, pick_device
from train.config import TrainConfig, save_yaml
from train.data import StoreData
from train.eager_optim import EagerAdam, EagerAdamW
from train.models._api import RetrievalModel

CONFIG_FILE, LAST, BEST, HISTORY, METRICS = "config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.json"
STORE_ID = "store_id"  # config.yaml key: identity of the store the run trains on (a resume must use the same)


class RunError(RuntimeError):
    """A run directory is missing or inconsistent; the message names the path and the fix."""


def resolve_device(name: str) -> torch.device:
    """--device through the shared resolver (store.common.pick_device); a device this machine lacks is a RunError."""
    try:
        return pick_device(name)
    except DeviceError as e:
        raise RunError(f"--device {name}: {e.reason}; use --device cpu or auto") from e


def _epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + salt) % (2**63)


# ---- model plumbing -----------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, data: StoreData) -> RetrievalModel:
    """Create the registered model with dims taken from the store's feature specs."""
    from train.models import create_model

    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, specs=data.specs(), **cfg.model_config)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _cat(parts: list[Any]) -> Any:
    """Concatenate a list of embeddings along dim 0 (tensors, dicts, tuples or dataclasses of tensors)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, 0)
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{f.name: _cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)})
    if first is None:
        return None
    return first  # scalars/config carried along unchanged


def make_optimizer(cfg: TrainConfig, model: RetrievalModel) -> torch.optim.Optimizer:
    """Adam (MEE) or AdamW (T-MASS/X-Pool, eps 1e-6 as in the reference) over the model's parameter groups.

    Each group keeps its own base lr in `base_lr` (e.g. the logit scale at its reference CLIP-group lr); the
    schedule scales every group by the same factor `lr_at(...) / cfg.lr`.
    """
    groups = model.param_groups(cfg.lr)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    for g in groups:
        g["base_lr"] = float(g.get("lr", cfg.lr))
        g["lr"] = g["base_lr"]
    groups = [g for g in groups if g["params"]]
    # fused: one pass over each parameter instead of ~10 (the for-loop Adam was ~30% of an MEE step on CPU);
    # same update formula (tests/test_train_engine.py checks it against the for-loop optimiser)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    # Eager*: torch's own Adam / AdamW without its torch._dynamo import (~95 MB; train/eager_optim.py)
    if cfg.optimizer == "adamw":
        return EagerAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-6, fused=fused or None)
    return EagerAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def lr_at(cfg: TrainConfig, epoch: int, step: int, total_steps: int) -> float:
    """Learning rate for global `step` (0-based) in `epoch` (0-based)."""
    if cfg.schedule == "exponential":
        return cfg.lr * cfg.lr_decay**epoch
    warm = int(cfg.warmup * total_steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total_steps - warm)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- training -----------------------------------------------------------------------------------------------
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 2**30  # blocks up to this size come from (and return to) the heap instead of fresh mappings


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed large blocks instead of unmapping them; True when set (once per process).

    A training step frees and re-allocates the same large tensors (gradients, GEMM outputs, activations). Above
    glibc's mmap threshold (at most 32 MB by default) each is a fresh mapping whose pages fault in zero-filled,
    every step: 10-20% of a reference-size MEE step on 2 CPU cores. Reused heap blocks skip that; the process
    keeps its peak footprint instead of returning memory between steps. No-op without glibc (macOS, musl).
    """
    ok = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = all(libc.mallopt(opt, KEEP_FREED_BYTES) == 1 for opt in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))
        except (OSError, AttributeError):  # not glibc
            ok = False
    return ok


def train_one_epoch(
    model: RetrievalModel,
    data: StoreData,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device,
    step0: int,
    total_steps: int,
    progress: bool = True,
) -> tuple[dict[str, float], int]:
    """One pass over the epoch's pairs; returns (mean losses, next global step)."""
    keep_freed_memory()
    model.train()
    torch.manual_seed(_epoch_seed(cfg.seed, epoch))
    n = data.n_train_batches(cfg.batch_size, cfg.image_rate, cfg.caption_sampling, cfg.drop_last)
    sums: dict[str, float] = {}
    count, step = 0, step0
    bar = tqdm(
        data.train_batches(epoch, cfg.seed, cfg.batch_size, cfg.image_rate, cfg.caption_sampling, cfg.drop_last),
        total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", file=sys.stderr, leave=False,
        disable=not progress,
    )
    for text, video in bar:
        factor = lr_at(cfg, epoch, step, total_steps) / cfg.lr
        for group in opt.param_groups:
            group["lr"] = group.get("base_lr", cfg.lr) * factor
        t_emb = model.encode_text(_to(text, device))
        v_emb = model.encode_video(_to(video, device))
        loss, parts = model.loss(t_emb, v_emb)
        if not torch.isfinite(loss):
            raise RunError(_bad_batch(data, cfg, epoch, count, f"loss is {loss.item()}", text, video))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # the norm comes for free here: a non-finite one would poison every weight
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not torch.isfinite(norm):
                raise RunError(_bad_batch(data, cfg, epoch, count, f"gradient norm is {norm.item()}", text, video))
        opt.step()
        model.clamp_logit_scale()  # a no-op for models without a logit scale
        step += 1
        count += 1
        sums["train_loss"] = sums.get("train_loss", 0.0) + float(loss.detach())
        for k, v in (parts or {}).items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
        bar.set_postfix(loss=f"{sums['train_loss'] / count:.4f}")
    bar.close()
    if count == 0:
        raise RunError(f"epoch {epoch + 1}: no training batches (need >= 2 train pairs; lower --batch-size?)")
    return {k: v / count for k, v in sums.items()}, step


def _bad_batch(data: StoreData, cfg: TrainConfig, epoch: int, index: int, what: str, text: dict, video: dict) -> str:
    """Error text for a non-finite loss/gradient: the batch's item and caption ids and which inputs are finite."""
    items, caps = data.batch_ids(epoch, cfg.seed, cfg.batch_size, cfg.image_rate, index, cfg.caption_sampling)
    shown = ", ".join(f"{str(i)!r}/{str(c)!r}" for i, c in zip(items[:5], caps[:5])) + (" ..." if len(items) > 5 else "")
    bad = sorted({k for k, v in {**text, **video}.items() if v.is_floating_point() and not torch.isfinite(v).all()})
    cause = (f"inputs {', '.join(bad)} hold NaN/inf" if bad else
             f"its inputs ({', '.join([data.text_feature, *data.video_features])}) are finite, so training diverged")
    return (f"epoch {epoch + 1} batch {index + 1}: {what} on items/captions {shown}; {cause}. Stopped before "
            f"updating any checkpoint: lower --lr (now {cfg.lr:g}) or fix those rows")


def check_finite_parameters(model: torch.nn.Module, data: StoreData, epoch: int) -> None:
    """RunError naming the parameters that are NaN/inf (checked before a checkpoint is written)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunError(
            f"epoch {epoch + 1}: {len(bad)} parameter tensor(s) became NaN/inf ({', '.join(bad[:5])}"
            f"{' ...' if len(bad) > 5 else ''}) "
            f"(features {', '.join([data.text_feature, *data.video_features])} were finite on load, so training "
            "diverged); no checkpoint was written for this epoch: lower --lr"
        )


@torch.no_grad()
def encode_for(
    model: torch.nn.Module, data: StoreData, caption_rows: np.ndarray, item_rows: np.ndarray, cfg: TrainConfig,
    device: torch.device,
) -> tuple[Any, Any]:
    """(text, video) embeddings of the given rows, encoded in batches of `eval_chunk`."""
    model.eval()
    bs = max(cfg.eval_chunk, 2)
    t = _cat([model.encode_text(_to(data.text_batch(caption_rows[s : s + bs]), device)) for s in range(0, len(caption_rows), bs)])
    v = _cat([model.encode_video(_to(data.video_batch(item_rows[s : s + bs]), device)) for s in range(0, len(item_rows), bs)])
    return t, v


@torch.no_grad()
def similarity_for(
    model: torch.nn.Module, data: StoreData, caption_rows: np.ndarray, item_rows: np.ndarray, cfg: TrainConfig,
    device: torch.device, keys: tuple[np.ndarray, np.ndarray] | None = None, seed: int | None = None,
) -> torch.Tensor:
    """(n_captions, n_items) similarity; `keys` (caption, item id keys) and `seed` key T-MASS's evaluation noise."""
    t, v = encode_for(model, data, caption_rows, item_rows, cfg, device)
    return _score(model, t, v, cfg, keys, seed)


def _score(model: torch.nn.Module, t: Any, v: Any, cfg: TrainConfig, keys: tuple[np.ndarray, np.ndarray] | None,
           seed: int | None) -> torch.Tensor:
    """model.similarity, passing noise keys and seed to models with evaluation noise (T-MASS)."""
    kw: dict[str, Any] = {}
    if has_eval_noise(model):
        if keys is not None:
            kw["text_keys"], kw["video_keys"] = (torch.from_numpy(np.asarray(k, dtype=np.int64)) for k in keys)
        kw["seed"] = seed
    return model.similarity(t, v, chunk=cfg.eval_chunk, **kw).float().cpu()


def has_eval_noise(model: torch.nn.Module) -> bool:
    """True for models whose scores depend on an evaluation-noise seed (T-MASS)."""
    return hasattr(model, "eval_noise")


def evaluate(
    model: torch.nn.Module, data: StoreData, split: str, cfg: TrainConfig, device: torch.device, choices: bool = False,
    noise_seeds: int = 1,
) -> dict[str, Any]:
    """Retrieval metrics (t2v, v2t) on `split`; with `choices`, multiple-choice accuracy when the store has questions.

    With `noise_seeds` N > 1 (T-MASS) the texts and videos are encoded once and scored with the evaluation-noise
    seeds eval_seed .. eval_seed + N - 1; the main metrics are those of eval_seed (as without N), and
    `noise_seeds` holds the mean and the (population) std of every metric over the N seeds.
    """
    from train.metrics import retrieval_metrics

    torch.manual_seed(_epoch_seed(cfg.seed, 0, salt=17))
    es = data.eval_set(split)
    keys = data.eval_keys(es)
    t, v = encode_for(model, data, es.captions, es.items, cfg, device)
    base = int(getattr(getattr(model, "config", None), "eval_seed", 0))
    query = torch.from_numpy(es.query_item)
    runs = [dict(retrieval_metrics(_score(model, t, v, cfg, keys, base + i), query)) for i in range(max(1, noise_seeds))]
    out = dict(runs[0])
    if noise_seeds > 1:
        out["noise_seeds"] = _spread(runs, [base + i for i in range(noise_seeds)])
    out["n_queries"], out["n_videos"] = int(len(es.captions)), int(len(es.items))
    if choices:
        mc = data.choice_set()
        if mc is not None and len(mc.items):
            out["multiple_choice"] = multiple_choice(model, data, mc, cfg, device)
    return out


def _spread(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Mean and population std over runs of every t2v / v2t metric."""
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for d in ("t2v", "v2t"):
        vals = {k: np.array([float(r[d][k]) for r in runs]) for k in runs[0][d]}
        mean[d] = {k: float(x.mean()) for k, x in vals.items()}
        std[d] = {k: float(x.std()) for k, x in vals.items()}
    return {"n": len(runs), "seeds": seeds, "mean": mean, "std": std}


def multiple_choice(model: torch.nn.Module, data: StoreData, mc, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Accuracy of picking the true caption among each question's options (pairwise scores)."""
    from train.data import id_keys
    from train.metrics import multiple_choice_accuracy

    caps = np.unique(mc.captions)
    items = np.unique(mc.items)
    keys = (id_keys(data.caption_ids(caps)), id_keys(data.item_ids[items]))
    sim = similarity_for(model, data, caps, items, cfg, device, keys)
    ci = torch.from_numpy(np.searchsorted(caps, mc.captions))
    ii = torch.from_numpy(np.searchsorted(items, mc.items))
    scores = sim[ci, ii[:, None]]  # (Q, n_options)
    return {"accuracy": float(multiple_choice_accuracy(scores, torch.from_numpy(mc.answer))), "n_questions": int(len(mc.items))}


def val_score(metrics: dict[str, Any]) -> float:
    """Model-selection score: t2v R@1 + R@5 + R@10."""
    t2v = metrics["t2v"]
    return float(t2v["R@1"] + t2v["R@5"] + t2v["R@10"])


def make_run_dir(run: Path) -> None:
    """Create the run directory; RunError when RUN (or a parent) is a file."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {run} is a file, not a run directory; choose another --out")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"--out {run}: cannot create the run directory ({exc.strerror or exc}); choose another --out") from None


# ---- checkpoints and history --------------------------------------------------------------------------------
def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(path: Path, keys: tuple[str, ...] = ("model", "epoch")) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True; RunError naming the file when absent, cut off or foreign."""
    if not path.is_file():
        raise RunError(f"{path} does not exist; train first (tvr-train MODEL --store STORE --out {path.parent})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own text may suggest unsafe loading: never shown, tvr never needs it
        if isinstance(exc, pickle.UnpicklingError) and "unsupported global" in str(exc).lower():
            raise RunError(f"{path} is not a tvr-train checkpoint: it holds objects other than tensors and plain "
                           "containers, which tvr does not load; use a checkpoint written by tvr-train") from None
        # zip reader / unpickler errors of a cut-off or corrupt file
        detail = str(exc).splitlines()[0] if str(exc) else ""
        unsafe_hint = any(w in detail.lower() for w in ("weights_only", "weights only", "trust"))
        detail = "" if unsafe_hint or not detail else f": {detail[:200]}"
        raise RunError(f"{path} cannot be read ({type(exc).__name__}{detail}); the file is cut off or corrupt "
                       "(an interrupted copy?); restore it or retrain") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        have = sorted(map(str, ck))[:8] if isinstance(ck, dict) else type(ck).__name__
        raise RunError(f"{path} is not a tvr-train checkpoint: it lacks {', '.join(missing)} (it has {have})")
    return ck


def load_weights(model: torch.nn.Module, ck: dict[str, Any], path: Path) -> None:
    """model.load_state_dict with a RunError naming the file and the first mismatches instead of a traceback."""
    try:
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:4] if ln.strip()] or [str(exc)[:300]]
        raise RunError(f"{path} does not fit the model built from the run's config.yaml and the store's features "
                       f"({'; '.join(lines)}); it was written with another model_config or other features: "
                       "use the run's own config and store, or start a new run") from None


def read_history(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records (empty when absent)."""
    path = run / HISTORY
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.generic)):
        return x.item()
    return x


def fit(
    cfg: TrainConfig,
    data: StoreData,
    run: Path,
    *,
    store_url: str,
    resume: bool = False,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Train per `cfg`, checkpointing into `run`; returns the test metrics of the best checkpoint.

    `stop_after` ends the process after that many completed epochs (as an interruption would; continue with
    `resume=True`) and returns None without the final test evaluation. `progress=False` hides the per-epoch bars.
    """
    from train.plots import plot_history

    device = resolve_device(cfg.device)
    data.check_splits("train", (cfg.val_split, cfg.test_split))  # an empty split fails now, not after training
    n_batches = data.n_train_batches(cfg.batch_size, cfg.image_rate, cfg.caption_sampling, cfg.drop_last)
    if n_batches == 0:
        raise RunError(f"store {data.url}: the train split gives no batch of {cfg.batch_size} pairs "
                       f"({data.n_pairs(cfg.image_rate, cfg.caption_sampling)} pairs, drop_last={cfg.drop_last}); "
                       "lower --batch-size")
    make_run_dir(run)
    prev_det = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        model = build_model(cfg, data).to(device)
        opt = make_optimizer(cfg, model)
        start, step, best, best_epoch = 0, 0, -math.inf, 0
        history: list[dict[str, Any]] = []
        if resume:
            ck = load_checkpoint(run / LAST, ("model", "optimizer", "epoch", "step", "best_score", "best_epoch"))
            load_weights(model, ck, run / LAST)
            try:
                opt.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError, TypeError) as exc:
                raise RunError(f"{run / LAST}: optimizer state does not fit this model ({exc}); start a new run") from None
            start, step, best, best_epoch = int(ck["epoch"]), int(ck["step"]), float(ck["best_score"]), int(ck["best_epoch"])
            history = [h for h in read_history(run) if h["epoch"] <= start]
            log(f"resuming {run} after epoch {start} (best val epoch {best_epoch})")
        save_yaml(cfg, run / CONFIG_FILE, {"store": store_url, STORE_ID: data.store.store_id})
        (run / HISTORY).write_text("".join(json.dumps(h) + "\n" for h in history))
        total = cfg.epochs * n_batches
        end = cfg.epochs if stop_after is None else min(cfg.epochs, max(stop_after, start))
        for epoch in range(start, end):
            losses, step = train_one_epoch(model, data, opt, cfg, epoch, device, step, total, progress)
            check_finite_parameters(model, data, epoch)
            val = evaluate(model, data, cfg.val_split, cfg, device)
            score = val_score(val)
            record = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch, max(step - 1, 0), total), **losses, "val": val, "val_score": score}
            if score > best:
                best, best_epoch = score, epoch + 1
                _save({"model": model.state_dict(), "epoch": epoch + 1, "val_score": score}, run / BEST)
            record["best_epoch"] = best_epoch
            history.append(_jsonable(record))
            with open(run / HISTORY, "a") as fh:
                fh.write(json.dumps(history[-1]) + "\n")
            _save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step,
                 "best_score": best, "best_epoch": best_epoch},
                run / LAST,
            )
            t2v = val["t2v"]
            log(f"epoch {epoch + 1}/{cfg.epochs} loss {losses['train_loss']:.4f} val t2v R@1 {t2v['R@1']:.2f} "
                f"R@5 {t2v['R@5']:.2f} R@10 {t2v['R@10']:.2f}" + (" *best*" if best_epoch == epoch + 1 else ""))
        plot_history(history, run)
        if end < cfg.epochs:
            log(f"stopped after epoch {end}/{cfg.epochs}; continue with --resume")
            return None
        load_weights(model, load_checkpoint(run / BEST), run / BEST)
        metrics = _jsonable(evaluate(model, data, cfg.test_split, cfg, device, choices=cfg.test_split == "test"))
        metrics["best_epoch"] = best_epoch
        (run / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics
    finally:
        torch.use_deterministic_algorithms(prev_det)


def evaluate_run(cfg: TrainConfig, data: StoreData, run: Path, split: str, checkpoint: str = BEST,
                 noise_seeds: int = 1) -> dict[str, Any]:
    """Metrics of a run's checkpoint on `split` (`noise_seeds` > 1: spread over T-MASS evaluation-noise seeds)."""
    device = resolve_device(cfg.device)
    model = build_model(cfg, data).to(device)
    if noise_seeds > 1 and not has_eval_noise(model):
        raise RunError(f"--noise-seeds {noise_seeds}: model {cfg.model!r} has no evaluation noise (only tmass does)")
    load_weights(model, load_checkpoint(run / checkpoint), run / checkpoint)
    return _jsonable(evaluate(model, data, split, cfg, device, choices=split == "test", noise_seeds=noise_seeds))
