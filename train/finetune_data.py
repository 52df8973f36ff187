"""Frames and captions from a tvr store for CLIP fine-tuning: pairs, frame choice, the reference's transforms,
and a bounded prefetching batch reader.

- Items: videos (and images) whose `frames` row is OK and that have captions; splits from `item_split`.
- Pairs per epoch: `all_pairs` (every (item, caption) pair, the reference data loader) or `per_video` (one random
  caption per item), shuffled by numpy.random.default_rng([seed, epoch]).
- Frame choice from the stored steps (valid steps of the row, c of them), reference `video_sample_type`: the steps
  are cut into F equal segments (floor(linspace(0, c, F + 1))); training takes a random step in each segment
  ("rand"), evaluation its middle ("uniform"). With c < F steps repeat. A store with exactly F = 12 uniform steps
  (the `frames` default) therefore gives the reference's test frames, and training sees the same 12 (use the
  extractor's fps policy to let training draw other frames).
- Transforms (reference init_transform_dict): train RandomResizedCrop(R, scale 0.5-1, ratio 3/4-4/3, bilinear)
  + horizontal flip (p 0.5), one draw per video for all its frames; test: the stored frames (already Resize +
  CenterCrop) resized to R only if the store's size differs; both then CLIP mean/std. They run on the training
  device, on uint8 that crossed the bus (4x less than float).
- Every random choice of a global batch g comes from default_rng([seed, epoch, g]) drawn for the whole global batch,
  and each rank takes its slice, so N ranks x b see exactly what one process with N*b sees.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from store import FeatureStore
from store.schema import Status
from train.clip_backbone import normalize_frames

SAMPLING = ("all_pairs", "per_video")
READ_THREADS = 4  # concurrent row reads per batch


class FrameDataError(ValueError):
    """The store cannot feed fine-tuning; the message names the store, the feature and the fix."""


@dataclass
class GlobalBatch:
    """One global batch: item rows, caption rows and the per-item random draws, all of the global size."""

    index: int
    items: np.ndarray  # (G,) item rows
    captions: np.ndarray  # (G,) caption rows
    u_steps: np.ndarray  # (G, F) uniforms for the per-segment frame choice
    crops: np.ndarray  # (G, 5) RandomResizedCrop top, left, height, width, flip


class FrameData:
    """Items, captions and uint8 frames of a store's frames feature."""

    def __init__(self, store: FeatureStore, feature: str = "frames") -> None:
        """Check the feature (uint8 square RGB frames) and index usable items and captions."""
        url = store.url
        if feature not in store.features:
            raise FrameDataError(f"store {url}: no {feature!r} feature; extract it first: tvr-extract DATASET "
                                 f"--store {url} --features frames")
        spec = store.spec(feature)
        side = math.isqrt(spec.dim // 3)
        if spec.dtype != "uint8" or side * side * 3 != spec.dim:
            raise FrameDataError(f"store {url}: feature {feature!r} is {spec.dtype} with dim {spec.dim}, not uint8 "
                                 "square RGB frames (size*size*3); extract it with the `frames` extractor")
        self.store, self.url, self.feature, self.size, self.steps = store, url, feature, side, spec.max_steps
        items, caps = store.items(), store.captions()
        self.item_ids = np.asarray(items.id, dtype=object)
        self.split = np.asarray(items.split, dtype=object)
        self.cap_item = np.asarray(caps.item, dtype=np.int64)
        self.cap_text = np.asarray(caps.text, dtype=object)
        self.cap_ids = np.asarray(caps.id, dtype=object)
        ok = store.status(feature) == Status.OK
        has_cap = np.bincount(self.cap_item, minlength=len(self.item_ids)) > 0
        self.usable = ok & has_cap

    def split_items(self, split: str) -> np.ndarray:
        """Usable item rows of `split`."""
        return np.flatnonzero(self.usable & (self.split == split))

    def require(self, splits: tuple[str, ...]) -> None:
        """FrameDataError before training when a needed split has no usable item."""
        for s in dict.fromkeys(splits):
            if len(self.split_items(s)) == 0:
                raise FrameDataError(f"store {self.url}: split {s!r} has no item with an OK {self.feature!r} row and "
                                     "a caption; set item splits in the manifest or extract the frames")

    def captions_of(self, rows: np.ndarray) -> np.ndarray:
        """Caption rows of the given items, grouped by item in the given order."""
        order = np.argsort(self.cap_item, kind="stable")
        starts = np.searchsorted(self.cap_item[order], rows, "left")
        ends = np.searchsorted(self.cap_item[order], rows, "right")
        return np.concatenate([order[a:b] for a, b in zip(starts, ends)]) if len(rows) else np.zeros(0, np.int64)

    def epoch_pairs(self, epoch: int, seed: int, sampling: str) -> tuple[np.ndarray, np.ndarray]:
        """(item rows, caption rows) of one epoch, shuffled."""
        if sampling not in SAMPLING:
            raise FrameDataError(f"caption_sampling must be one of {SAMPLING}, got {sampling!r}")
        rng = np.random.default_rng([seed, epoch])
        train = self.split_items("train")
        caps = self.captions_of(train)
        if sampling == "all_pairs":
            items = self.cap_item[caps]
        else:
            counts = np.bincount(self.cap_item[caps], minlength=len(self.item_ids))[train]
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            caps = caps[first + (rng.random(len(train)) * counts).astype(np.int64)]
            items = train
        perm = rng.permutation(len(caps))
        return items[perm], caps[perm]

    def global_batches(self, epoch: int, seed: int, batch: int, sampling: str, num_frames: int,
                       min_last: int = 2) -> Iterator[GlobalBatch]:
        """The epoch's global batches with their random draws; a final batch below `min_last` is dropped."""
        items, caps = self.epoch_pairs(epoch, seed, sampling)
        for g, s in enumerate(range(0, len(items), batch)):
            n = min(batch, len(items) - s)
            if n < min_last:
                break
            rng = np.random.default_rng([seed, epoch, g, 7])
            yield GlobalBatch(g, items[s : s + n], caps[s : s + n], rng.random((n, num_frames)),
                              crop_params(rng, n, self.size))

    def n_batches(self, batch: int, sampling: str, min_last: int = 2) -> int:
        """Global batches per epoch."""
        n = len(self.epoch_pairs(0, 0, sampling)[0])
        return n // batch + (1 if n % batch >= min_last else 0)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, T, S, S, 3) frames and (n, T) masks of item rows (any order).

        The rows are read as contiguous runs (slices), a few runs at a time in threads: a fancy-index read of
        scattered rows goes through zarr's orthogonal selection, ~100x slower for these big sharded rows.
        """
        uniq, inv = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        cuts = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, cuts)] if len(uniq) else []
        batches = list(self._pool().map(lambda ab: self.store.read(self.feature, slice(*ab)), runs))
        vals = np.concatenate([b.values for b in batches]) if batches else np.zeros((0, self.steps, 0), np.uint8)
        mask = np.concatenate([b.mask for b in batches]) if batches else np.zeros((0, self.steps), bool)
        vals = vals.reshape(len(uniq), self.steps, self.size, self.size, 3)
        return vals[inv], mask[inv]

    def _pool(self) -> Any:
        """Reader threads (zstd decoding and file reads release the GIL)."""
        if getattr(self, "_executor", None) is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="tvr-frames-read")
        return self._executor


def choose_steps(mask: np.ndarray, num_frames: int, u: np.ndarray | None) -> np.ndarray:
    """(n, F) step indices: per row, F segments of its valid steps; random in each (u given) or the middle."""
    n = mask.shape[0]
    out = np.zeros((n, num_frames), dtype=np.int64)
    for r in range(n):
        valid = np.flatnonzero(mask[r])
        if len(valid) == 0:
            continue  # an unavailable row never reaches here (items are OK rows); zeros keep shapes
        b = np.floor(np.linspace(0, len(valid), num_frames + 1)).astype(np.int64)
        lo, hi = b[:-1], np.maximum(b[1:], b[:-1] + 1)
        pos = lo + (np.floor(u[r] * (hi - lo)).astype(np.int64) if u is not None else (hi - 1 - lo) // 2)
        out[r] = valid[np.minimum(pos, len(valid) - 1)]
    return out


def crop_params(rng: np.random.Generator, n: int, size: int, scale: tuple[float, float] = (0.5, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """(n, 5) RandomResizedCrop boxes (top, left, h, w) on a size x size frame + flip, torchvision's algorithm."""
    out = np.zeros((n, 5), dtype=np.int64)
    area, lr = size * size, (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(n):
        box = (0, 0, size, size)  # fallback: whole (square) frame, as torchvision's for ratio 1
        for _ in range(10):
            target = area * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*lr))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= size and 0 < h <= size:
                box = (int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w)
                break
        out[k, :4] = box
        out[k, 4] = int(rng.random() < 0.5)
    return out


def train_pixels(frames: torch.Tensor, crops: np.ndarray, res: int) -> torch.Tensor:
    """uint8 (B, F, S, S, 3) -> normalised float (B, F, 3, res, res) with each video's crop and flip."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = frames.permute(0, 1, 4, 2, 3).float().div_(255.0)
    out = []
    for v in range(x.shape[0]):
        top, left, h, w, flip = (int(c) for c in crops[v])
        y = TF.resized_crop(x[v], top, left, h, w, [res, res], interpolation=InterpolationMode.BILINEAR,
                            antialias=True)
        out.append(TF.hflip(y) if flip else y)
    return normalize_frames(torch.stack(out))


def eval_pixels(frames: torch.Tensor, res: int) -> torch.Tensor:
    """uint8 (B, F, S, S, 3) -> normalised float (B, F, 3, res, res); resized (bicubic) only when S != res."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = frames.permute(0, 1, 4, 2, 3).float().div_(255.0)
    if x.shape[-1] != res:
        b, f = x.shape[:2]
        x = TF.resize(x.flatten(0, 1), [res, res], interpolation=InterpolationMode.BICUBIC,
                      antialias=True).clamp_(0, 1).view(b, f, 3, res, res)
    return normalize_frames(x)


def prefetch(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `source` in a thread, at most `depth` items ahead (bounds loader memory); errors re-raise here."""
    if depth <= 0:
        yield from source
        return
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def work() -> None:
        try:
            for x in source:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(exc)

    t = threading.Thread(target=work, daemon=True, name="tvr-frames-prefetch")
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


LoadFn = Callable[[GlobalBatch], Any]
