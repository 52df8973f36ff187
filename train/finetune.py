"""CLIP fine-tuning of T-MASS / X-Pool on frames from the store, on one process or many (torchrun + DDP).

Per global batch g of epoch e (the reference trainer, trainer_stochastic.py): encode the rank's slice of texts
(tokens) and videos (F frames, train transform), gather both across ranks with gradients, the head's loss over the
global batch (T-MASS: L_s + alpha L_sup with eps drawn from torch seeded by (seed, e, g), identical on every rank),
backward (AMP on CUDA), gradient clipping at 1.0 over all parameters, AdamW step with the cosine/warm-up factor on
every group, logit-scale clamp. Evaluation (rank 0) encodes each video once (test transform, segment-middle frames)
and each text once, then the heads' chunked similarity (T-MASS: leak-free, per-pair noise keyed by ids).

Run folder as `tvr-train`'s: config.yaml (with `finetune_clip: true`, the store, its id and the CLIP weights
identity), last.pt / best.pt (weights_only loadable), metrics.jsonl, metrics.json, loss.png / recall.png, all
written by rank 0; resume continues bit-for-bit on CPU because every random draw is keyed by (seed, epoch, batch).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from store import FeatureStore
from store.common import DeviceError, pick_device
from train import distributed as D
from train.clip_backbone import build_clip, image_size, tokenizer, weights_identity
from train.finetune_config import FinetuneConfig, resume_changes, save
from train.finetune_data import FrameData, GlobalBatch, choose_steps, eval_pixels, prefetch, train_pixels

CONFIG, LAST, BEST, HISTORY, METRICS = "config.yaml", "last.pt", "best.pt", "metrics.jsonl", "metrics.json"
Reader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # item rows -> (uint8 frames, masks)


class FinetuneError(RuntimeError):
    """A fine-tuning run cannot start or continue; the message names the file or setting and the fix."""


@dataclass
class Session:
    """Everything one process trains with."""

    cfg: FinetuneConfig
    data: FrameData
    info: D.DistInfo
    device: torch.device
    model: nn.Module  # the bare model (checkpoints, evaluation)
    engine: nn.Module  # DDP-wrapped model for training (the bare one with a single process)
    opt: torch.optim.Optimizer
    tok: Callable[[list[str]], torch.Tensor]
    res: int
    reader: Reader
    scaler: Any = None
    amp_dtype: torch.dtype | None = None
    stats: dict[str, float] = field(default_factory=dict)


def device_type(name: str) -> str:
    """"cuda" or "cpu" for --device `name` (store.common.pick_device); FinetuneError when it is unusable."""
    try:
        return pick_device(name).type
    except DeviceError as e:
        raise FinetuneError(f"--device {name}: {e.reason}; use --device cpu or auto") from e


def rank_device(name: str, info: D.DistInfo) -> torch.device:
    """This rank's device: its GPU (`info.local_rank`) when --device resolves to CUDA, else the CPU."""
    return torch.device("cuda", info.local_rank) if device_type(name) == "cuda" else torch.device("cpu")


def amp_setup(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype or None, GradScaler or None): bf16 on CUDA when supported, else fp16 with a scaler."""
    if cfg.amp == "off" or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def make_session(cfg: FinetuneConfig, store: FeatureStore, url: str, reader: Reader | None = None,
                 splits: tuple[str, ...] | None = None) -> Session:
    """Join the process group, read the store's index, build CLIP + head, optimizer and (for N > 1) DDP."""
    from train.models.clip_video import build

    info = D.init(device_type(cfg.device))
    device = rank_device(cfg.device, info)
    if cfg.batch_size % info.world:
        raise FinetuneError(f"batch_size {cfg.batch_size} is the global batch and must divide by the {info.world} "
                            "processes; choose a multiple")
    data = FrameData(store, cfg.frames_feature)
    data.require(splits if splits is not None else ("train",) + tuple(s for s in (cfg.val_split, cfg.test_split) if s))
    clip = build_clip(cfg.clip_model, cfg.clip_pretrained, random_init=cfg.random_init, seed=cfg.seed,
                      model_cfg=cfg.clip_model_cfg or None)
    torch.manual_seed(cfg.seed)  # the head's init (identity maps; seeded anyway)
    model = build(cfg.model, clip, cfg.model_config, num_frames=cfg.num_frames, clip_lr=cfg.clip_lr,
                  grad_checkpointing=cfg.grad_checkpointing).to(device)
    groups = [{**g, "base_lr": g["lr"]} for g in model.param_groups(cfg.lr) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-6, foreach=True)
    engine: nn.Module = model
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        engine = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    amp_dtype, scaler = amp_setup(cfg, device)
    return Session(cfg, data, info, device, model, engine, opt, tokenizer(cfg.clip_model), image_size(clip),
                   reader or data.read, scaler, amp_dtype)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Cosine schedule with linear warm-up over the first `warmup` fraction of all steps."""
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def local_batch(s: Session, gb: GlobalBatch) -> dict[str, torch.Tensor]:
    """This rank's slice of a global batch as CPU tensors: uint8 frames (b, F, S, S, 3), tokens, crops."""
    b = len(gb.items) // s.info.world
    sl = slice(s.info.rank * b, (s.info.rank + 1) * b)
    frames, mask = s.reader(gb.items[sl])
    steps = choose_steps(mask, s.cfg.num_frames, gb.u_steps[sl])
    picked = np.take_along_axis(frames, steps[:, :, None, None, None], axis=1)
    tokens = s.tok([str(t) for t in s.data.cap_text[gb.captions[sl]]])
    return {"frames": torch.from_numpy(np.ascontiguousarray(picked)), "tokens": tokens,
            "crops": torch.from_numpy(gb.crops[sl])}


def _autocast(s: Session) -> contextlib.AbstractContextManager[Any]:
    if s.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=s.amp_dtype)


def train_step(s: Session, batch: dict[str, torch.Tensor], seed: int, factor: float) -> dict[str, float]:
    """One optimizer step on the global batch whose local slice is `batch`; returns the loss parts."""
    dev = s.device
    for g in s.opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    pixels = train_pixels(batch["frames"].to(dev, non_blocking=True), batch["crops"].numpy(), s.res)
    with _autocast(s):
        t_emb, v_emb = s.engine({"tokens": batch["tokens"].to(dev)}, {"pixels": pixels})
    t_all = {"t": D.gather(t_emb["t"].float(), s.info)}
    v_all = {"frames": D.gather(v_emb["frames"].float(), s.info),
             "frames_mask": D.gather(v_emb["frames_mask"].to(torch.uint8), s.info).bool()}
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # eps and dropout: the same draw on every rank and in a single process
        loss, parts = s.model.loss(t_all, v_all)
    if not torch.isfinite(loss):
        raise FinetuneError(f"loss is {loss.item()} (parts {parts}); lower lr / clip_lr or check the frames")
    s.opt.zero_grad(set_to_none=True)
    if s.scaler is not None:
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(s.opt)
    else:
        loss.backward()
    if s.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.cfg.grad_clip)
    if s.scaler is not None:
        s.scaler.step(s.opt)
        s.scaler.update()
    else:
        s.opt.step()
    s.model.clamp_logit_scale()
    return {"train_loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}


def step_seed(seed: int, epoch: int, g: int) -> int:
    """Torch seed of global batch g of `epoch`."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(g) * 104_729 + 13) % (2**63)


def train_epoch(s: Session, epoch: int, step0: int, total: int, log: Callable[[str], None]) -> tuple[dict[str, float], int]:
    """One epoch over the global batches; returns (mean loss parts, next global step)."""
    cfg = s.cfg
    s.model.train()
    gbs = s.data.global_batches(epoch, cfg.seed, cfg.batch_size, cfg.caption_sampling, cfg.num_frames,
                                min_last=cfg.batch_size if s.info.enabled else 2)
    sums: dict[str, float] = {}
    step, n = step0, 0
    for gb, batch in prefetch(((gb, local_batch(s, gb)) for gb in gbs), cfg.prefetch):
        parts = train_step(s, batch, step_seed(cfg.seed, epoch, gb.index), lr_factor(step, total, cfg.warmup))
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v
        step, n = step + 1, n + 1
    if n == 0:
        raise FinetuneError(f"epoch {epoch + 1}: no training batch of {cfg.batch_size} pairs; lower --batch-size")
    return {k: v / n for k, v in sums.items()}, step


@torch.no_grad()
def encode_split(s: Session, split: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], np.ndarray,
                                                   np.ndarray, np.ndarray]:
    """(text emb, video emb, query_item, caption rows, item rows) of `split`: each video and text encoded once."""
    s.model.eval()
    items = s.data.split_items(split)
    caps = s.data.captions_of(items)
    pos = {int(r): i for i, r in enumerate(items)}
    query = np.array([pos[int(r)] for r in s.data.cap_item[caps]], dtype=np.int64)
    vids, texts = [], []
    bs = s.cfg.eval_batch
    for a in range(0, len(items), bs):
        frames, mask = s.reader(items[a : a + bs])
        steps = choose_steps(mask, s.cfg.num_frames, None)
        picked = torch.from_numpy(np.ascontiguousarray(np.take_along_axis(frames, steps[:, :, None, None, None], 1)))
        with _autocast(s):
            v = s.model.encode_video({"pixels": eval_pixels(picked.to(s.device), s.res)})
        vids.append({k: x.float() if x.is_floating_point() else x for k, x in v.items()})
    for a in range(0, len(caps), bs * 8):
        tok = s.tok([str(t) for t in s.data.cap_text[caps[a : a + bs * 8]]]).to(s.device)
        with _autocast(s):
            texts.append({k: x.float() for k, x in s.model.encode_text({"tokens": tok}).items()})
    cat = lambda parts: {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    return cat(texts), cat(vids), query, caps, items


def evaluate(s: Session, split: str) -> dict[str, Any]:
    """t2v / v2t metrics of `split` (the heads' chunked similarity; T-MASS noise keyed by caption / item ids)."""
    from train.data import id_keys
    from train.metrics import retrieval_metrics

    t, v, query, caps, items = encode_split(s, split)
    kw: dict[str, Any] = {}
    if hasattr(s.model, "eval_noise"):
        kw = {"text_keys": torch.from_numpy(id_keys(s.data.cap_ids[caps])),
              "video_keys": torch.from_numpy(id_keys(s.data.item_ids[items]))}
    with torch.no_grad():
        sim = s.model.similarity(t, v, chunk=s.cfg.eval_chunk, **kw).float().cpu()
    out: dict[str, Any] = dict(retrieval_metrics(sim, torch.from_numpy(query)))
    out["n_queries"], out["n_videos"] = int(len(caps)), int(len(items))
    return out


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # atomic: a crash never leaves half a checkpoint


def _load(path: Path) -> dict[str, Any]:
    """weights_only checkpoint load; FinetuneError naming the file otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - cut-off or foreign files
        raise FinetuneError(f"{path} cannot be read as a tvr fine-tuning checkpoint ({type(exc).__name__}); "
                            "restore it or start a new run") from None


def _restore(s: Session, run: Path) -> tuple[int, int, float, int]:
    """Load last.pt into the model / optimizer; (epoch, step, best score, best epoch)."""
    ck = _load(run / LAST)
    try:
        s.model.load_state_dict(ck["model"])
        s.opt.load_state_dict(ck["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise FinetuneError(f"{run / LAST} does not fit this model ({str(exc)[:200]}); start a new run") from None
    if s.scaler is not None and "scaler" in ck:
        s.scaler.load_state_dict(ck["scaler"])
    return int(ck["epoch"]), int(ck["step"]), float(ck["best_score"]), int(ck["best_epoch"])


def fit(cfg: FinetuneConfig, store: FeatureStore, url: str, run: Path, *, resume: bool = False,
        stop_after: int | None = None, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
        reader: Reader | None = None, saved: FinetuneConfig | None = None) -> dict[str, Any] | None:
    """Train per `cfg` into `run` (rank 0 writes); test metrics of the best checkpoint (None when stopped early)."""
    from train.plots import plot_history

    if saved is not None and resume_changes(saved, cfg):
        raise FinetuneError(f"--resume would change {run / CONFIG}: {'; '.join(resume_changes(saved, cfg))}; "
                            "resume with the run's settings or use another --out")
    s = make_session(cfg, store, url, reader)
    if s.info.main:
        run.mkdir(parents=True, exist_ok=True)
    start, step, best, best_epoch = _restore(s, run) if resume else (0, 0, -math.inf, 0)
    history = [h for h in _history(run) if h["epoch"] <= start] if resume else []
    if s.info.main:
        save(cfg, run / CONFIG, {"store": url, "store_id": store.store_id, "world_size": s.info.world,
                                 "clip_weights": weights_identity(cfg.clip_pretrained, cfg.random_init, cfg.seed)})
        (run / HISTORY).write_text("".join(json.dumps(h) + "\n" for h in history))
    total = cfg.epochs * s.data.n_batches(cfg.batch_size, cfg.caption_sampling, cfg.batch_size if s.info.enabled else 2)
    end = cfg.epochs if stop_after is None else min(cfg.epochs, max(stop_after, start))
    for epoch in range(start, end):
        losses, step = train_epoch(s, epoch, step, total, log)
        if s.info.main:
            best, best_epoch = _end_epoch(s, run, epoch, step, losses, best, best_epoch, history, log)
        D.barrier(s.info)
    if s.info.main:
        plot_history(history, run)
    if end < cfg.epochs:
        return None
    metrics = None
    if s.info.main:
        s.model.load_state_dict(_load(run / BEST)["model"])
        metrics = {**evaluate(s, cfg.test_split), "best_epoch": best_epoch}
        (run / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    D.barrier(s.info)
    return metrics


def _end_epoch(s: Session, run: Path, epoch: int, step: int, losses: dict[str, float], best: float, best_epoch: int,
               history: list[dict[str, Any]], log: Callable[[str], None]) -> tuple[float, int]:
    """Rank 0: validate, write best.pt / last.pt / metrics.jsonl; returns the new (best score, best epoch)."""
    val = evaluate(s, s.cfg.val_split) if s.cfg.val_split else {}
    score = sum(val["t2v"][k] for k in ("R@1", "R@5", "R@10")) if val else float(epoch)
    if score > best:
        best, best_epoch = score, epoch + 1
        _save({"model": s.model.state_dict(), "epoch": epoch + 1, "val_score": score}, run / BEST)
    rec = {"epoch": epoch + 1, **losses, "val": val, "val_score": score, "best_epoch": best_epoch}
    history.append(rec)
    with open(run / HISTORY, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    ck = {"model": s.model.state_dict(), "optimizer": s.opt.state_dict(), "epoch": epoch + 1, "step": step,
          "best_score": best, "best_epoch": best_epoch}
    if s.scaler is not None:
        ck["scaler"] = s.scaler.state_dict()
    _save(ck, run / LAST)
    r1 = f" val t2v R@1 {val['t2v']['R@1']:.2f}" if val else ""
    log(f"epoch {epoch + 1}/{s.cfg.epochs} loss {losses['train_loss']:.4f}{r1}" + (" *best*" if best_epoch == epoch + 1 else ""))
    return best, best_epoch


def _history(run: Path) -> list[dict[str, Any]]:
    path = run / HISTORY
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
