"""FeatureStore: the Zarr v3 store that extraction writes, training reads and notebooks inspect (design.md §1).

Layout and write protocol are in docs/design.md §1. Two consequences worth knowing:

* File count. Item features use one chunk per row so each item has exactly one writer; every array of a
  feature therefore holds one file per item. A store with N items and F features has roughly
  N * F * (6 + extras) small files (values, mask, time, status, reason, message, [slot_mask, extras]),
  e.g. 100k items x 7 features ~ 5M files. Rows whose chunk equals the fill value (ABSENT/FAILED rows, empty
  reasons) write no file. On file systems with inode quotas, copy the finished store into bigger chunks
  before training at scale.
* Status scans. `status(feature)` must look at N tiny chunks. Through zarr that costs ~0.15 ms per chunk;
  for local stores whose status array is uncompressed (how tvr creates it) the chunk files are read
  directly (~10x faster, see benchmarks/bench_store.py), falling back to zarr's batched read otherwise.

Strings (ids, paths, captions, reasons) are zarr 3 `str` arrays (vlen-utf8). xarray opens them as numpy
`StringDType` arrays and indexes them fine; this API returns them as object-dtype numpy arrays.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.sync import sync

from store._zarr_io import (
    _check_dims,
    _dtype_ok,
    _fast_status,
    _gather,
    _get,
    _get_json,
    _jsonable,
    _listdir,
    _looks_like_tvr,
    _never_written,
    _set_all,
)

from store.schema import (
    ROOT_ARRAYS,
    SCHEMA_VERSION,
    CaptionRecord,
    CaptionTable,
    FeatureBatch,
    FeatureRows,
    FeatureSpec,
    ItemRecord,
    ItemTable,
    Status,
    StoreError,
    codec_problem,
    feature_arrays,
    pad_row,
)

ROOT_CHUNK = 16384  # rows per chunk of the root tables (written by one process, read whole)
IDENTITY_KEYS = ("weights", "preset", "variant")  # provenance keys that must match to share a feature group
STORE_ID_ATTR = "tvr_store_id"  # uuid4 hex written at creation; old stores get one on their first r+ open
_META_FILES = {"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"}


def tvr_version() -> str:
    """Installed tvr version, for provenance."""
    try:
        from importlib.metadata import version

        return version("tvr")
    except Exception:
        return "0.1.0+unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_local(url: str | os.PathLike) -> bool:
    return isinstance(url, os.PathLike) or "://" not in str(url)


def _check_records(items: Sequence[ItemRecord], captions: Sequence[CaptionRecord],
                   known_items: Mapping[str, int], known_captions: set[str]) -> np.ndarray:
    """Validate new items/captions against each other and the store; return caption item rows."""
    rows = dict(known_items)
    for i, it in enumerate(items):
        if not isinstance(it, ItemRecord):
            raise StoreError(f"items[{i}] is {type(it).__name__}, expected store.ItemRecord")
        if it.id in rows:
            raise StoreError(f"duplicate item id {it.id!r} (items[{i}]); item ids must be unique in a store")
        rows[it.id] = len(rows)
    seen = set(known_captions)
    out = np.empty(len(captions), dtype=np.int64)
    for i, cap in enumerate(captions):
        if not isinstance(cap, CaptionRecord):
            raise StoreError(f"captions[{i}] is {type(cap).__name__}, expected store.CaptionRecord")
        if cap.id in seen:
            raise StoreError(f"duplicate caption id {cap.id!r} (captions[{i}]); caption ids must be unique")
        if cap.item not in rows:
            raise StoreError(f"caption {cap.id!r} refers to unknown item {cap.item!r}; add the item first")
        seen.add(cap.id)
        out[i] = rows[cap.item]
    return out


class FeatureStore:
    """A tvr feature store: item/caption tables at the root and one Zarr group per feature."""

    def __init__(self, group: zarr.Group, url: str, mode: str) -> None:
        self._g, self.url, self.mode = group, url, mode
        self._specs: dict[str, FeatureSpec] = {}
        self._arrays: dict[str, dict[str, zarr.Array]] = {}
        self._root: dict[str, zarr.Array] = {}
        self._id_rows: dict[str, int] | None = None

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, mode={self.mode!r}, items={self.n_items}, "
                f"captions={self.n_captions}, features={self.features})")

    # ---- opening and creating ----
    @classmethod
    def create(cls, url: str | os.PathLike, items: Sequence[ItemRecord], captions: Sequence[CaptionRecord] = (),
               *, overwrite: bool = False, storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """Create a store holding `items` and `captions`; refuses to replace anything but a tvr store."""
        items, captions = list(items), list(captions)
        cap_rows = _check_records(items, captions, {}, set())
        if _is_local(url):
            p = Path(url)
            if p.exists() and (p.is_file() or any(p.iterdir())):
                if not overwrite:
                    raise StoreError(f"{url} already exists; open it with FeatureStore.open, or pass overwrite=True")
                if not _looks_like_tvr(p):
                    raise StoreError(f"{url} exists and is not a tvr store; refusing to overwrite it "
                                     "(pick another path)")
        kw = {"storage_options": dict(storage_options)} if storage_options else {}
        try:
            g = zarr.open_group(str(url), mode="w" if overwrite else "w-", zarr_format=3, **kw)
        except Exception as e:  # zarr raises several types for an existing node
            raise StoreError(f"cannot create a store at {url}: {e}") from e
        for name, (dtype, dim, fill) in ROOT_ARRAYS.items():
            chunks = (ROOT_CHUNK,)
            g.create_array(name, shape=(0,), chunks=chunks, dtype=dtype, dimension_names=(dim,), fill_value=fill)
        self = cls(g, str(url), "r+")
        self._load_root()
        self._append_root(items, captions, cap_rows)
        # tvr attrs last: a crash before this line leaves something `open` rejects instead of a half store
        g.attrs.update({"tvr_store": SCHEMA_VERSION, "tvr_version": tvr_version(), "created": _now(),
                        STORE_ID_ATTR: uuid.uuid4().hex})
        return self

    @classmethod
    def open(cls, url: str | os.PathLike, mode: Literal["r", "r+"] = "r", *,
             storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open and validate an existing store; StoreError says what is wrong and how to fix it."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        hint = "create one with FeatureStore.create(...) or `tvr-extract`"
        if _is_local(url):
            p = Path(url)
            if not p.exists():
                raise StoreError(f"{url}: no tvr store here (the path does not exist); {hint}")
            if not p.is_dir() or not (p / "zarr.json").exists():
                kind = "a file" if not p.is_dir() else "a plain directory (no zarr.json)"
                raise StoreError(f"{url} is not a tvr store: it is {kind}; {hint}")
        kw = {"storage_options": dict(storage_options)} if storage_options else {}
        try:
            g = zarr.open_group(str(url), mode=mode, **kw)
        except Exception as e:
            raise StoreError(f"{url} is not a tvr store: cannot open a Zarr group there ({e}); {hint}") from e
        if g.metadata.zarr_format != 3:
            raise StoreError(f"{url} is a Zarr v2 store; tvr stores are Zarr v3, {hint}")
        self = cls(g, str(url), mode)
        self._validate()
        if mode == "r+" and not self._g.attrs.get(STORE_ID_ATTR):
            self._g.attrs.update({STORE_ID_ATTR: uuid.uuid4().hex})  # stores made before store ids existed
        return self

    def _validate(self) -> None:
        attrs, url = self._g.attrs.asdict(), self.url
        if "tvr_store" not in attrs:
            raise StoreError(f"{url} is a Zarr store but not a tvr store: root attribute 'tvr_store' is missing "
                             "(it was not created by tvr, or its creation was interrupted); recreate it")
        version = attrs["tvr_store"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StoreError(f"{url}: root attribute 'tvr_store' must be a positive int, got {version!r}")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{url}: store schema version {version} is newer than this tvr supports "
                             f"({SCHEMA_VERSION}); upgrade tvr to read it")
        self._scan_metadata()
        self._load_root()
        n, c = self.n_items, self.n_captions
        for name, (dtype, dim, _) in ROOT_ARRAYS.items():
            a = self._root[name]
            want = n if dim == "item" else c
            if a.shape != (want,):
                raise StoreError(f"{url}: root array '{name}' has shape {a.shape}, expected ({want},) "
                                 "(an interrupted add_items?); recreate the store")
        for key, node in self._g.members():
            if key in ROOT_ARRAYS:
                continue
            if not isinstance(node, zarr.Group):
                raise StoreError(f"{url}: unexpected array '{key}' at the root; tvr stores hold only "
                                 f"{sorted(ROOT_ARRAYS)} there")
            self._load_feature(key, node)

    def _scan_metadata(self) -> None:
        """Refuse pickle/object codecs and foreign nodes by reading raw metadata (zarr may not even parse them)."""
        store, base = self._g.store, self._g.path

        def walk(prefix: str, depth: int) -> None:
            for child in _listdir(store, prefix):
                if child in _META_FILES or child.startswith("."):
                    continue
                key = f"{prefix}/{child}" if prefix else child
                v3, v2 = _get_json(store, f"{key}/zarr.json"), _get_json(store, f"{key}/.zarray")
                meta = v3 if v3 is not None else v2
                if meta is None:
                    continue
                if v3 is not None and v3.get("node_type") == "group":
                    if depth == 0:
                        walk(key, 1)
                    continue
                problem = codec_problem(meta)
                if problem:
                    raise StoreError(f"{self.url}: array '{key}' {problem}; tvr refuses such stores. "
                                     "Remove that array or rebuild the store with tvr.")

        walk(base, 0)

    def _load_root(self) -> None:
        members = dict(self._g.arrays())
        missing = [k for k in ROOT_ARRAYS if k not in members]
        if missing:
            raise StoreError(f"{self.url}: required root arrays missing: {missing}; recreate the store")
        for name, (dtype, dim, _) in ROOT_ARRAYS.items():
            a = members[name]
            _check_dims(self.url, name, a, (dim,))
            if not _dtype_ok(a, dtype):
                raise StoreError(f"{self.url}: root array '{name}' has dtype {a.dtype}, expected {dtype}")
        self._root = {k: members[k] for k in ROOT_ARRAYS}
        self._id_rows = None

    def _load_feature(self, name: str, group: zarr.Group) -> None:
        where = f"{self.url}: feature group '{name}'"
        attrs = group.attrs.asdict()
        if "spec" not in attrs or "provenance" not in attrs:
            raise StoreError(f"{where} lacks the 'spec'/'provenance' attributes (not written by tvr, or "
                             "interrupted while being created); delete that group and re-run extraction")
        try:
            spec = FeatureSpec.from_dict(attrs["spec"])
        except Exception as e:
            raise StoreError(f"{where} has an unreadable 'spec' attribute: {e}") from e
        rows = self.n_items if spec.axis == "item" else self.n_captions
        members = dict(group.arrays())
        arrays = {}
        for aname, kw in feature_arrays(spec, rows).items():
            if aname not in members:
                raise StoreError(f"{where} is missing array '{aname}'; delete the group and re-run extraction")
            a = members[aname]
            _check_dims(self.url, f"{name}/{aname}", a, kw["dimension_names"])
            if a.shape != kw["shape"] or a.chunks != kw["chunks"] or not _dtype_ok(a, kw["dtype"]):
                raise StoreError(f"{where}: array '{aname}' has shape {a.shape} chunks {a.chunks} dtype {a.dtype}, "
                                 f"expected {kw['shape']} {kw['chunks']} {kw['dtype']} from its spec")
            arrays[aname] = a
        self._specs[name], self._arrays[name] = spec, arrays

    # ---- extending ----
    def _require_write(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.url} is open read-only; use FeatureStore.open(url, mode='r+') to write")

    def _append_root(self, items: Sequence[ItemRecord], captions: Sequence[CaptionRecord],
                     cap_rows: np.ndarray) -> None:
        cols: dict[str, np.ndarray] = {
            "item_path": np.array([i.path for i in items], dtype=object),
            "item_kind": np.array([i.kind for i in items], dtype=object),
            "item_split": np.array([i.split for i in items], dtype=object),
            "item_duration": np.array([i.duration for i in items], dtype=np.float64),
            "item_id": np.array([i.id for i in items], dtype=object),
            "caption_item": cap_rows,
            "caption_text": np.array([c.text for c in captions], dtype=object),
            "caption_id": np.array([c.id for c in captions], dtype=object),
        }
        for name, new in cols.items():  # ROOT_ARRAYS order: the id arrays, which define N and C, go last
            if not len(new):
                continue
            a = self._root[name]
            start = a.shape[0]
            a.resize((start + len(new),))
            a[start:] = new
        self._id_rows = None

    def add_items(self, items: Sequence[ItemRecord], captions: Sequence[CaptionRecord] = ()) -> None:
        """Append items and captions (driver only); every feature gains PENDING rows for them."""
        self._require_write()
        items, captions = list(items), list(captions)
        known_caps = set(self._read_str("caption_id"))
        cap_rows = _check_records(items, captions, self._rows(), known_caps)
        n, c = self.n_items + len(items), self.n_captions + len(captions)
        for name, spec in self._specs.items():  # features first: new rows read as PENDING (fill values)
            rows = n if spec.axis == "item" else c
            for a in self._arrays[name].values():
                a.resize((rows, *a.shape[1:]))
        self._append_root(items, captions, cap_rows)

    def ensure_feature(self, spec: FeatureSpec, provenance: Mapping[str, Any]) -> None:
        """Create the group for `spec` if missing; refuse an existing group with another spec or weights."""
        self._require_write()
        w = provenance.get("weights") if isinstance(provenance, Mapping) else None
        if not isinstance(w, Mapping) or not (("file" in w and "sha256" in w) or w.get("random") is True):
            raise StoreError(f"feature '{spec.name}': provenance['weights'] must be {{'file', 'sha256'}} or "
                             f"{{'random': True, 'seed': s}}, got {w!r}")
        if spec.name in ROOT_ARRAYS:
            raise StoreError(f"feature name '{spec.name}' collides with a root array; pick another name")
        if spec.name in self._specs:
            old, old_prov = self._specs[spec.name], self.provenance(spec.name)
            diffs = [f for f in spec.__dataclass_fields__ if getattr(spec, f) != getattr(old, f)]
            diffs += [k for k in IDENTITY_KEYS if _jsonable(old_prov.get(k)) != _jsonable(provenance.get(k))]
            if diffs:
                raise StoreError(
                    f"feature '{spec.name}' in {self.url} already holds rows made with a different "
                    f"{', '.join(diffs)} (stored weights: {old_prov.get('weights')}, new: {w}). Mixing weights, "
                    "preprocessing or layouts in one feature group is refused because its rows would not be "
                    f"comparable. Use a new store, or a new feature name (e.g. '{spec.name}_v2').")
            return
        rows = self.n_items if spec.axis == "item" else self.n_captions
        group = self._g.create_group(spec.name)
        arrays = {n: group.create_array(n, **kw) for n, kw in feature_arrays(spec, rows).items()}
        arrays["status"].attrs.update({"flag_values": [int(s) for s in Status],
                                       "flag_meanings": " ".join(s.name.lower() for s in Status)})
        prov = {**_jsonable(dict(provenance)), "tvr_version": tvr_version(), "created": _now()}
        group.attrs.update({"spec": json.loads(spec.to_json()), "provenance": prov})
        self._specs[spec.name], self._arrays[spec.name] = spec, arrays

    # ---- metadata ----
    @property
    def store_id(self) -> str:
        """This store's identity (uuid4 hex, root attr `tvr_store_id`); "" for an old store opened read-only."""
        return str(self._g.attrs.get(STORE_ID_ATTR, ""))

    @property
    def features(self) -> list[str]:
        """Feature group names, sorted."""
        return sorted(self._specs)

    def spec(self, name: str) -> FeatureSpec:
        """The FeatureSpec of feature `name`."""
        self._check_feature(name)
        return self._specs[name]

    def provenance(self, name: str) -> dict[str, Any]:
        """Provenance attributes of feature `name` (weights, preset, variant, tvr_version, created)."""
        self._check_feature(name)
        return dict(self._g[name].attrs["provenance"])

    @property
    def n_items(self) -> int:
        return int(self._root["item_id"].shape[0])

    @property
    def n_captions(self) -> int:
        return int(self._root["caption_id"].shape[0])

    def n_rows(self, name: str) -> int:
        """Row count of feature `name` (items or captions)."""
        return self.n_items if self.spec(name).axis == "item" else self.n_captions

    def _read_str(self, name: str) -> np.ndarray:
        return np.asarray(self._root[name][:], dtype=object)

    def items(self) -> ItemTable:
        """All item columns."""
        return ItemTable(id=self._read_str("item_id"), path=self._read_str("item_path"),
                         kind=self._read_str("item_kind"), duration=np.asarray(self._root["item_duration"][:]),
                         split=self._read_str("item_split"))

    def captions(self) -> CaptionTable:
        """All caption columns."""
        return CaptionTable(id=self._read_str("caption_id"), item=np.asarray(self._root["caption_item"][:]),
                            text=self._read_str("caption_text"))

    def _rows(self) -> dict[str, int]:
        if self._id_rows is None:
            self._id_rows = {k: i for i, k in enumerate(self._read_str("item_id"))}
        return self._id_rows

    def row_of(self, item_id: str) -> int:
        """Row of `item_id` on the item axis."""
        try:
            return self._rows()[item_id]
        except KeyError:
            raise StoreError(f"item id {item_id!r} is not in {self.url}") from None

    def _check_feature(self, name: str) -> None:
        if name not in self._specs:
            raise StoreError(f"{self.url} has no feature {name!r}; it has {self.features}")

    # ---- writing ----
    def write(self, feature: str, row: int, result: FeatureRows) -> None:
        """Write one row of a feature with chunk_rows == 1; the status goes last."""
        spec = self.spec(feature)
        if spec.chunk_rows != 1:
            raise StoreError(f"feature '{feature}' has chunk_rows={spec.chunk_rows}; write whole chunks with "
                             "write_block so two writers never share a chunk")
        self._commit(feature, row, [pad_row(spec, row, result)])

    def write_block(self, feature: str, start: int, results: Sequence[FeatureRows]) -> None:
        """Write rows start..start+len(results), which must cover whole chunks (or end at the last row)."""
        spec = self.spec(feature)
        stop, total = start + len(results), self.n_rows(feature)
        if start % spec.chunk_rows or (stop % spec.chunk_rows and stop != total) or not results:
            raise StoreError(f"feature '{feature}': write_block rows {start}:{stop} do not cover whole chunks of "
                             f"{spec.chunk_rows} rows (or end at row {total}); align the block to chunk_rows")
        self._commit(feature, start, [pad_row(spec, start + i, r) for i, r in enumerate(results)])

    def write_failed(self, feature: str, row: int, reason: str, message: str = "") -> None:
        """Mark a row FAILED (for chunk_rows > 1: the whole chunk starting at the aligned `row`)."""
        spec = self.spec(feature)
        if row % spec.chunk_rows:
            raise StoreError(f"feature '{feature}': write_failed row {row} is not aligned to chunk_rows="
                             f"{spec.chunk_rows}; mark the whole chunk owned by this writer")
        n = min(spec.chunk_rows, self.n_rows(feature) - row)
        if row < 0 or n <= 0:
            raise StoreError(f"feature '{feature}': row {row} out of range 0:{self.n_rows(feature)}")
        empty = FeatureRows.absent(spec, reason or "failed", message or reason)
        padded = []
        for i in range(n):
            p = pad_row(spec, row + i, empty)
            p["status"] = np.uint8(Status.FAILED)
            padded.append(p)
        self._commit(feature, row, padded)

    def _commit(self, feature: str, start: int, padded: list[dict[str, Any]]) -> None:
        self._require_write()
        total = self.n_rows(feature)
        if start < 0 or start + len(padded) > total:
            raise StoreError(f"feature '{feature}': rows {start}:{start + len(padded)} out of range 0:{total}")
        arrays, sel = self._arrays[feature], slice(start, start + len(padded))
        data = {k: np.stack([p[k] for p in padded]) if k not in ("reason", "message", "status")
                else np.array([p[k] for p in padded], dtype=object if k != "status" else np.uint8)
                for k in padded[0]}
        # PENDING first, so re-writing a finished row and crashing midway cannot leave stale data marked done
        # (a row whose status chunk was never written is PENDING already: one round trip saved per fresh row)
        if not _never_written(arrays["status"], sel):
            _set_all({"status": arrays["status"]}, sel, {"status": np.zeros(len(padded), np.uint8)})
        _set_all(arrays, sel, {k: v for k, v in data.items() if k != "status"})
        _set_all(arrays, sel, {"status": data["status"]})  # the commit point

    # ---- reading ----
    def status(self, feature: str) -> np.ndarray:
        """(R,) uint8 Status codes of every row; missing chunks read as PENDING."""
        self._check_feature(feature)
        a = self._arrays[feature]["status"]
        fast = _fast_status(a)
        return fast if fast is not None else np.asarray(a[:], dtype=np.uint8)

    def reasons(self, feature: str, status: np.ndarray | None = None) -> np.ndarray:
        """(R,) reason codes (object dtype); only ABSENT/FAILED rows are read, others are ''."""
        st = self.status(feature) if status is None else status
        out = np.full(st.shape, "", dtype=object)
        idx = np.flatnonzero((st == Status.ABSENT) | (st == Status.FAILED))
        if len(idx):
            out[idx] = np.asarray(self._arrays[feature]["reason"].get_orthogonal_selection((idx,)), dtype=object)
        return out

    def messages(self, feature: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Messages of the given rows (object dtype)."""
        self._check_feature(feature)
        idx = np.asarray(rows, dtype=np.int64).ravel()
        return np.asarray(self._arrays[feature]["message"].get_orthogonal_selection((idx,)), dtype=object)

    def read(self, feature: str, rows: Sequence[int] | np.ndarray | slice | None = None) -> FeatureBatch:
        """Rows of a feature as float32 with masks and availability, read in one batched zarr call per array."""
        spec, total = self.spec(feature), self.n_rows(feature)
        if rows is None:
            rows = slice(0, total)
        if isinstance(rows, slice):
            idx = np.arange(total, dtype=np.int64)[rows]
        else:
            idx = np.asarray(rows, dtype=np.int64).ravel()
        if len(idx) and (idx.min() < 0 or idx.max() >= total):
            raise StoreError(f"feature '{feature}': rows out of range 0:{total}")
        contiguous = len(idx) > 0 and bool(np.all(np.diff(idx) == 1))
        sel = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        arrays = self._arrays[feature]
        names = [k for k in arrays if k not in ("reason", "message")]
        got = dict(zip(names, sync(_gather([_get(arrays[k], sel) for k in names]))))
        status = np.asarray(got["status"], dtype=np.uint8)
        ok = status == Status.OK
        mask = np.asarray(got["mask"], dtype=bool) & ok[:, None]
        slot_mask = got.get("slot_mask")
        if slot_mask is not None:
            slot_mask = np.asarray(slot_mask, dtype=bool) & ok[:, None, None]
        return FeatureBatch(rows=idx, values=np.asarray(got["values"], dtype=np.float32), mask=mask,
                            time=np.asarray(got["time"], dtype=np.float32), status=status, available=ok,
                            slot_mask=slot_mask,
                            extras={e.name: np.asarray(got[f"extra_{e.name}"]) for e in spec.extras})

    def read_many(self, features: Sequence[str],
                  rows: Sequence[int] | np.ndarray | slice | None = None) -> dict[str, FeatureBatch]:
        """The same rows of several features of one axis (items, or captions for text features): name -> batch."""
        axes = {f: self.spec(f).axis for f in features}
        if len(set(axes.values())) > 1:
            raise StoreError(f"read_many: features {axes} mix item and caption axes; their rows differ, so read "
                             "item features and caption features in separate calls")
        return {f: self.read(f, rows) for f in features}

    def caption_rows(self, item_rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Caption rows (int64, store order) describing any of the given item rows."""
        return np.flatnonzero(np.isin(self.captions().item, np.asarray(item_rows, dtype=np.int64)))

    def coverage(self) -> dict[str, dict[str, int]]:
        """Per feature, how many rows are ok / absent / failed / pending."""
        out = {}
        for name in self.features:
            counts = np.bincount(self.status(name), minlength=4)
            out[name] = {s.name.lower(): int(counts[s]) for s in (Status.OK, Status.ABSENT, Status.FAILED,
                                                                   Status.PENDING)}
        return out

    def to_xarray(self, feature: str | None = None) -> Any:
        """Dask-backed xarray Dataset of the root table (None) or of one feature, with id coordinates."""
        import xarray as xr

        if feature is not None:
            self._check_feature(feature)
        ds = xr.open_zarr(self._g.store, group=feature if feature else None, consolidated=False)
        ids = {"item": self._read_str("item_id").astype(str), "caption": self._read_str("caption_id").astype(str)}
        return ds.assign_coords({d: ids[d] for d in ds.dims if d in ids})


def open_store(url: str | os.PathLike, mode: Literal["r", "r+"] = "r", **kw: Any) -> FeatureStore:
    """Shorthand for FeatureStore.open."""
    return FeatureStore.open(url, mode, **kw)
