"""Streaming reads of a feature store larger than memory: whole row blocks, background prefetch, bounded shuffle.

`BlockStream` yields batches of rows of one or more features of one axis (design §1 shards): the selected rows are
grouped into blocks of `block_rows` consecutive store rows (a shard's worth by default), blocks are read in a
seeded random order by `workers` background threads, at most `prefetch` blocks ahead, into a shuffle buffer of
at most `buffer_rows` rows (one preallocated byte matrix, no reallocation); up to a block's worth of random rows
leaves it in one gather (swap-remove) and is cut into batches of `batch_size`. Blocks are read with
store._shard_io's bulk shard reads (one request per shard or byte range, not one per inner chunk). Memory stays
within about (buffer_rows + (prefetch + 2) * block_rows) rows, which `from_budget` derives from a byte budget
(`--cache-gb`).

When the buffer holds every selected row (the cache fits), the batches are exactly those of the in-memory path:
rows in the order `np.random.default_rng([seed, epoch]).permutation(rows)`, cut into `batch_size` slices.
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.schema import FeatureBatch, inner_rows


@dataclass(frozen=True)
class StreamConfig:
    """How a BlockStream reads: rows per block and in the buffer, read-ahead and threads."""

    batch_size: int = 256
    buffer_rows: int = 65536  # shuffle buffer; >= the selected rows reproduces the in-memory order
    block_rows: int = 0  # rows per read; 0 = the features' largest shard size
    prefetch: int = 2  # blocks read ahead of the buffer
    workers: int = 2  # background reader threads
    seed: int = 0


def row_bytes(store: Any, features: Sequence[str]) -> int:
    """Bytes one row of `features` takes in memory as read (float32 values, masks, times)."""
    total = 0
    for f in features:
        sp = store.spec(f)
        steps = sp.max_steps * max(1, sp.slots)
        total += steps * sp.dim * 4 + sp.max_steps * 5 + steps
    return total


def from_budget(store: Any, features: Sequence[str], budget_bytes: int, **kw: Any) -> StreamConfig:
    """A StreamConfig whose buffer and in-flight reads fit `budget_bytes`.

    A read holds about twice its block (zarr's decoded chunks, then float32 rows), so half the budget goes to the
    shuffle buffer and half to `prefetch + workers` reads; blocks are whole inner chunks (never a partial decode).
    """
    per = max(1, row_bytes(store, features))
    prefetch, workers = kw.pop("prefetch", 2), kw.pop("workers", 2)
    inner = max(math.gcd(store.shard_rows(f), inner_rows(store.spec(f))) for f in features)
    rows = budget_bytes // per
    block = kw.pop("block_rows", 0) or max(store.shard_rows(f) for f in features)
    block = max(inner, min(block, rows // (4 * (prefetch + workers))) // inner * inner)
    slots = max(1, rows // (4 * block))  # reads the other half of the budget holds at once (blocks >= inner chunks)
    prefetch, workers = min(prefetch, slots), min(workers, slots)
    buffer_rows = max(1, rows // 2 - block)  # the buffer holds up to buffer_rows + one block
    return StreamConfig(buffer_rows=int(buffer_rows), block_rows=int(block), prefetch=prefetch, workers=workers, **kw)


_FIELDS = ("rows", "values", "mask", "time", "status", "available", "slot_mask")


def _take(batch: dict[str, FeatureBatch], pos: np.ndarray | slice) -> dict[str, FeatureBatch]:
    out = {}
    for f, b in batch.items():
        out[f] = FeatureBatch(rows=b.rows[pos], values=b.values[pos], mask=b.mask[pos], time=b.time[pos],
                              status=b.status[pos], available=b.available[pos],
                              slot_mask=None if b.slot_mask is None else b.slot_mask[pos],
                              extras={k: v[pos] for k, v in b.extras.items()})
    return out


def _concat(parts: list[dict[str, FeatureBatch]]) -> dict[str, FeatureBatch]:
    out = {}
    for f in parts[0]:
        bs = [p[f] for p in parts]
        cat = {k: None if getattr(bs[0], k) is None else np.concatenate([getattr(b, k) for b in bs]) for k in _FIELDS}
        out[f] = FeatureBatch(**cat, extras={k: np.concatenate([b.extras[k] for b in bs]) for k in bs[0].extras})
    return out


class _Buffer:
    """Fixed-capacity shuffle buffer: one byte matrix, each row holding every field of every feature.

    A batch leaves with one gather (and the tail moves into its holes with one more), whatever the number of
    features and fields; its arrays are views of the gathered rows (last axis contiguous, 8-byte aligned).
    """

    def __init__(self, capacity: int) -> None:
        self.cap, self.n = capacity, 0
        self.data: np.ndarray | None = None
        self.layout: list[tuple[str, str, int, int, np.dtype, tuple[int, ...]]] = []  # feature, field, at, bytes

    @staticmethod
    def _columns(block: dict[str, FeatureBatch]) -> list[tuple[str, str, np.ndarray]]:
        out = []
        for f, b in block.items():
            out += [(f, name, getattr(b, name)) for name in _FIELDS if getattr(b, name) is not None]
            out += [(f, f"extra:{e}", v) for e, v in b.extras.items()]
        return out

    def add(self, block: dict[str, FeatureBatch]) -> None:
        cols = self._columns(block)
        k = len(cols[0][2])
        if self.data is None:
            at = 0
            for f, name, v in cols:
                if v.dtype.hasobject:
                    raise TypeError(f"BlockStream: field '{f}.{name}' has object dtype; only numeric fields stream")
                nb = v.dtype.itemsize * int(np.prod(v.shape[1:], dtype=np.int64))
                self.layout.append((f, name, at, nb, v.dtype, tuple(v.shape[1:])))
                at += -(-nb // 8) * 8  # 8-byte aligned fields
            self.data = np.empty((self.cap, max(8, at)), dtype=np.uint8)
        if not k:
            return
        for (_, _, at, nb, dt, _), (_, _, v) in zip(self.layout, cols):
            rows = np.ascontiguousarray(v, dtype=dt).reshape(k, -1).view(np.uint8)
            self.data[self.n:self.n + k, at:at + nb] = rows
        self.n += k

    def pop(self, pos: np.ndarray) -> dict[str, FeatureBatch]:
        """Remove the rows at `pos` (unique) and return them; the last rows move into the holes."""
        assert self.data is not None
        got = self.data[pos]
        m = len(pos)
        cols: dict[str, dict[str, np.ndarray]] = {}
        for f, name, at, nb, dt, shape in self.layout:
            cols.setdefault(f, {})[name] = got[:, at:at + nb].view(dt).reshape(m, *shape)
        out = {f: FeatureBatch(**{name: c.get(name) for name in _FIELDS},
                               extras={n[6:]: v for n, v in c.items() if n.startswith("extra:")})
               for f, c in cols.items()}
        tail = self.n - m
        taken = np.zeros(m, dtype=bool)
        taken[pos[pos >= tail] - tail] = True
        holes = pos[pos < tail]
        if len(holes):
            self.data[holes] = self.data[tail + np.flatnonzero(~taken)]
        self.n = tail
        return out


class BlockStream:
    """Batches (feature -> FeatureBatch) over `rows` of `features`, read block by block in the background."""

    def __init__(self, store: Any, features: Sequence[str], rows: np.ndarray, cfg: StreamConfig) -> None:
        self.store, self.features, self.cfg = store, list(features), cfg
        rows = np.asarray(rows, dtype=np.int64).ravel()
        self.rows = rows if len(rows) < 2 or bool(np.all(rows[1:] > rows[:-1])) else np.unique(rows)  # sorted: as is
        block = cfg.block_rows or max(store.shard_rows(f) for f in features)
        keys = self.rows // block
        cuts = np.flatnonzero(np.diff(keys)) + 1
        self.blocks = np.split(self.rows, cuts) if len(self.rows) else []

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.cfg.batch_size)

    def _reader(self, order: list[int], out: queue.Queue) -> None:
        """Read blocks in `order` with `workers` threads, at most `prefetch` ahead of the consumer."""
        with ThreadPoolExecutor(self.cfg.workers) as pool:
            futs = [pool.submit(self.store.read_many, self.features, self.blocks[i]) for i in order[:self.cfg.prefetch]]
            nxt = len(futs)
            for k in range(len(order)):
                try:
                    out.put(futs[k].result())
                except Exception as e:  # hand the error to the consumer
                    out.put(e)
                    return
                if nxt < len(order):
                    futs.append(pool.submit(self.store.read_many, self.features, self.blocks[order[nxt]]))
                    nxt += 1
                futs[k] = None  # type: ignore[call-overload]  # drop the reference: memory stays bounded
        out.put(None)

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, FeatureBatch]]:
        """One pass over every selected row, in batches."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        n, bs = len(self.rows), self.cfg.batch_size
        if self.cfg.buffer_rows >= n:  # everything fits: the in-memory path's exact order
            perm = rng.permutation(n)
            if not n:
                return
            whole = _concat([self.store.read_many(self.features, b) for b in self.blocks])
            for lo in range(0, n, bs):
                yield _take(whole, perm[lo:lo + bs])
            return
        order = rng.permutation(len(self.blocks)).tolist()
        q: queue.Queue = queue.Queue(maxsize=1)
        t = threading.Thread(target=self._reader, args=(order, q), daemon=True)
        t.start()
        cap = self.cfg.buffer_rows + max((len(b) for b in self.blocks), default=0)
        buf, done = _Buffer(cap), False
        # up to a block's worth of rows leaves the buffer in one gather, then is cut into batches (views): per-batch
        # numpy calls dominate when rows are small; memory: one block more, within from_budget's allowance
        per = bs * max(1, (cap - self.cfg.buffer_rows) // bs)
        while True:
            while not done and buf.n < self.cfg.buffer_rows:
                got = q.get()
                if isinstance(got, Exception):
                    raise got
                if got is None:
                    done = True
                    break
                buf.add(got)
                del got
            if not buf.n:
                break
            take = min(per, buf.n)
            if not done:  # whole batches only until the last one of the epoch
                take = max(min(bs, buf.n), take // bs * bs)
            rows = buf.pop(rng.choice(buf.n, size=take, replace=False))
            for lo in range(0, take, bs):
                yield _take(rows, slice(lo, lo + bs))
        t.join()
