"""Store maintenance behind `tvr-store`: layout and disk usage, `verify` (integrity), `compact` (v1 -> v2).

Disk usage counts files per array folder (a v2 array holds one file per shard), never one listing per row.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
from zarr.core.sync import sync

from store._choices import CHOICES_ATTR
from store._create import StoreExistsError, is_local
from store._read import PRESENT
from store.schema import Status, StoreError
from store.zarr_store import STORE_ID_ATTR, FeatureStore

_MAX_CODE = max(int(s) for s in Status)


def _tree_usage(path: Path) -> tuple[int, int]:
    """(files, bytes) below a local folder, one scandir per folder."""
    files = size = 0
    stack = [path]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    files += 1
                    size += e.stat(follow_symlinks=False).st_size
    return files, size


def _usage(store: FeatureStore, prefix: str) -> tuple[int, int] | None:
    """(files or objects, bytes) under a key prefix of the store; None when the backend cannot tell."""
    if store._local_root is not None:
        return _tree_usage(store._local_root / prefix)
    fs, base = getattr(store._g.store, "fs", None), getattr(store._g.store, "path", None)
    if fs is None or base is None:
        return None
    path = f"{base.rstrip('/')}/{prefix}"
    # zarr's async filesystem lives on zarr's event loop: call its coroutine there
    found = sync(fs._find(path, detail=True)) if getattr(fs, "async_impl", False) else fs.find(path, detail=True)
    return len(found), int(sum(int(v.get("size") or 0) for v in found.values()))


def layout_info(store: FeatureStore) -> dict[str, Any]:
    """Per feature: layout, rows per shard, files and bytes on disk, staged objects; plus store totals."""
    feats: dict[str, Any] = {}
    total_files = total_bytes = 0
    for name in store.features:
        s = store._shard_rows.get(name, 0)
        use = _usage(store, name)
        staged = store.staged_count(name)
        files, size = use if use is not None else (None, None)
        feats[name] = {"layout": "sharded" if s else "row-chunked", "shard_rows": s or store.spec(name).chunk_rows,
                       "files": files, "bytes": size, "staged": staged}
        total_files += files or 0
        total_bytes += size or 0
    root = [_usage(store, n) for n in ("item_id", "item_path", "item_kind", "item_split", "item_duration",
                                        "caption_id", "caption_item", "caption_text")]
    total_files += sum(u[0] for u in root if u)
    total_bytes += sum(u[1] for u in root if u)
    per_item = total_files / max(1, store.n_items) / max(1, len(feats)) if feats else 0.0
    return {"schema": store.version, "features": feats, "files": total_files, "bytes": total_bytes,
            "files_per_item_per_feature": per_item}


def layout_table(info: dict[str, Any]) -> str:
    """Text table of `layout_info`."""
    head = f"{'feature':<16} {'layout':<12} {'shard rows':>10} {'files':>8} {'MiB':>10} {'staged':>7}"
    lines = [head, "-" * len(head)]
    for name, d in info["features"].items():
        mib = "?" if d["bytes"] is None else f"{d['bytes'] / 2**20:.1f}"
        lines.append(f"{name:<16} {d['layout']:<12} {d['shard_rows']:>10} {d['files'] if d['files'] is not None else '?':>8} "
                     f"{mib:>10} {d['staged']:>7}")
    lines.append(f"schema v{info['schema']}: {info['files']} files, {info['bytes'] / 2**20:.1f} MiB, "
                 f"{info['files_per_item_per_feature']:.4f} files per item per feature")
    return "\n".join(lines)


# ---- verify ----
@dataclass
class FeatureReport:
    """What `verify` found in one feature."""

    invalid_status: list[int] = field(default_factory=list)  # rows with a status byte outside Status
    lost: list[int] = field(default_factory=list)  # OK rows whose data is missing
    damaged: list[str] = field(default_factory=list)  # row ranges whose chunks/shards cannot be decoded

    @property
    def ok(self) -> bool:
        return not (self.invalid_status or self.lost or self.damaged)


def _block_status(store: FeatureStore, name: str, lo: int, hi: int, rep: FeatureReport) -> np.ndarray:
    from store._pack import effective_status

    a = store._arrays[name]["status"]
    try:
        packed = np.asarray(a[lo:hi], dtype=np.uint8)
    except Exception as e:
        rep.damaged.append(f"rows {lo}:{hi} status ({type(e).__name__}: {e})")
        packed = np.zeros(hi - lo, np.uint8)
    entries = [e for e in (store._staging.list(name) if store._staging else []) if e.start < hi and e.stop > lo]
    return effective_status(store, name, packed, lo, entries) if entries else packed


def verify(store: FeatureStore) -> dict[str, FeatureReport]:
    """Check every feature, one shard-sized block at a time: valid status codes, data present for OK rows."""
    out = {}
    for name in store.features:
        rep, total = FeatureReport(), store.n_rows(name)
        block = store._shard_rows.get(name) or 4096
        for lo in range(0, total, block):
            hi = min(total, lo + block)
            st = _block_status(store, name, lo, hi, rep)
            rep.invalid_status += (lo + np.flatnonzero(st > _MAX_CODE)).tolist()
            ok = np.flatnonzero(st == Status.OK)
            if not len(ok):
                continue
            idx = lo + ok
            try:
                got = store._read_rows(name, idx, idx, ["values", "mask"])
            except StoreError as e:
                rep.damaged.append(f"rows {lo}:{hi} data ({e})")
                continue
            vals = np.asarray(got["values"], dtype=np.float32).reshape(len(idx), -1)
            lost = ~np.asarray(got["mask"], bool).any(axis=1)
            if store.version >= 2:
                lost |= np.isnan(vals).any(axis=1)
            if PRESENT in got:  # the values chunk is absent from its shard's index (any dtype: uint8 has no NaN)
                lost |= ~np.asarray(got[PRESENT], bool)
            rep.lost += idx[lost].tolist()
        out[name] = rep
    return out


def repair(store: FeatureStore, reports: dict[str, FeatureReport]) -> int:
    """Reset bad rows to PENDING (staged, then packed) so extraction redoes them; returns rows reset."""
    n = 0
    for name, rep in reports.items():
        for lo_hi in rep.damaged:  # an undecodable status shard (tvr's own file): without it its rows are PENDING
            if " status " in lo_hi:
                lo, hi = (int(x) for x in lo_hi.split()[1].split(":"))
                a = store._arrays[name]["status"]
                shard = lo // (a.shards or a.chunks)[0]
                sync(a.store_path.store.delete(f"{a.path}/{a.metadata.encode_chunk_key((shard,))}"))
                n += hi - lo
        # reset_rows widens caption rows to whole blocks (one writer per block) and stages them like a write
        n += store.reset_rows(name, sorted(set(rep.invalid_status) | set(rep.lost)))
    store.pack_ready(partial=True)
    return n


# ---- compact ----
def _copy_feature(src: FeatureStore, dst: FeatureStore, name: str) -> None:
    s_arr, d_arr = src._arrays[name], dst._open_arrays(name)
    step = dst._shard_rows[name]
    for lo in range(0, src.n_rows(name), step):
        hi = min(src.n_rows(name), lo + step)
        block = {k: a[lo:hi] for k, a in s_arr.items()}
        pending = np.asarray(block["status"]) == Status.PENDING
        if np.asarray(block["values"]).dtype.kind == "f":
            block["values"] = np.array(block["values"])
            block["values"][pending] = np.nan  # v2 fill: a PENDING row never looks like data
        for k, v in block.items():
            if k != "status":
                d_arr[k][lo:hi] = v
        d_arr["status"][lo:hi] = block["status"]


def _same(a: Any, b: Any) -> bool:
    """Equal arrays (NaN == NaN for floats), or both None."""
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def _check_equal(src: FeatureStore, dst: FeatureStore) -> None:
    for col in ("id", "path", "kind", "split"):
        if not np.array_equal(getattr(src.items(), col), getattr(dst.items(), col)):
            raise StoreError(f"compact: item column '{col}' differs after copying")
    if not np.array_equal(src.items().duration, dst.items().duration, equal_nan=True):
        raise StoreError("compact: item durations differ after copying")
    sc, dc = src.captions(), dst.captions()
    if not (np.array_equal(sc.id, dc.id) and np.array_equal(sc.item, dc.item) and np.array_equal(sc.text, dc.text)):
        raise StoreError("compact: the caption table differs after copying")
    a, b = src.choices(), dst.choices()
    if (a is None) != (b is None) or (a is not None and b is not None and not all(
            np.array_equal(getattr(a, k), getattr(b, k)) for k in ("items", "captions", "answer"))):
        raise StoreError("compact: the multiple-choice set differs after copying")
    for name in src.features:
        if src.spec(name) != dst.spec(name) or src.provenance(name) != dst.provenance(name):
            raise StoreError(f"compact: feature '{name}' spec or provenance differs after copying")
        st = src.status(name)
        if not np.array_equal(st, dst.status(name)) or not np.array_equal(src.reasons(name, st),
                                                                         dst.reasons(name, st)):
            raise StoreError(f"compact: feature '{name}' status or reasons differ after copying")
        step = dst._shard_rows[name]
        for lo in range(0, src.n_rows(name), step):
            rows = np.arange(lo, min(src.n_rows(name), lo + step))
            a, b = src.read(name, rows), dst.read(name, rows)
            same = all(_same(getattr(a, k), getattr(b, k)) for k in ("values", "mask", "time", "status", "slot_mask"))
            same &= all(_same(a.extras[k], b.extras[k]) for k in a.extras)
            same &= np.array_equal(src.messages(name, rows), dst.messages(name, rows))
            if not same:
                raise StoreError(f"compact: feature '{name}' rows {lo}:{rows[-1] + 1} differ after copying")


def _build_copy(src: FeatureStore, where: str, keep_id: bool) -> None:
    opts = src.storage_options
    dst = FeatureStore.create(where, _item_records(src), _caption_records(src), storage_options=opts)
    for name in src.features:
        dst._create_feature(src.spec(name), src.provenance(name), keep_provenance=True)
    extra = {k: v for k, v in src._g.attrs.asdict().items()
             if k not in ("tvr_store", "tvr_layout", CHOICES_ATTR) and (keep_id or k != STORE_ID_ATTR)}
    dst._g.attrs.update(extra)
    mc = src.choices()
    if mc is not None:  # rows are the same in the copy; the set's arrays are written anew
        dst.set_choice_rows(mc)
    for name in src.features:
        _copy_feature(src, dst, name)
    _check_equal(src, FeatureStore.open(where, storage_options=opts))


def _item_records(src: FeatureStore) -> list[Any]:
    from store.schema import ItemRecord

    t = src.items()
    return [ItemRecord(str(i), str(p), str(k), float(d), str(s))
            for i, p, k, d, s in zip(t.id, t.path, t.kind, t.duration, t.split)]


def _caption_records(src: FeatureStore) -> list[Any]:
    from store.schema import CaptionRecord

    c, ids = src.captions(), src.items().id
    return [CaptionRecord(str(i), str(ids[r]), str(t)) for i, r, t in zip(c.id, c.item, c.text)]


def compact(src_url: str, dst_url: str | None = None,
            storage_options: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """Copy a store (v1 or v2) into a new sharded v2 store and check equality; returns (dst, kept v1 copy).

    Without `dst_url` the conversion is in place: the new store is built and checked in a marked temp folder,
    then the original is renamed to `<src>.v1-<time>` (kept, never deleted) and the new one takes its name.
    `storage_options` (fsspec) apply to both stores.
    """
    src = FeatureStore.open(src_url, storage_options=storage_options)
    if any(src.staged_count(f) for f in src.features):
        raise StoreError(f"compact: {src_url} has staged rows; pack them first (FeatureStore.open(url, 'r+')"
                         ".pack_ready(partial=True)) or finish the extraction run")
    if dst_url is not None:
        if not is_local(dst_url) or not Path(dst_url).exists():
            _build_copy(src, dst_url, keep_id=False)
            return dst_url, None
        raise StoreExistsError(f"compact: {dst_url} already exists; pick a new destination")
    if not is_local(src_url):
        raise StoreError("compact: in-place compaction needs a local store; give a DST URL for object stores")
    target = Path(src_url)
    tmp = target.with_name(f"{target.name}.compact-{os.getpid()}")
    try:
        _build_copy(src, str(tmp), keep_id=True)
    except BaseException:
        if (tmp / "zarr.json").exists() and json.loads((tmp / "zarr.json").read_text()).get(
                "attributes", {}).get(STORE_ID_ATTR) == src.store_id:
            shutil.rmtree(tmp)  # the copy this call made (it carries the source's store id), never anything else
        raise
    kept = target.with_name(f"{target.name}.v{src.version}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(target, kept)
    os.rename(tmp, target)
    return str(target), str(kept)


__all__ = ["FeatureReport", "compact", "layout_info", "layout_table", "repair", "verify"]
