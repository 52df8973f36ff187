"""Streaming reads of a feature store larger than memory: whole row blocks, background prefetch, bounded shuffle.

`BlockStream` yields batches of rows of one or more features of one axis (design §1 shards): the selected rows are
grouped into blocks of `block_rows` consecutive store rows (a shard's worth by default), blocks are read in a
seeded random order by `workers` background threads, at most `prefetch` blocks ahead, into a shuffle buffer of
at most `buffer_rows` rows (preallocated arrays, no reallocation); once it is full, up to a block's worth of
random rows leaves it in one gather, the next rows of the block at hand are written into their places (each row
is copied in once and out once), and the rows that left are cut into batches of `batch_size`. Blocks are read with
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from store.schema import FeatureBatch, inner_rows
from store.zarr_store import FeatureStore


@dataclass(frozen=True)
class StreamConfig:
    """How a BlockStream reads: rows per block and in the buffer, read-ahead and threads."""

    batch_size: int = 256
    buffer_rows: int = 65536  # shuffle buffer; >= the selected rows reproduces the in-memory order
    block_rows: int = 0  # rows per read; 0 = the features' largest shard size
    prefetch: int = 2  # blocks read ahead of the buffer
    workers: int = 2  # background reader threads
    seed: int = 0


def row_bytes(store: FeatureStore, features: Sequence[str]) -> int:
    """Bytes one row of `features` takes in memory as read (float32 values, masks, times)."""
    total = 0
    for f in features:
        sp = store.spec(f)
        steps = sp.max_steps * max(1, sp.slots)
        total += steps * sp.dim * 4 + sp.max_steps * 5 + steps
    return total


def from_budget(store: FeatureStore, features: Sequence[str], budget_bytes: int, **kw: Any) -> StreamConfig:
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
Columns = dict[str, np.ndarray]  # name -> (n, ...) array, one row per streamed unit


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


def _columns(block: dict[str, FeatureBatch]) -> Columns:
    """Every field of every feature as one flat column dict ('feature/field', 'feature/extra:name')."""
    out = {}
    for f, b in block.items():
        out.update({f"{f}/{name}": getattr(b, name) for name in _FIELDS if getattr(b, name) is not None})
        out.update({f"{f}/extra:{e}": v for e, v in b.extras.items()})
    return out


def _batches_of(cols: Columns) -> dict[str, FeatureBatch]:
    """Inverse of `_columns`."""
    per: dict[str, dict[str, np.ndarray]] = {}
    for key, v in cols.items():
        f, name = key.split("/", 1)
        per.setdefault(f, {})[name] = v
    return {f: FeatureBatch(**{n: c.get(n) for n in _FIELDS},
                            extras={n[6:]: v for n, v in c.items() if n.startswith("extra:")})
            for f, c in per.items()}


class _Buffer:
    """Fixed-capacity shuffle buffer: one preallocated array per column.

    Rows leave by `pop(pos, incoming)`: each column is gathered once at `pos` (contiguous results, so batches cut
    from them are contiguous views that torch.from_numpy takes as they are) and the incoming rows are written
    straight into the holes (each row is copied in once and out once); holes left over take the tail rows.
    """

    def __init__(self, capacity: int) -> None:
        self.cap, self.n = capacity, 0
        self.data: Columns = {}

    def add(self, cols: Columns) -> None:
        """Append the rows of `cols` (room for them is the caller's to ensure)."""
        if not self.data:
            for name, v in cols.items():
                if v.dtype.hasobject:
                    raise TypeError(f"BlockStream: column '{name}' has object dtype; only numeric fields stream")
                self.data[name] = np.empty((self.cap, *v.shape[1:]), dtype=v.dtype)
        k = len(next(iter(cols.values())))
        for name, v in cols.items():
            self.data[name][self.n:self.n + k] = v
        self.n += k

    def pop(self, pos: np.ndarray, incoming: Columns | None = None) -> Columns:
        """Remove the rows at `pos` (unique) and return them; `incoming` rows (at most len(pos)) take their
        places, and the last rows move into the holes that remain."""
        out = {name: col[pos] for name, col in self.data.items()}
        k = 0 if incoming is None else len(next(iter(incoming.values())))
        if k:
            for name, v in incoming.items():  # type: ignore[union-attr]
                self.data[name][pos[:k]] = v
        pos = pos[k:]
        tail = self.n - len(pos)
        taken = np.zeros(len(pos), dtype=bool)
        taken[pos[pos >= tail] - tail] = True
        holes = pos[pos < tail]
        if len(holes):
            src = tail + np.flatnonzero(~taken)
            for col in self.data.values():
                col[holes] = col[src]
        self.n = tail
        return out


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` unless the consumer has stopped; False when it has."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _read_ahead(read: Callable[[int], Columns], order: list[int], cfg: StreamConfig, out: queue.Queue,
                stop: threading.Event) -> None:
    """Read blocks `order` with `workers` threads, at most `prefetch` ahead of the consumer; errors go to `out`."""
    with ThreadPoolExecutor(cfg.workers) as pool:
        futs = [pool.submit(read, i) for i in order[:cfg.prefetch]]
        nxt = len(futs)
        for k in range(len(order)):
            try:
                got = futs[k].result()
            except Exception as e:  # hand the error to the consumer
                _put(out, e, stop)
                return
            futs[k] = None  # type: ignore[call-overload]  # drop the reference: memory stays bounded
            if not _put(out, got, stop):
                return
            del got
            if nxt < len(order):
                futs.append(pool.submit(read, order[nxt]))
                nxt += 1
    _put(out, None, stop)


def _rows(cols: Columns, lo: int, hi: int) -> Columns:
    return {k: v[lo:hi] for k, v in cols.items()}


def shuffled(read: Callable[[int], Columns], order: list[int], block_max: int, cfg: StreamConfig,
             rng: np.random.Generator) -> Iterator[Columns]:
    """Batches of `cfg.batch_size` rows (the last one smaller) of blocks read in `order` in the background,
    drawn at random from a buffer of max(`cfg.buffer_rows`, batch size) rows: once it is full, every batch's
    rows are drawn from it and the next rows of the block at hand (of <= `block_max` rows) take their places."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    t = threading.Thread(target=_read_ahead, args=(read, order, cfg, q, stop), daemon=True)
    t.start()
    bs = cfg.batch_size
    fill = max(cfg.buffer_rows, bs)  # at least a batch, so every batch but the epoch's last is whole
    buf, done = _Buffer(fill), False
    block: Columns = {}
    at = left = 0  # next row of `block`, rows of it not in the buffer yet
    # rows leave the buffer `per` at a time (one gather per column), cut into batches (views): a few batches at
    # once when rows are small (per-call costs), one batch when they are big (memory: the gather is `per` rows)
    per = bs * max(1, min(block_max, cfg.buffer_rows // 8) // bs)
    try:
        while True:
            if not left and not done:  # the next block
                got = q.get()
                if isinstance(got, Exception):
                    raise got
                done = got is None
                block, at = ({}, 0) if got is None else (got, 0)
                left = 0 if got is None else len(next(iter(got.values())))
                del got
            if left and buf.n < fill:  # filling (the epoch's start, or after a short exchange)
                k = min(left, fill - buf.n)
                buf.add(_rows(block, at, at + k))
                at, left = at + k, left - k
                continue
            if not buf.n:
                break
            take = min(per, buf.n)
            if not done:  # whole batches only until the last one of the epoch
                take = max(min(bs, buf.n), take // bs * bs)
            k = min(take, left)
            rows = buf.pop(rng.choice(buf.n, size=take, replace=False), _rows(block, at, at + k) if k else None)
            at, left = at + k, left - k
            if not left:
                block = {}  # drop the read block: memory stays bounded
            for lo in range(0, take, bs):
                yield {k: v[lo:lo + bs] for k, v in rows.items()}
    finally:  # also when the consumer stops early: the reader ends after its reads in flight
        stop.set()
        t.join()


class BlockStream:
    """Batches (feature -> FeatureBatch) over `rows` of `features`, read block by block in the background."""

    def __init__(self, store: FeatureStore, features: Sequence[str], rows: np.ndarray, cfg: StreamConfig) -> None:
        self.store, self.features, self.cfg = store, list(features), cfg
        rows = np.asarray(rows, dtype=np.int64).ravel()
        self.rows = rows if len(rows) < 2 or bool(np.all(rows[1:] > rows[:-1])) else np.unique(rows)  # sorted: as is
        block = cfg.block_rows or max(store.shard_rows(f) for f in features)
        keys = self.rows // block
        cuts = np.flatnonzero(np.diff(keys)) + 1
        self.blocks = np.split(self.rows, cuts) if len(self.rows) else []

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.cfg.batch_size)

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
        block_max = max((len(b) for b in self.blocks), default=0)
        for cols in shuffled(self._read, order, block_max, self.cfg, rng):
            yield _batches_of(cols)

    def _read(self, i: int) -> Columns:
        return _columns(self.store.read_many(self.features, self.blocks[i]))
