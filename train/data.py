"""Training/evaluation data read from a tvr feature store, batched per the design §3 contract.

- Features are read lazily. When the selected rows of every feature fit `cache_bytes`, they are loaded once
  into tensors (the cached path). Otherwise (or with `train_reads="stream"`) the train split is streamed
  (train/stream_train.py: whole blocks read in the background, a bounded shuffle buffer, memory within the
  budget) and val/test rows are cached within a quarter of the budget or read per evaluation chunk.
- Availability `f_avail` is `status == OK`; unavailable rows have zero values and all-False masks.
  Faces (slot features) are flattened to (B, T*K, D) with mask = step mask & slot mask.
- Features: the model's config declares them (`FeatureNeeds`: MEE's `modalities` and `text_feature`, X-Pool /
  T-MASS's `frames_feature` and `text_feature`); nothing is bound to a model name.
- Values are checked on load: a NaN/inf at a valid step of an available row raises DataError naming the feature
  and the rows (ids), so no run trains into NaN weights.
- Training, `sampling="per_video"`: one epoch = every train video with a usable caption, plus `min(n_images,
  int(image_rate * n_videos))` random train images (kind "image"), shuffled together; each item gets one random
  caption per epoch. `sampling="all_pairs"` (the T-MASS / X-Pool reference): one epoch = every (video, caption)
  pair of the train videos, plus `min(n_image_pairs, int(image_rate * n_video_pairs))` random image pairs.
  A final batch smaller than 2 is dropped (in-batch contrastive losses and BatchNorm need >= 2); `drop_last`
  drops any partial final batch (the MEE reference).
- Evaluation: every video of the split with at least one available video feature; queries are all of their
  captions with an OK text feature (t2v); `query_item[q]` is the video index of caption q.
- Splits come from `item_split`. If every item has split "", a deterministic fallback is used with a warning:
  sha1(item id) mapped to [0, 1): < 0.8 train, < 0.9 val, else test (images always train).
- Features the model only max/mean-pools over valid steps (`FeatureNeeds.pooled`: MEE's "max" modalities) are
  pooled when read, cached or streamed alike: (B, 1, D) with mask (B, 1) = "had a valid step".
- `zero_fill_missing` (ablation): unavailable rows are reported available with zero values and the first step
  (first slot for faces) marked valid, as in the original MEE's zero vectors.
- Multiple choice: the store's question set (`FeatureStore.choices`, store/_choices.py), limited to questions
  whose video has an available feature and whose options all have an OK text feature.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from store import ChoiceSet, FeatureStore
from store.schema import FeatureBatch, FeatureSpec, Status, bad_value_rows
from train.models._api import FeatureNeeds, model_features

SAMPLING = ("per_video", "all_pairs")  # one random caption per video per epoch | every (video, caption) pair
SHOWN_IDS = 5  # ids named in an error message
FALLBACK_SPLIT = (0.8, 0.1)  # train / val cumulative boundaries of the hashed-id fallback


class DataError(ValueError):
    """The store cannot feed the requested training; the message says what is missing and how to fix it."""


Batch = dict[str, torch.Tensor]


def fallback_split(item_id: str, kind: str = "video") -> str:
    """Deterministic split of one item when the store has none: sha1(id) -> 80/10/10."""
    if kind == "image":
        return "train"
    u = int.from_bytes(hashlib.sha1(item_id.encode()).digest()[:8], "big") / 2**64
    return "train" if u < FALLBACK_SPLIT[0] else "val" if u < FALLBACK_SPLIT[1] else "test"


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """(n,) int64 keys of string ids (8-byte blake2b): the same id always gets the same key, in any store order."""
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True)
                     for i in ids], dtype=np.int64)


def check_features(store: FeatureStore, url: str, model: str, needs: FeatureNeeds) -> tuple[str, ...]:
    """Video features to use; DataError naming what `model` needs that the store lacks, with the extraction command.

    With `needs.video_optional` (MEE) the text feature and at least one video feature are needed (absent experts
    are dropped, with a warning); otherwise (T-MASS / X-Pool) all of them.
    """
    video, text = needs.video, needs.text
    have = set(store.features)
    missing = [f for f in (*video, text) if f not in have]
    present = tuple(f for f in video if f in have)
    if not missing:
        return present
    hint = f"run: tvr-extract SOURCE --store {url} --features {','.join(missing)}"
    if needs.video_optional and text in have and present:
        warnings.warn(
            f"store {url} lacks video feature(s) {', '.join(missing)}; training {model!r} without those experts "
            f"(to add them, {hint})",
            stacklevel=3,
        )
        return present
    raise DataError(
        f"store {url} lacks feature(s) {', '.join(missing)} needed by model {model!r} "
        f"(it has: {', '.join(sorted(have)) or 'none'}); {hint}"
    )


def value_bytes(spec: FeatureSpec, pool: str = "") -> int:
    """Bytes of one value as training holds it (cache and stream buffer): float16 stays float16 (its values convert
    back exactly) unless it is served as a mean (`pool`, FeatureNeeds.pooled: a float32 mean); the rest float32."""
    return 2 if spec.dtype == "float16" and pool != "mean" else 4


def cache_need(spec: FeatureSpec, n_rows: int) -> int:
    """Bytes FeatureSource's cache takes for `n_rows` rows of `spec` (values in the store's float width)."""
    return int(n_rows) * spec.max_steps * max(spec.slots, 1) * spec.dim * value_bytes(spec)


def _zero_invalid(values: np.ndarray, mask: np.ndarray) -> None:
    """Zero `values` (n, T, D) in place at every step where `mask` (n, T) is False (all of an unavailable row)."""
    part = np.flatnonzero(~mask.all(axis=1))  # rows with a step not valid: none when every row is full
    if not len(part):
        return
    if not values.flags.c_contiguous or values.itemsize not in (2, 4):
        np.copyto(values, 0, where=~mask[:, :, None])
        return
    # on the bits: an integer multiply by the mask is vectorised where float copyto(where=) is not, and it
    # clears NaN too (0 bits = +0.0)
    bits = values.view(np.uint16 if values.itemsize == 2 else np.uint32)
    if 2 * len(part) > len(values):
        np.multiply(bits, mask[:, :, None], out=bits)
    else:
        bits[part] = bits[part] * mask[part, :, None]


def pool_steps(values: np.ndarray, mask: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, T, D) values, (n, T) mask -> max or mean over the valid steps as (n, 1, D) (zeros where none), (n, 1) mask."""
    valid = mask.any(axis=1, keepdims=True)
    if how == "max":  # a maximum is one of the values: exact in the values' dtype
        out = np.max(values, axis=1, where=mask[:, :, None], initial=-np.inf, keepdims=True)
        out[~valid[:, 0]] = 0
        return out, valid
    if how == "mean":  # float32 sums, as the model's own mean
        total = np.sum(values, axis=1, where=mask[:, :, None], dtype=np.float32, keepdims=True)
        return total / np.maximum(mask.sum(axis=1), 1).astype(np.float32)[:, None, None], valid
    raise ValueError(f"pool_steps: unknown pooling {how!r}; choose max or mean")


class FeatureSource:
    """Rows of one feature as tensors: cached in memory when they fit, else read from the store per call."""

    def __init__(self, store: FeatureStore, spec: FeatureSpec, rows: np.ndarray, budget: list[int], zero_fill: bool,
                 describe: Callable[[np.ndarray], Sequence[str]] | None = None, pool: str = "") -> None:
        self.store, self.spec, self.zero_fill = store, spec, zero_fill
        self.describe = describe  # rows -> ids, for error messages
        self.pool = pool  # "max" | "mean": rows are served pooled over their valid steps (FeatureNeeds.pooled)
        self.status = np.asarray(store.status(spec.name))
        # the cache keeps float16 values float16 (value_bytes), halving memory and gather traffic
        self.cache_dtype = torch.float16 if value_bytes(spec, pool) == 2 else torch.float32
        need = cache_need(spec, len(rows))
        self.cache: dict[str, torch.Tensor] | None = None
        self.pos: dict[int, int] = {}
        if len(rows) and need <= budget[0]:
            budget[0] -= need
            rows = np.unique(rows)
            self.cache = self._load(rows)
            self.cache["f"] = self.cache["f"].to(self.cache_dtype)
            self.pos = {int(r): i for i, r in enumerate(rows)}

    @property
    def cached(self) -> bool:
        """True when every selected row is held in memory."""
        return self.cache is not None

    def _load(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Read sorted unique rows from the store into contract-shaped tensors."""
        return self.tensors(rows, self.store.read(self.spec.name, rows))

    def tensors(self, rows: np.ndarray, fb: FeatureBatch) -> dict[str, torch.Tensor]:
        """Contract-shaped tensors of `fb`, just read for sorted unique `rows` (its arrays are reused in place)."""
        # float16 values read with stored_dtype stay float16 (the stream's buffer; batches cast them), else float32
        values = np.asarray(fb.values, dtype=np.float16 if fb.values.dtype == np.float16 else np.float32)
        mask = np.asarray(fb.mask, dtype=bool)
        avail = np.asarray(fb.available, dtype=bool)
        if self.spec.slots:
            n, t, k, d = values.shape
            slot = np.asarray(fb.slot_mask, dtype=bool) & mask[:, :, None]
            values, mask = values.reshape(n, t * k, d), slot.reshape(n, t * k)
        mask = mask & avail[:, None]
        _zero_invalid(values, mask)
        self._check_finite(rows, values)
        if self.zero_fill:
            mask = mask.copy()
            mask[~avail, 0] = True
            avail = np.ones_like(avail)
        if self.pool:
            values, mask = pool_steps(values, mask, self.pool)
        return {"f": torch.from_numpy(values), "mask": torch.from_numpy(mask), "avail": torch.from_numpy(avail)}

    def _check_finite(self, rows: np.ndarray, values: np.ndarray) -> None:
        """DataError naming the rows whose valid steps hold NaN/inf (they would train into NaN weights)."""
        bad = bad_value_rows(values)
        if not bad.any():
            return
        rows = np.asarray(rows)[bad]
        shown = rows[:SHOWN_IDS]
        ids = [str(i) for i in self.describe(shown)] if self.describe else [str(r) for r in shown]
        more = f" and {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
        raise DataError(
            f"store {self.store.url}: feature {self.spec.name!r} holds NaN/inf values in {len(rows)} {self.spec.axis} "
            f"row(s): ids {', '.join(map(repr, ids))}{more} (rows {', '.join(map(str, shown))}); training on them "
            f"would give NaN weights. Mark them FAILED (FeatureStore.write_failed({self.spec.name!r}, row, "
            f"'non_finite')) and rerun tvr-extract --retry-failed, or re-extract the feature"
        )

    def get(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Tensors for `rows` (any order, repeats allowed): f (n, T', D), mask (n, T'), avail (n,)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.cache is not None and all(int(r) in self.pos for r in rows):
            idx = torch.as_tensor([self.pos[int(r)] for r in rows], dtype=torch.long)
            out = {k: v[idx] for k, v in self.cache.items()}
            out["f"] = out["f"].float()
            return out
        uniq, inv = np.unique(rows, return_inverse=True)  # rows outside the cached selection: read them
        part = self._load(uniq)
        idx = torch.from_numpy(inv.reshape(-1).astype(np.int64))
        return {k: v[idx] for k, v in part.items()}


@dataclass
class EvalSet:
    """Items and caption queries of one split."""

    split: str
    items: np.ndarray  # item rows (videos)
    captions: np.ndarray  # caption rows (queries)
    query_item: np.ndarray  # (n_captions,) index into `items` of each query's video


class StoreData:
    """Batches for one model from one store (see module docstring for the sampling rules)."""

    def __init__(
        self,
        store: FeatureStore,
        model: str | FeatureNeeds,
        *,
        model_config: Mapping[str, Any] | None = None,
        cache_bytes: int = 2 * 1024**3,
        zero_fill_missing: bool = False,
        splits: Sequence[str] = ("train", "val", "test"),
        train_reads: str = "auto",
    ) -> None:
        """Serve the features `model` declares (a registered name with `model_config`, or FeatureNeeds)."""
        self.needs = model if isinstance(model, FeatureNeeds) else model_features(model, model_config)
        name = model if isinstance(model, str) else "model"
        self.store, self.url, self.model = store, str(store.url), name
        self.text_feature = self.needs.text
        self.video_features = check_features(store, self.url, name, self.needs)
        items = store.items()
        self.item_ids = np.asarray(items.id).astype(str)
        self.kind = np.asarray(items.kind).astype(str)
        split = np.asarray(items.split).astype(str)
        if (split == "").all():
            warnings.warn(
                f"store {self.url} has no item splits; using the deterministic fallback sha1(id) -> 80/10/10 "
                "train/val/test (images: train). Set splits at store creation for a fixed protocol.",
                stacklevel=2,
            )
            split = np.array([fallback_split(i, k) for i, k in zip(self.item_ids, self.kind)])
        self.split = split
        caps = store.captions()
        self.caption_item = np.asarray(caps.item, dtype=np.int64)
        text_ok = np.asarray(store.status(self.text_feature)) == Status.OK
        self.caption_ok = text_ok
        # usable captions per item: CSR layout (order, offsets)
        ok_rows = np.flatnonzero(text_ok)
        order = ok_rows[np.argsort(self.caption_item[ok_rows], kind="stable")]
        counts = np.bincount(self.caption_item[order], minlength=len(self.item_ids))
        self.cap_order, self.cap_start, self.cap_count = order, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
        any_video = np.zeros(len(self.item_ids), dtype=bool)
        for f in self.video_features:
            any_video |= np.asarray(store.status(f)) == Status.OK
        self.any_video = any_video
        wanted = np.isin(self.split, list(splits)) & (self.cap_count > 0) & any_video
        cap_rows = self.captions_of(np.flatnonzero(wanted))
        need = sum(cache_need(store.spec(f), wanted.sum()) for f in self.video_features)
        self.stream = None  # train.stream_train.TrainStream when the train split is streamed
        streamed = "train" in splits and (train_reads == "stream" or (
            train_reads == "auto" and need + cache_need(store.spec(self.text_feature), len(cap_rows)) > cache_bytes))
        # streaming: train rows are read block by block; val/test rows stay cached within a quarter of the budget
        # (else read per evaluation chunk), and the stream gets the rest
        budget = [int(cache_bytes) // 4 if streamed else int(cache_bytes)]
        if streamed:
            wanted &= self.split != "train"
            cap_rows = self.captions_of(np.flatnonzero(wanted))
        pooled = dict(self.needs.pooled)
        self.video = {
            f: FeatureSource(store, store.spec(f), np.flatnonzero(wanted), budget, zero_fill_missing,
                             describe=lambda r: self.item_ids[r], pool=pooled.get(f, ""))
            for f in self.video_features
        }
        self.text = FeatureSource(store, store.spec(self.text_feature), np.sort(cap_rows), budget, False,
                                  describe=self.caption_ids)
        if streamed:
            from train.stream_train import TrainStream

            self.stream = TrainStream(self, int(cache_bytes) - (int(cache_bytes) // 4 - budget[0]))
        self._keys: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def caption_ids(self, rows: np.ndarray) -> np.ndarray:
        """Caption ids of caption rows (reads the id column; for messages and noise keys, not per batch)."""
        return np.asarray(self.store.captions().id).astype(str)[np.asarray(rows, dtype=np.int64)]

    def captions_of(self, items: np.ndarray) -> np.ndarray:
        """Usable caption rows of `items`, item by item (CSR gather, no per-item Python loop)."""
        items = np.asarray(items, dtype=np.int64)
        counts = self.cap_count[items]
        first = np.cumsum(counts) - counts
        pos = np.repeat(self.cap_start[items] - first, counts) + np.arange(int(counts.sum()))
        return self.cap_order[pos]

    # ---- splits -----------------------------------------------------------------------------------------
    def train_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(video rows, image rows) of the train split that have a caption and an available video feature."""
        ok = (self.split == "train") & (self.cap_count > 0) & self.any_video
        return np.flatnonzero(ok & (self.kind == "video")), np.flatnonzero(ok & (self.kind == "image"))

    def eval_set(self, split: str) -> EvalSet:
        """Videos of `split` and all their usable captions as queries."""
        ok = (self.split == split) & (self.kind == "video") & self.any_video
        dropped = int(((self.split == split) & (self.kind == "video") & ~self.any_video).sum())
        if dropped:
            warnings.warn(f"{split}: {dropped} videos have no available video feature and are left out", stacklevel=2)
        items = np.flatnonzero(ok & (self.cap_count > 0))
        if len(items) == 0:
            raise DataError(
                f"store {self.url}: split {split!r} has no videos with captions and features; "
                "set item splits when creating the store (or extract the missing features)"
            )
        caps = self.captions_of(items)
        return EvalSet(split, items, caps, np.repeat(np.arange(len(items), dtype=np.int64), self.cap_count[items]))

    def check_splits(self, train: str = "train", evals: Sequence[str] = ("val", "test")) -> None:
        """DataError before any training when the train split has no usable video or an eval split is empty."""
        if len(self.train_items()[0]) == 0:
            raise DataError(
                f"store {self.url}: split {train!r} has no videos with captions and features; "
                "set item splits when creating the store (or extract the missing features)"
            )
        for split in dict.fromkeys(evals):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dropped-video warnings come again at evaluation
                self.eval_set(split)

    def eval_keys(self, es: EvalSet) -> tuple[np.ndarray, np.ndarray]:
        """(caption keys, item keys) of an eval set: int64 hashes of the ids, for id-keyed evaluation noise."""
        if es.split not in self._keys:
            self._keys[es.split] = (id_keys(self.caption_ids(es.captions)), id_keys(self.item_ids[es.items]))
        return self._keys[es.split]

    def choice_set(self) -> ChoiceSet | None:
        """The store's multiple-choice questions that can be scored, or None when the store has none."""
        mc = self.store.choices()
        if mc is None:
            return None
        keep = self.any_video[mc.items] & self.caption_ok[mc.captions].all(axis=1)
        return ChoiceSet(mc.items[keep], mc.captions[keep], mc.answer[keep])

    # ---- batches ----------------------------------------------------------------------------------------
    def epoch_pairs(self, epoch: int, seed: int, image_rate: float,
                    sampling: str = "per_video") -> tuple[np.ndarray, np.ndarray]:
        """(item rows, caption rows) of one training epoch, shuffled; deterministic in (seed, epoch)."""
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
        rng = np.random.default_rng([int(seed), int(epoch)])
        videos, images = self.train_items()
        if len(videos) == 0:
            raise DataError(f"store {self.url}: no train videos with captions and available features")
        if sampling == "all_pairs":
            vcaps, icaps = self.captions_of(videos), self.captions_of(images)
            n_img = min(len(icaps), int(image_rate * len(vcaps)))
            picked = rng.choice(icaps, n_img, replace=False) if n_img else np.zeros(0, dtype=np.int64)
            caps = rng.permutation(np.concatenate([vcaps, picked]).astype(np.int64))
            return self.caption_item[caps], caps
        n_img = min(len(images), int(image_rate * len(videos)))
        picked = rng.choice(images, n_img, replace=False) if n_img else np.zeros(0, dtype=np.int64)
        rows = rng.permutation(np.concatenate([videos, picked]).astype(np.int64))
        draw = (rng.random(len(rows)) * self.cap_count[rows]).astype(np.int64)
        return rows, self.cap_order[self.cap_start[rows] + draw]

    @staticmethod
    def _batch_starts(n: int, batch_size: int, drop_last: bool) -> range:
        """Start offsets of the batches of n pairs: full batches, then a final one of >= 2 pairs unless drop_last."""
        end = n - n % batch_size if drop_last or n % batch_size < 2 else n
        return range(0, end, batch_size)

    def train_batches(self, epoch: int, seed: int, batch_size: int, image_rate: float, sampling: str = "per_video",
                      drop_last: bool = False) -> Iterator[tuple[Batch, Batch]]:
        """(text, video) batches of one epoch (streamed when the train features exceed the cache budget)."""
        if self.stream is not None:
            yield from self.stream.batches(epoch, seed, batch_size, image_rate, sampling, drop_last)
            return
        rows, caps = self.epoch_pairs(epoch, seed, image_rate, sampling)
        for s in self._batch_starts(len(rows), batch_size, drop_last):
            yield self.text_batch(caps[s : s + batch_size]), self.video_batch(rows[s : s + batch_size])

    def batch_ids(self, epoch: int, seed: int, batch_size: int, image_rate: float, index: int,
                  sampling: str = "per_video") -> tuple[np.ndarray, np.ndarray]:
        """(item ids, caption ids) of batch `index` of an epoch, for error messages (recomputes the epoch's order;
        streamed: the last batch read, which is the one a failing training step just used)."""
        if self.stream is not None:
            items, caps = self.stream.last
            return self.item_ids[items], self.caption_ids(caps)
        rows, caps = self.epoch_pairs(epoch, seed, image_rate, sampling)
        s = slice(index * batch_size, (index + 1) * batch_size)
        return self.item_ids[rows[s]], self.caption_ids(caps[s])

    def n_pairs(self, image_rate: float, sampling: str = "per_video") -> int:
        """Number of (item, caption) pairs of one epoch."""
        videos, images = self.train_items()
        if sampling == "all_pairs":
            nv = int(self.cap_count[videos].sum())
            return nv + min(int(self.cap_count[images].sum()), int(image_rate * nv))
        return len(videos) + min(len(images), int(image_rate * len(videos)))

    def n_train_batches(self, batch_size: int, image_rate: float, sampling: str = "per_video",
                        drop_last: bool = False) -> int:
        """Number of batches `train_batches` yields."""
        return len(self._batch_starts(self.n_pairs(image_rate, sampling), batch_size, drop_last))

    def video_batch(self, rows: np.ndarray) -> Batch:
        """Video dict: `f`, `f_mask`, `f_avail` per feature."""
        out: Batch = {}
        for name, src in self.video.items():
            part = src.get(rows)
            out[name], out[f"{name}_mask"], out[f"{name}_avail"] = part["f"], part["mask"], part["avail"]
        return out

    def text_batch(self, caption_rows: np.ndarray) -> Batch:
        """Text dict keyed as the model declares: `<key>` (B, L, D) + `<key>_mask` (MEE's `words`), or `<key>` (B, D)."""
        part = self.text.get(caption_rows)
        key = self.needs.text_key
        if self.needs.text_sequence:
            return {key: part["f"], f"{key}_mask": part["mask"]}
        return {key: part["f"][:, 0]}

    @property
    def spec_text(self) -> FeatureSpec:
        """Spec of the text feature."""
        return self.text.spec

    def specs(self) -> dict[str, FeatureSpec]:
        """Specs of every feature this data feeds the model."""
        return {**{f: s.spec for f, s in self.video.items()}, self.text_feature: self.text.spec}
