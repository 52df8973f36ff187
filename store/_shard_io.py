"""Bulk reads of Zarr v3 sharded arrays: whole shards (or their needed byte ranges) in one request each.

zarr-python fetches and decodes every inner chunk of a shard separately (~0.5 ms each), which caps streaming
reads far below disk speed. For the layouts tvr writes (shards and inner chunks split only the row axis; inner
codecs `bytes` [+ `zstd`]; index `bytes` [+ `crc32c`]) this module fetches each shard's bytes in one request,
parses the shard index (Zarr v3 sharding spec: per inner chunk (offset, nbytes) uint64 pairs, 2^64-1 for an
absent chunk, checksum checked when the index codecs declare crc32c) and decodes the inner chunks in bulk in the
calling thread. Absent chunks and shards read as the array's fill value, exactly as zarr reads them, so the
store's integrity checks (NaN fill / empty mask of an OK row is an error) still see them. Any other layout
returns None from `shard_layout` and the caller uses zarr.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Zstd
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

_ABSENT = np.uint64(2**64 - 1)
_ABSENT_INT = 2**64 - 1
_ZSTD = Zstd()


@dataclass(frozen=True)
class ShardLayout:
    """What a bulk read needs to know about one sharded array."""

    array: zarr.Array
    shard_rows: int
    inner_rows: int
    trail: tuple[int, ...]
    dtype: np.dtype
    fill: Any
    zstd: bool
    index_at_end: bool
    index_crc: bool

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.inner_rows

    @property
    def index_bytes(self) -> int:
        return self.chunks_per_shard * 16 + (4 if self.index_crc else 0)

    def key(self, shard: int) -> str:
        """Store key of shard number `shard` (row shards only)."""
        a = self.array
        ck = a.metadata.encode_chunk_key((shard,) + (0,) * len(self.trail))
        return f"{a.store_path.path}/{ck}" if a.store_path.path else ck


def _little(c: Any) -> bool:
    return isinstance(c, BytesCodec) and (c.endian is None or c.endian.value == "little")


def shard_layout(a: zarr.Array) -> ShardLayout | None:
    """The bulk-readable layout of `a`, or None when it is not one this module decodes (zarr reads it)."""
    meta = a.metadata
    if meta.zarr_format != 3 or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    sc: ShardingCodec = meta.codecs[0]
    shard, inner = tuple(meta.chunk_grid.chunk_shape), tuple(sc.chunk_shape)
    trail = tuple(a.shape[1:])
    if a.dtype.kind not in "biuf" or shard[1:] != trail or inner[1:] != trail or shard[0] % inner[0]:
        return None
    codecs = list(sc.codecs)
    zstd = len(codecs) == 2 and isinstance(codecs[1], ZstdCodec)
    if not codecs or not _little(codecs[0]) or len(codecs) > 2 or (len(codecs) == 2 and not zstd):
        return None
    idx = list(sc.index_codecs)
    crc = len(idx) == 2 and isinstance(idx[1], Crc32cCodec)
    if not idx or not _little(idx[0]) or len(idx) > 2 or (len(idx) == 2 and not crc):
        return None
    fill = np.array(meta.fill_value, dtype=a.dtype)
    return ShardLayout(a, shard[0], inner[0], trail, a.dtype.newbyteorder("<"), fill, zstd,
                       sc.index_location.value == "end", crc)


@dataclass
class _Shard:
    """Raw bytes of one shard: its parsed index and the byte pieces holding the needed chunks."""

    index: np.ndarray | None  # (chunks_per_shard, 2) offsets, nbytes; None = the shard does not exist
    pieces: list[tuple[int, Any]]  # (byte offset of the piece in the shard object, uint8 array)


def _parse_index(lay: ShardLayout, raw: np.ndarray, key: str) -> np.ndarray:
    """(chunks, 2) uint64 index from its encoded bytes, checksum checked."""
    if len(raw) != lay.index_bytes:
        raise ValueError(f"shard '{key}': index is {len(raw)} bytes, expected {lay.index_bytes} (truncated shard)")
    body = raw[:lay.chunks_per_shard * 16]
    if lay.index_crc:
        want = np.uint32(google_crc32c.value(body.tobytes())).tobytes()
        if bytes(raw[-4:]) != want:
            raise ValueError(f"shard '{key}': index checksum mismatch (damaged shard file)")
    return body.view("<u8").reshape(-1, 2)


async def _get(store: Any, key: str, req: Any = None) -> np.ndarray | None:
    buf = await store.get(key, prototype=default_buffer_prototype(), byte_range=req)
    return None if buf is None else buf.as_numpy_array()


def _get_local(root: str, key: str, req: Any = None, files: dict[str, Any] | None = None) -> np.ndarray | None:
    """A LocalStore get done directly in the calling thread (no event-loop and worker-thread hops per request),
    read into a writable array (so an uncompressed chunk can be used in place); `files` keeps each shard file
    open across the requests of one fetch (index, then data: one open)."""
    f = None if files is None else files.get(key)
    if f is None:
        try:
            f = open(f"{root}/{key}", "rb", buffering=0)
        except FileNotFoundError:
            return None
        if files is not None:
            files[key] = f
    size = os.fstat(f.fileno()).st_size
    if isinstance(req, SuffixByteRequest):
        start = max(0, size - req.suffix)
    elif isinstance(req, RangeByteRequest):
        start, size = req.start, min(size, req.end)
    else:
        start = 0
    buf = np.empty(max(0, size - start), dtype=np.uint8)
    f.seek(start)
    got, view = 0, memoryview(buf)
    while got < len(buf):  # raw reads may return short
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    if files is None:
        f.close()
    return buf[:got]


_Reqs = list[tuple[str, Any]]


def _shard_steps(lay: ShardLayout, shard: int, local: np.ndarray) -> Generator[_Reqs, list[Any], _Shard]:
    """What shard `shard` holds of inner chunks `local` (sorted): yields batches of (key, byte range) requests
    and receives their bytes; the whole object in one request when most of it is needed."""
    key = lay.key(shard)
    n, ib = lay.chunks_per_shard, lay.index_bytes
    if 2 * len(local) >= n:  # most of the shard: one request for all of it
        (whole,) = yield [(key, None)]
        if whole is None:
            return _Shard(None, [])
        ix = whole[len(whole) - ib:] if lay.index_at_end else whole[:ib]
        return _Shard(_parse_index(lay, ix, key), [(0, whole)])
    (raw,) = yield [(key, SuffixByteRequest(ib) if lay.index_at_end else RangeByteRequest(0, ib))]
    if raw is None:
        return _Shard(None, [])
    index = _parse_index(lay, raw, key)
    ent = index[local]
    ent = ent[ent[:, 0] != _ABSENT]
    if not len(ent):
        return _Shard(index, [])
    lo, hi = int(ent[:, 0].min()), int((ent[:, 0] + ent[:, 1]).max())
    if hi - lo <= 2 * int(ent[:, 1].sum()) + (1 << 20):  # dense enough: one range for all of them
        (piece,) = yield [(key, RangeByteRequest(lo, hi))]
        return _Shard(index, [] if piece is None else [(lo, piece)])
    got = yield [(key, RangeByteRequest(int(o), int(o + b))) for o, b in ent]
    return _Shard(index, [(int(o), p) for (o, _), p in zip(ent, got) if p is not None])


def _groups(lay: ShardLayout, rows: np.ndarray) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """(sorted unique inner chunks covering `rows`, [(shard, its chunks' positions in the shard)])."""
    rows = np.asarray(rows, dtype=np.int64)
    c = lay.inner_rows
    if len(rows) and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)):
        chunks = np.arange(int(rows[0]) // c, int(rows[-1]) // c + 1)  # a contiguous range: no sort needed
    else:
        chunks = np.unique(rows // c)
    n = lay.chunks_per_shard
    groups = np.split(chunks, np.flatnonzero(np.diff(chunks // n)) + 1) if len(chunks) else []
    return chunks, [(int(g[0] // n), g % n) for g in groups]


async def fetch(lay: ShardLayout, rows: np.ndarray) -> tuple[np.ndarray, list[_Shard]]:
    """(sorted unique inner chunk numbers covering `rows`, their shards' raw bytes), through the zarr store."""
    chunks, groups = _groups(lay, rows)
    store = lay.array.store_path.store

    async def drive(gen: Generator[_Reqs, list[Any], _Shard]) -> _Shard:
        got: list[Any] | None = None
        try:
            while True:
                reqs = gen.send(got)  # type: ignore[arg-type]
                got = list(await asyncio.gather(*[_get(store, k, r) for k, r in reqs]))
        except StopIteration as stop:
            return stop.value

    return chunks, list(await asyncio.gather(*[drive(_shard_steps(lay, s, loc)) for s, loc in groups]))


def fetch_local(lay: ShardLayout, rows: np.ndarray) -> tuple[np.ndarray, list[_Shard]] | None:
    """`fetch` done with plain file reads in the calling thread for a local store; None for other stores."""
    store = lay.array.store_path.store
    if not isinstance(store, LocalStore):
        return None
    root = str(store.root)
    chunks, groups = _groups(lay, rows)
    out = []
    for s, loc in groups:
        gen, got, files = _shard_steps(lay, s, loc), None, {}
        try:
            while True:
                got = [_get_local(root, k, r, files) for k, r in gen.send(got)]  # type: ignore[arg-type]
        except StopIteration as stop:
            out.append(stop.value)
        finally:
            for f in files.values():
                f.close()
    return chunks, out


def _piece(sh: _Shard, off: int, nb: int) -> np.ndarray | None:
    for start, p in sh.pieces:
        if start <= off and off + nb <= start + len(p):
            return p[off - start:off - start + nb]
    return None


def _zstd_size(raw: np.ndarray) -> int | None:
    """Decoded size a zstd frame's header declares (None when the header does not say: decode to find out)."""
    if len(raw) < 6 or bytes(raw[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    fhd = int(raw[4])
    single, fcs = (fhd >> 5) & 1, fhd >> 6
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]  # after the window descriptor and dictionary id
    size = (1 if single else 0, 2, 4, 8)[fcs]
    if not size or len(raw) < at + size:
        return None
    v = int.from_bytes(bytes(raw[at:at + size]), "little")
    return v + 256 if size == 2 else v


def _decode_chunk(lay: ShardLayout, raw: np.ndarray, out: np.ndarray) -> int | None:
    """Decode one inner chunk's bytes into `out` (its rows, flat); the decoded size when it is wrong, else None."""
    want = out.nbytes
    if lay.zstd:
        got = _zstd_size(raw)
        if got == want:
            _ZSTD.decode(raw, out=out)  # straight into place: no decoded temporary to copy
            return None
        if got is None:  # no size in the frame header: decode to learn it
            data = _ZSTD.decode(raw)
            got = len(memoryview(data).cast("B"))
            raw = np.frombuffer(data, dtype=np.uint8)
    else:
        got = len(raw)
    if got != want:
        return got
    out[...] = raw.view(lay.dtype)
    return None


def decode(lay: ShardLayout, rows: np.ndarray, fetched: tuple[np.ndarray, list[_Shard]]) -> np.ndarray:
    """Rows `rows` (any order) of the array from `fetch`'s bytes; absent chunks read as the fill value."""
    chunks, shards = fetched
    c, n = lay.inner_rows, lay.chunks_per_shard
    per_chunk = c * int(np.prod(lay.trail, dtype=np.int64))
    cuts = (np.flatnonzero(np.diff(chunks // n)) + 1).tolist() if len(chunks) else []
    run = _raw_run(lay, shards[0], chunks - int(chunks[0]) // n * n, per_chunk) if len(shards) == 1 else None
    fetched_bytes = sum(len(p) for _, p in shards[0].pieces) if run is not None else 0
    if run is not None and run.flags.writeable and fetched_bytes <= run.nbytes * 5 // 4 + (1 << 16):
        # uncompressed, back to back in one piece not much bigger than them: used in place, no copy (the piece
        # stays alive as long as the rows do, hence the size limit)
        return _rows_of(lay, run.reshape(len(chunks) * c, *lay.trail), chunks, rows)
    blk = np.empty((len(chunks) * c, *lay.trail), dtype=lay.dtype)
    flat = blk.reshape(len(chunks), per_chunk)
    for sh, lo, hi in zip(shards, [0, *cuts], [*cuts, len(chunks)]):
        s = int(chunks[lo]) // n
        if sh.index is None:  # no shard file: all fill
            flat[lo:hi] = lay.fill
            continue
        run = _raw_run(lay, sh, chunks[lo:hi] - s * n, per_chunk)
        if run is not None:  # uncompressed chunks stored back to back: one copy
            flat[lo:hi] = run.reshape(hi - lo, per_chunk)
            continue
        for k, loc, (off, nb) in zip(range(lo, hi), (chunks[lo:hi] - s * n).tolist(),
                                     sh.index[chunks[lo:hi] - s * n].tolist()):
            if off == _ABSENT_INT:
                flat[k] = lay.fill
                continue
            raw = _piece(sh, off, nb)
            if raw is None:
                raise ValueError(f"shard '{lay.key(s)}': inner chunk {loc} at bytes {off}+{nb} lies outside the "
                                 "shard file (truncated shard)")
            bad = _decode_chunk(lay, raw, flat[k])
            if bad is not None:
                raise ValueError(f"shard '{lay.key(s)}': inner chunk {loc} decodes to {bad} bytes, expected "
                                 f"{flat[k].nbytes} (damaged shard file)")
    return _rows_of(lay, blk, chunks, rows)


def _raw_run(lay: ShardLayout, sh: _Shard, local: np.ndarray, per_chunk: int) -> np.ndarray | None:
    """The values of uncompressed inner chunks `local` (sorted) of a shard as one view of its fetched bytes when
    they lie back to back in one piece (the packed layout), else None (decode them one by one)."""
    if lay.zstd or sh.index is None or not len(local):
        return None
    ent = sh.index[local]
    want = per_chunk * lay.dtype.itemsize
    off0 = int(ent[0, 0])
    if off0 == _ABSENT_INT or not (bool(np.all(ent[:, 1] == want))
                                   and bool(np.all(ent[:, 0] == off0 + want * np.arange(len(local))))):
        return None
    raw = _piece(sh, off0, want * len(local))
    return None if raw is None else raw.view(lay.dtype)


def _rows_of(lay: ShardLayout, blk: np.ndarray, chunks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of `blk`, which holds inner chunks `chunks`: a view when they are contiguous, else a gather."""
    c = lay.inner_rows
    rows = np.asarray(rows, dtype=np.int64)
    first = int(chunks[0]) * c if len(chunks) else 0
    if len(rows) and len(rows) == int(rows[-1]) - int(rows[0]) + 1 and bool(np.all(np.diff(rows) == 1)):
        return blk[int(rows[0]) - first:int(rows[-1]) + 1 - first]  # contiguous: a view, no gather copy
    pos = np.searchsorted(chunks, rows // c) * c + rows % c
    return blk[pos]
