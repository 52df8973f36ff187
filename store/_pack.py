"""Packing staged rows into the sharded arrays of a v2 store (design.md §1, "Crash-safe shard commits").

One process packs a shard at a time (per-shard lock). A pack claims the shard's staging (local segments stay
flocked: no append slips in until they are deleted), reads the shard's packed rows (when it has any), overlays
the staged blocks oldest first, writes every array's shard (one whole-shard object each, `status` last) and
only then deletes what it claimed (store/_staging.py `Claim.consume`). A crash at any point leaves either the
old shard plus the staged blocks, or the new shard plus (some of) the same blocks, which a marker then excludes:
re-packing gives the same result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from store._shard_io import shard_layout
from store._staging import Claim, Staged
from store._zarr_io import _gather, _get
from store.schema import Status, StoreError

PACK_LOCK_STALE_S = 900.0  # a shard pack takes seconds: an older pack lock was left by a dead process (any host)

if TYPE_CHECKING:
    from store.zarr_store import FeatureStore


def is_data(name: str) -> bool:
    """Per-step data arrays (values, slot_mask, extras): their inner chunks must exist for an OK row."""
    return name in ("values", "slot_mask") or name.startswith("extra_")


def _fill_block(a: Any, n: int, staged: np.ndarray) -> np.ndarray:
    """n rows of an array's fill value (strings as objects); rows flagged in `staged` are left for the overlay."""
    if a.dtype.kind in "OTU":
        return np.full((n, *a.shape[1:]), "", dtype=object)
    if staged.all():  # every row comes from staged blocks: no fill pass over the (large) values
        return np.empty((n, *a.shape[1:]), dtype=a.dtype)
    out = np.empty((n, *a.shape[1:]), dtype=a.dtype)
    out[~staged] = a.fill_value
    return out


def _base(arrays: dict[str, Any], lo: int, hi: int, entries: list[Staged]) -> dict[str, np.ndarray]:
    """Rows lo:hi as packed now: read when the shard has finished rows, fill values otherwise."""
    if not np.asarray(arrays["status"][lo:hi]).any():
        staged = np.zeros(hi - lo, bool)
        for e in entries:
            staged[max(e.start, lo) - lo:min(e.stop, hi) - lo] = True
        return {k: _fill_block(a, hi - lo, staged) for k, a in arrays.items()}
    names = list(arrays)
    got = sync(_gather([_get(arrays[k], slice(lo, hi)) for k in names]))
    return {k: (np.asarray(v, dtype=object) if arrays[k].dtype.kind in "OTU" else np.array(v))
            for k, v in zip(names, got)}


def _apply(base: dict[str, np.ndarray], lo: int, entry: Staged, block: dict[str, np.ndarray], url: str) -> None:
    if set(block) != set(base):
        raise StoreError(f"{url}: staged object {entry.key} holds arrays {sorted(block)}, expected {sorted(base)}; "
                         "delete it (its rows become PENDING) and re-run extraction")
    for k, v in block.items():
        dst = base[k][entry.start - lo:entry.stop - lo]
        if v.shape != dst.shape:
            raise StoreError(f"{url}: staged object {entry.key} array '{k}' has shape {v.shape}, expected "
                             f"{dst.shape}; delete it and re-run extraction")
        dst[...] = v.astype(object) if base[k].dtype == object else v


def pack_shard(fs: "FeatureStore", feature: str, shard: int) -> bool:
    """Pack one shard of `feature` if no other process is packing it; True when this call packed it."""
    lock = fs._lock(f"pack-{feature}-{shard}", "shard pack", stale_after=PACK_LOCK_STALE_S)
    if not lock.try_acquire():
        return False
    try:
        with fs._staging.claim(feature, shard) as claim:
            return _pack_claimed(fs, feature, shard, claim)
    finally:
        lock.release()


def _pack_claimed(fs: "FeatureStore", feature: str, shard: int, claim: Claim) -> bool:
    """Commit the claimed staged blocks into the shard, then delete them."""
    entries = claim.entries
    if not entries:
        claim.consume()  # leftovers only (a crashed pack's marker, a dead writer's empty segment)
        return False
    arrays = fs._open_arrays(feature)
    s, total = fs._shard_rows[feature], arrays["status"].shape[0]
    lo, hi = shard * s, min((shard + 1) * s, total)
    if any(e.start < lo or e.stop > hi for e in entries):
        raise StoreError(f"{fs.url}: staged rows of '{feature}' shard {shard} fall outside rows {lo}:{hi}; "
                         "the store was changed by another tool; delete .tvr/staging and re-run extraction")
    base = _base(arrays, lo, hi, entries)
    blocks = claim.read(entries)
    for e, b in zip(entries, blocks):
        if not b:  # claimed blocks cannot vanish unless something deletes staging without the pack lock
            raise StoreError(f"{fs.url}: staged block {e.key} vanished while '{feature}' shard {shard} was being "
                             "packed; is another tool clearing .tvr/staging? Re-run pack_ready")
        _apply(base, lo, e, b, fs.url)
    pending = base["status"] == Status.PENDING
    if base["values"].dtype.kind == "f":
        base["values"][pending] = np.nan  # fill value: a PENDING row never looks like data
    sel = slice(lo, hi)
    # every inner chunk of data whose fill value is also a valid value (uint8 pixels, extras, slot masks) is
    # stored, so an OK row's chunk missing from the shard index always means lost data (store/_read.py)
    full = {k for k in base if is_data(k) and not (k == "values" and base[k].dtype.kind == "f")}
    done = {"status"}
    if (base["status"] == Status.OK).all():
        # no float values chunk can be all NaN (the fill value): skip zarr's per-chunk fill comparison (a NaN-aware
        # array_equal over every byte); the stored shard is the same. Raw values go out as one object.
        full.add("values")
        if _write_raw_shard(arrays["values"], shard, base["values"]):
            done.add("values")
    sync(_gather([(arrays[k].with_config({"write_empty_chunks": True}) if k in full else arrays[k])
                  .async_array.setitem(sel, v) for k, v in base.items() if k not in done]))
    sync(arrays["status"].async_array.setitem(sel, base["status"]))  # the commit point of the shard
    claim.consume()
    return True


def _write_raw_shard(a: zarr.Array, shard: int, values: np.ndarray) -> bool:
    """Store shard `shard` of an uncompressed row-sharded array in one write, every inner chunk present; False
    when `a` has another layout (zarr writes it then).

    The rows' bytes are the inner chunks in order, then (or before) the index: the shard zarr itself writes with
    write_empty_chunks (and store/_shard_io.py reads), without zarr's per-chunk encode and concatenation copies
    (most of a pack's time). A last, partial inner chunk is padded with the fill value; chunks past the array's
    end are absent, as zarr leaves them.
    """
    lay = shard_layout(a)
    if lay is None or lay.zstd:
        return False
    c = lay.inner_rows
    n = -(-len(values) // c)
    data = np.ascontiguousarray(values, dtype=lay.dtype)
    if n * c != len(data):
        data = np.concatenate([data, np.full((n * c - len(data), *lay.trail), lay.fill, dtype=lay.dtype)])
    size = data.nbytes // n if n else 0
    index = np.full((lay.chunks_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")  # 2^64-1: absent chunk
    index[:n, 0] = (0 if lay.index_at_end else lay.index_bytes) + np.arange(n, dtype=np.uint64) * size
    index[:n, 1] = size
    ix = index.tobytes()
    ix += np.uint32(google_crc32c.value(ix)).tobytes() if lay.index_crc else b""
    body = data.reshape(-1).view(np.uint8)
    head, tail = (body, np.frombuffer(ix, np.uint8)) if lay.index_at_end else (np.frombuffer(ix, np.uint8), body)
    blob = default_buffer_prototype().buffer.from_array_like(np.concatenate([head, tail]))
    sync(a.store_path.store.set(lay.key(shard), blob))
    return True


def effective_status(fs: "FeatureStore", feature: str, packed: np.ndarray, lo: int,
                     entries: list[Staged]) -> np.ndarray:
    """Packed status of rows lo:lo+len(packed) with staged objects applied, oldest first."""
    out = np.array(packed, dtype=np.uint8)
    mixed = [e for e in entries if e.code < 0]
    blocks = dict(zip((e.key for e in mixed), fs._staging.read(mixed))) if mixed else {}
    for e in entries:
        a, b = max(e.start, lo), min(e.stop, lo + len(out))
        if a >= b:
            continue
        if e.code >= 0:
            out[a - lo:b - lo] = e.code
        elif blocks.get(e.key):
            out[a - lo:b - lo] = blocks[e.key]["status"][a - e.start:b - e.start]
    return out


def pack_ready(fs: "FeatureStore", feature: str | None = None, partial: bool = False) -> int:
    """Pack every shard whose rows are all final (or, with `partial`, every shard with staged rows)."""
    fs._require_write()
    names = [feature] if feature is not None else fs.features
    packed = 0
    for f in names:
        fs._check_feature(f)
        if fs._staging is None or not fs._shard_rows.get(f):
            continue
        s = fs._shard_rows[f]
        by_shard = fs._staging.by_shard(f)  # [] for a folder of leftovers: a pack of it just cleans up
        status = fs._arrays[f]["status"]
        for shard, entries in sorted(by_shard.items()):
            if not partial:
                lo, hi = shard * s, min((shard + 1) * s, status.shape[0])
                st = effective_status(fs, f, np.asarray(status[lo:hi]), lo, entries)
                if (st == Status.PENDING).any():
                    continue
            packed += pack_shard(fs, f, shard)
    return packed
