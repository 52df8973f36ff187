"""Streaming training reads for `tvr-train` when the train split's features exceed the memory budget (`--cache-gb`).

An epoch's (item, caption) pairs come from `StoreData.epoch_pairs`, exactly as on the cached path. The pairs are
grouped by blocks of `block_rows` consecutive item rows; blocks are read in a seeded random order by background
threads (train.stream.shuffled), each read turning the block's video rows and its pairs' caption rows into the
model's arrays once (masks, availability, invalid steps zeroed, NaN/inf check: `FeatureSource.tensors`, the
cached path's own conversion), values kept in the store's dtype (float16 halves the buffer's bytes and copies);
pairs leave a bounded shuffle buffer at random, cut into batches, and each batch's float16 values are cast to
float32 as the cached path's gather does.

Memory: the buffer holds `buffer_rows` pairs plus one block, and at most `prefetch` converted blocks wait while
`workers` reads are in flight, each holding about READ_COPIES times its converted size; `plan` sizes all of it
to fit the budget (`held_pairs`). When the buffer holds every pair of the epoch, the batches are exactly the cached path's
(same pairs in the same order, same tensors).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from store.schema import inner_rows
from train.data import value_bytes
from train.stream import Columns, StreamConfig, shuffled

if TYPE_CHECKING:
    from train.data import Batch, StoreData

READ_COPIES = 3  # peak bytes of one block read (decoded store arrays, float32 copies) / its converted size (~2.75)


def held_pairs(cfg: StreamConfig, block_pairs: int) -> int:
    """Pairs' worth of memory a stream holds at most: the buffer and the block being added, a queued block, the
    gathered rows being cut into batches (and their copy as batch tensors), `prefetch` reads in flight."""
    per = cfg.batch_size * max(1, min(block_pairs, cfg.buffer_rows // 8) // cfg.batch_size)
    return max(cfg.buffer_rows, cfg.batch_size) + 2 * block_pairs + 2 * per + cfg.prefetch * READ_COPIES * block_pairs


def plan(budget: int, pair_bytes: int, pairs_per_item: float, align: int, batch_size: int,
         prefetch: int = 1, workers: int = 1) -> StreamConfig:
    """StreamConfig whose buffer, queued blocks and reads in flight fit `budget` bytes (`held_pairs`).

    Half the budget at most goes to blocks (a fifth of that each with prefetch 1), the rest to the shuffle buffer
    and its batch gathers. A block is at least `align` item rows (whole inner chunks) and the buffer at least a
    batch, whatever the budget.
    """
    rows = max(1, budget // max(1, pair_bytes))
    block_pairs = rows // (2 * (2 + prefetch * READ_COPIES))
    block = max(align, int(block_pairs / max(pairs_per_item, 1.0)) // align * align)
    bp = int(math.ceil(block * pairs_per_item))
    # everything but the buffer, with the gathers at their largest (a buffer of >= 8 blocks draws a block at once)
    big = StreamConfig(batch_size=batch_size, buffer_rows=8 * bp, block_rows=block, prefetch=prefetch, workers=workers)
    fixed = held_pairs(big, bp) - max(8 * bp, batch_size)
    return StreamConfig(batch_size=batch_size, buffer_rows=max(1, rows - fixed), block_rows=block, prefetch=prefetch,
                        workers=workers)


def _tensor(v: np.ndarray) -> torch.Tensor:
    """A batch column as the model's tensor: float16 values cast to float32 (as the cached path's gather does)."""
    t = torch.from_numpy(v)
    return t.float() if t.dtype == torch.float16 else t


def _in_order(rows: np.ndarray, uniq: np.ndarray) -> bool:
    """True when `rows` equals its sorted unique values (so reads of `uniq` need no gather)."""
    return len(rows) == len(uniq) and bool(np.array_equal(rows, uniq))


class TrainStream:
    """Training batches of a StoreData read block by block within `budget` bytes (see the module docstring)."""

    def __init__(self, data: StoreData, budget: int, prefetch: int = 1, workers: int = 1) -> None:
        # one reader thread one block ahead: on few cores a second reader mostly contends for the GIL, and the
        # memory it would hold buys blocks twice as big (fewer per-read costs)
        self.data, self.budget, self.prefetch, self.workers = data, int(budget), prefetch, workers
        store = data.store
        # blocks of whole inner chunks of the feature with the smallest ones (a partial chunk of another feature
        # is decoded by both blocks that share it: some extra work, no extra memory)
        self.align = min(math.gcd(store.shard_rows(f), inner_rows(store.spec(f))) for f in data.video_features)
        self.last: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int64), np.zeros(0, np.int64))

    def pair_bytes(self) -> int:
        """Bytes one (video, caption) pair takes in the buffer as model tensors."""
        total = 16  # item and caption row
        for f in self.data.video_features:
            sp, pool = self.data.store.spec(f), self.data.video[f].pool
            steps = 1 if pool else sp.max_steps * max(1, sp.slots)  # pooled features are served as one step
            total += steps * sp.dim * value_bytes(sp, pool) + steps + 1
        sp = self.data.spec_text
        width = sp.dim * value_bytes(sp)
        total += sp.max_steps * (width + 1) if self.data.needs.text_sequence else width
        return total

    def config(self, n_pairs: int, batch_size: int) -> StreamConfig:
        """The StreamConfig of an epoch of `n_pairs` pairs."""
        items = max(1, len(np.concatenate(self.data.train_items())))
        return plan(self.budget, self.pair_bytes(), n_pairs / items, self.align, batch_size, self.prefetch,
                    self.workers)

    def describe(self, image_rate: float, sampling: str, batch_size: int) -> str:
        """One line on how an epoch is read (for the run's log), naming a budget too small for one block."""
        n = self.data.n_pairs(image_rate, sampling)
        cfg = self.config(n, batch_size)
        per_item = n / max(1, len(np.concatenate(self.data.train_items())))
        held = held_pairs(cfg, int(math.ceil(cfg.block_rows * per_item))) * self.pair_bytes()
        over = (f"; the budget is below the minimum of one block and one batch, so reads hold about "
                f"{held / 2**20:.1f} MiB" if held > self.budget else "")
        return (f"train reads: streamed within {self.budget / 2**20:.1f} MiB (the train features do not fit "
                f"--cache-gb): blocks of {cfg.block_rows} items, shuffle buffer {min(cfg.buffer_rows, n)} of {n} "
                f"pairs per epoch ({min(1.0, cfg.buffer_rows / max(n, 1)):.0%}), {cfg.workers} reader "
                f"thread{'s' if cfg.workers > 1 else ''}{over}")

    def _read(self, pairs: np.ndarray, items: np.ndarray, caps: np.ndarray) -> Columns:
        """The pairs `pairs` (indices into the epoch, sorted by item) as model-ready columns."""
        it, cp = items[pairs], caps[pairs]
        cols: Columns = {"_pair": pairs, "_item": it, "_cap": cp}
        ui, inv_i = np.unique(it, return_inverse=True)
        uc, inv_c = np.unique(cp, return_inverse=True)
        same_i, same_c = _in_order(it, ui), _in_order(cp, uc)  # one pair per row, in row order: no gather
        store = self.data.store
        read = store.read_many(list(self.data.video), ui, stored_dtype=True)  # every video feature in one call
        for f, src in self.data.video.items():
            part = src.tensors(ui, read.pop(f))
            for key, name in (("f", f), ("mask", f"{f}_mask"), ("avail", f"{f}_avail")):
                v = part[key].numpy()
                cols[f"v/{name}"] = v if same_i else v[inv_i]
        text = self.data.text
        part = text.tensors(uc, store.read_many([text.spec.name], uc, stored_dtype=True)[text.spec.name])
        key = self.data.needs.text_key
        f = part["f"].numpy()
        if self.data.needs.text_sequence:
            m = part["mask"].numpy()
            cols[f"t/{key}"], cols[f"t/{key}_mask"] = (f, m) if same_c else (f[inv_c], m[inv_c])
        else:
            cols[f"t/{key}"] = np.ascontiguousarray(f[:, 0] if same_c else f[inv_c, 0])
        return cols

    def _to_batch(self, cols: Columns) -> tuple[Batch, Batch]:
        """(text, video) tensors of one batch of columns, keyed as StoreData.text_batch / video_batch."""
        self.last = (cols["_item"], cols["_cap"])
        text = {k[2:]: _tensor(v) for k, v in cols.items() if k.startswith("t/")}
        video = {k[2:]: _tensor(v) for k, v in cols.items() if k.startswith("v/")}
        return text, video

    def batches(self, epoch: int, seed: int, batch_size: int, image_rate: float, sampling: str = "per_video",
                drop_last: bool = False) -> Iterator[tuple[Batch, Batch]]:
        """(text, video) batches of one epoch: the cached path's pairs, and its order when the buffer holds them."""
        items, caps = self.data.epoch_pairs(epoch, seed, image_rate, sampling)
        cfg = self.config(len(items), batch_size)
        order = np.lexsort((caps, items))  # pairs sorted by item row (blocks are row ranges), then caption
        key = items[order] // cfg.block_rows
        blocks = np.split(order, np.flatnonzero(np.diff(key)) + 1) if len(order) else []
        starts = self.data._batch_starts(len(items), batch_size, drop_last)
        if cfg.buffer_rows >= len(items):  # everything fits: the cached path's exact batches
            yield from self._in_order(blocks, items, caps, starts, batch_size)
            return
        rng = np.random.default_rng([int(seed), int(epoch), 1])
        block_order = rng.permutation(len(blocks)).tolist()
        big = max((len(b) for b in blocks), default=0)
        left = len(starts)
        for cols in shuffled(lambda i: self._read(blocks[i], items, caps), block_order, big, cfg, rng):
            if not left:  # a final partial batch that `starts` drops (< 2 pairs, or drop_last)
                break
            left -= 1
            yield self._to_batch(cols)

    def _in_order(self, blocks: list[np.ndarray], items: np.ndarray, caps: np.ndarray, starts: range,
                  batch_size: int) -> Iterator[tuple[Batch, Batch]]:
        """Every pair read (block by block) into epoch order, then cut into the cached path's batches."""
        whole: Columns = {}
        for b in blocks:
            cols = self._read(b, items, caps)
            if not whole:
                whole = {k: np.empty((len(items), *v.shape[1:]), dtype=v.dtype) for k, v in cols.items()}
            for k, v in cols.items():
                whole[k][b] = v
        for s in starts:
            yield self._to_batch({k: v[s:s + batch_size] for k, v in whole.items()})
