"""FeatureStore: the Zarr v3 store that extraction writes, training reads and notebooks inspect (design.md §1).

Layout and write protocol are in docs/design.md §1. Schema v2 in short:

* Every per-row array is sharded: one object per shard of S rows per array (S per feature, from the row size),
  so a store of N items and F features holds about N * F * 8 / S files instead of one per row and array.
* Writers never touch shards. `write`/`write_block`/`write_failed` (store/_write.py) stage rows in
  `.tvr/staging/` (store/_staging.py: checksummed records appended to a per-writer segment on local disks, one
  atomic object per call elsewhere); `pack_ready()` moves staged rows into the shards, one process per shard
  (lock), status last. Reads (`status`, `read`, `reasons`, `coverage`) merge staged rows;
  xarray/dask see packed rows only (pack with `pack_ready(partial=True)` first).
* Integrity: an OK row whose data chunk or shard was lost is an error, never zeros (float `values` use NaN as
  fill value; every dtype is also checked against the shard index). v1 stores (one chunk per row) open read-only; `tvr-store compact` converts them.

Strings (ids, paths, captions, reasons) are zarr 3 `str` arrays (vlen-utf8). xarray opens them as numpy
`StringDType` arrays and indexes them fine; this API returns them as object-dtype numpy arrays.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.storage import LocalStore

from store._create import (PARTIAL_MARKER, StoreExistsError, check_records, create_local_atomic, is_local, now,
                           open_kwargs)
from store._choices import CHOICES_GROUP, ChoicesMixin
from store._lock import StoreLock
from store._read import ReadMixin
from store._write import WriteMixin
from store._staging import Staging
from store.provenance import spec_diffs, value_diffs
from store.common import tvr_version
from store._zarr_io import (
    _quiet_members,
    _check_dims,
    _dtype_ok,
    _get_json,
    _jsonable,
    _listdir,
    _looks_like_tvr,
)
from store.schema import (
    ROOT_ARRAYS,
    ROOT_INNER_ROWS,
    ROOT_SHARD_ROWS,
    SCHEMA_VERSION,
    SHARD_BYTES,
    CaptionRecord,
    CaptionTable,
    FeatureSpec,
    ItemRecord,
    ItemTable,
    Status,
    StoreError,
    auto_shard_rows,
    codec_problem,
    feature_arrays,
)

ROOT_CHUNK = 16384  # v1 rows per chunk of the root tables
STORE_ID_ATTR = "tvr_store_id"  # uuid4 hex written at creation; old stores get one on their first r+ open
LAYOUT_ATTR = "tvr_layout"  # root: {"shard_bytes", "shard_rows"}; feature group attr "layout": {"shard_rows"}
LOCK_TIMEOUT = 120.0  # seconds a structural change waits for another process's structural change
_META_FILES = {"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata"}
_MAX_CODE = max(int(s) for s in Status)
__all__ = ["FeatureStore", "StoreExistsError", "open_store", "tvr_version"]


class FeatureStore(ReadMixin, WriteMixin, ChoicesMixin):
    """A tvr feature store: item/caption tables at the root and one Zarr group per feature."""

    def __init__(self, group: zarr.Group, url: str, mode: str) -> None:
        self._g, self.url, self.mode = group, url, mode
        self.storage_options: dict[str, Any] = {}  # what `open` was given: reopening by url (other modes) needs it
        self._specs: dict[str, FeatureSpec] = {}
        self._arrays: dict[str, dict[str, zarr.Array]] = {}
        self._root: dict[str, zarr.Array] = {}
        self._id_rows: dict[str, int] | None = None
        self._shard_rows: dict[str, int] = {}  # feature -> rows per shard (0: v1 row-chunked)
        store = group.store
        self._local_root = Path(store.root) / group.path if isinstance(store, LocalStore) else None
        self._staging: Staging | None = Staging(store, self._local_root)
        self.version = SCHEMA_VERSION

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, mode={self.mode!r}, items={self.n_items}, "
                f"captions={self.n_captions}, features={self.features})")

    # ---- opening and creating ----
    @classmethod
    def create(cls, url: str | os.PathLike, items: Sequence[ItemRecord], captions: Sequence[CaptionRecord] = (),
               *, features: Sequence[tuple[FeatureSpec, Mapping[str, Any]]] = (), overwrite: bool = False,
               storage_options: Mapping[str, Any] | None = None, shard_bytes: int = SHARD_BYTES,
               shard_rows: int | None = None) -> FeatureStore:
        """Create a store holding `items`, `captions` and the feature groups `features` ((spec, provenance)).

        Refuses to replace anything but a tvr store. Local stores appear atomically (built in a marked temp folder,
        then renamed); a process that loses a creation race gets StoreExistsError. `shard_rows` fixes the rows
        per shard of every feature; otherwise each feature gets about `shard_bytes` of values per shard.
        """
        items, captions = list(items), list(captions)
        cap_rows = check_records(items, captions, {}, set())
        layout = {"shard_bytes": int(shard_bytes), "shard_rows": shard_rows}

        def build(g: zarr.Group, where: str) -> None:
            self = cls(g, where, "r+")
            self._build(items, captions, cap_rows, features, layout)

        if is_local(url):
            p = Path(url)
            if p.exists() and (p.is_file() or any(p.iterdir())):
                if not overwrite:
                    raise StoreExistsError(f"{url} already exists; open it with FeatureStore.open, or pass "
                                           "overwrite=True")
                if not _looks_like_tvr(p):
                    raise StoreError(f"{url} exists and is not a tvr store; refusing to overwrite it "
                                     "(pick another path)")
            else:
                create_local_atomic(p, lambda tmp: build(zarr.open_group(str(tmp), mode="a", zarr_format=3),
                                                         str(tmp)))
                return cls.open(url, "r+", storage_options=storage_options)
        kw = open_kwargs(url, storage_options)
        try:
            g = zarr.open_group(str(url), mode="w" if overwrite else "w-", zarr_format=3, **kw)
        except Exception as e:  # zarr raises several types for an existing node
            raise StoreExistsError(f"cannot create a store at {url}: {e}; open it with FeatureStore.open") from e
        lock = cls(g, str(url), "r+")._lock("create", "store creation")
        if not lock.try_acquire():
            raise StoreExistsError(f"{url}: another process is creating this store right now; open it with "
                                   "FeatureStore.open(url, 'r+') once it is done")
        try:
            build(g, str(url))
        finally:
            lock.release()
        return cls.open(url, "r+", storage_options=storage_options)

    def _build(self, items: list[ItemRecord], captions: list[CaptionRecord], cap_rows: np.ndarray,
               features: Sequence[tuple[FeatureSpec, Mapping[str, Any]]], layout: dict[str, Any]) -> None:
        """Fill a new, empty group: root tables, feature groups, then the tvr attrs (last)."""
        g = self._g
        for name, (dtype, dim, fill) in ROOT_ARRAYS.items():
            g.create_array(name, shape=(0,), chunks=(ROOT_INNER_ROWS,), shards=(ROOT_SHARD_ROWS,), dtype=dtype,
                           dimension_names=(dim,), fill_value=fill, compressors=None)
        g.attrs.update({LAYOUT_ATTR: layout})
        self._load_root()
        self._append_root(items, captions, cap_rows)
        for spec, prov in features:
            self._check_new_feature(spec, prov)
            self._create_feature(spec, prov)
        # tvr attrs last: a crash before this line leaves something `open` rejects instead of a half store
        g.attrs.update({"tvr_store": SCHEMA_VERSION, "tvr_version": tvr_version(), "created": now(),
                        STORE_ID_ATTR: uuid.uuid4().hex})

    @classmethod
    def open(cls, url: str | os.PathLike, mode: Literal["r", "r+"] = "r", *,
             storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
        """Open and validate an existing store; StoreError says what is wrong and how to fix it."""
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        hint = "create one with FeatureStore.create(...) or `tvr-extract`"
        if is_local(url):
            p = Path(url)
            if not p.exists():
                raise StoreError(f"{url}: no tvr store here (the path does not exist); {hint}")
            if not p.is_dir() or not (p / "zarr.json").exists():
                kind = "a file" if not p.is_dir() else "a plain directory (no zarr.json)"
                raise StoreError(f"{url} is not a tvr store: it is {kind}; {hint}")
        kw = open_kwargs(url, storage_options)
        try:
            g = zarr.open_group(str(url), mode=mode, **kw)
        except Exception as e:
            raise StoreError(f"{url} is not a tvr store: cannot open a Zarr group there ({e}); {hint}") from e
        if g.metadata.zarr_format != 3:
            raise StoreError(f"{url} is a Zarr v2 store; tvr stores are Zarr v3, {hint}")
        self = cls(g, str(url), mode)
        self.storage_options = dict(storage_options or {})
        try:
            self._validate()
        except _RowsMismatch:
            self._settle()
        if self.version < 2 and mode == "r+":
            raise StoreError(f"{url} is a schema v1 tvr store (one chunk file per row); tvr opens it read-only. "
                             f"Convert it with `tvr-store compact {url}` (writes a sharded v2 store and checks it "
                             "is equal), then extract into or train from the result")
        if mode == "r+":
            if not self._g.attrs.get(STORE_ID_ATTR):
                self._g.attrs.update({STORE_ID_ATTR: uuid.uuid4().hex})  # stores made before store ids existed
            if self._local_root is not None:
                (self._local_root / PARTIAL_MARKER).unlink(missing_ok=True)  # a rename that crashed right after
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
        self.version = version
        if version < 2:
            self._staging = None
        self._scan_metadata()
        self._load_root()
        n, c = self.n_items, self.n_captions
        for name, (dtype, dim, _) in ROOT_ARRAYS.items():
            a = self._root[name]
            want = n if dim == "item" else c
            if a.shape != (want,):
                raise _RowsMismatch(f"{url}: root array '{name}' has shape {a.shape}, expected ({want},) (another "
                                    "process is adding items, or an add_items was interrupted)")
        with _quiet_members():
            members = list(self._g.members())
        for key, node in members:
            if key in ROOT_ARRAYS or key == CHOICES_GROUP:
                continue
            if not isinstance(node, zarr.Group):
                raise StoreError(f"{url}: unexpected array '{key}' at the root; tvr stores hold only "
                                 f"{sorted(ROOT_ARRAYS)} there")
            self._load_feature(key, node)

    def _scan_metadata(self) -> None:
        """Refuse corrupt metadata and pickle/object codecs in every array at any depth, from raw metadata."""
        store = self._g.store

        def walk(prefix: str) -> None:
            for child in _listdir(store, prefix):
                if child in _META_FILES or child.startswith("."):
                    continue
                key = f"{prefix}/{child}" if prefix else child
                v3, v2 = _get_json(store, f"{key}/zarr.json"), _get_json(store, f"{key}/.zarray")
                meta = v3 if v3 is not None else v2
                if meta is None:
                    if not any(k in _META_FILES for k in _listdir(store, key)):
                        walk(key)  # a plain folder (no node): arrays below it still count
                    continue
                if meta.get("unparseable"):
                    raise StoreError(f"{self.url}: the metadata of '{key}' ({key}/zarr.json) is not valid JSON "
                                     "(corrupt or truncated file); restore it from a backup, or delete that "
                                     "array's feature group and re-run extraction")
                if v3 is not None and v3.get("node_type") == "group":
                    walk(key)
                    continue
                problem = codec_problem(meta)
                if problem:
                    raise StoreError(f"{self.url}: array '{key}' {problem}; tvr refuses such stores. "
                                     "Remove that array or rebuild the store with tvr.")

        walk(self._g.path)

    def _load_root(self) -> None:
        try:
            with _quiet_members():
                members = dict(self._g.arrays())
        except Exception as e:
            raise StoreError(f"{self.url}: cannot read the root arrays' metadata ({e}); the store is damaged, "
                             "restore it from a backup or recreate it") from e
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
            # attrs are written last: another driver's ensure_feature may be creating this group right now, so
            # this is settled like a row mismatch (wait for the structural lock, re-read) before it is an error
            raise _RowsMismatch(f"{where} lacks the 'spec'/'provenance' attributes (not written by tvr, or "
                             "interrupted while being created); delete that group and re-run extraction")
        try:
            spec = FeatureSpec.from_dict(attrs["spec"])
        except Exception as e:
            raise StoreError(f"{where} has an unreadable 'spec' attribute: {e}") from e
        shard_rows = int(attrs.get("layout", {}).get("shard_rows", 0)) if self.version >= 2 else 0
        if self.version >= 2 and shard_rows <= 0:
            raise StoreError(f"{where} lacks its 'layout' attribute (rows per shard); delete the group and re-run "
                             "extraction")
        rows = self.n_items if spec.axis == "item" else self.n_captions
        try:
            members = dict(group.arrays())
        except Exception as e:
            raise StoreError(f"{where}: cannot read its arrays' metadata ({e}); a zarr.json there is damaged: "
                             "restore it, or delete the group and re-run extraction") from e
        arrays = {}
        for aname, kw in feature_arrays(spec, rows, shard_rows or None).items():
            if aname not in members:
                raise StoreError(f"{where} is missing array '{aname}'; delete the group and re-run extraction")
            a = members[aname]
            _check_dims(self.url, f"{name}/{aname}", a, kw["dimension_names"])
            shards = tuple(kw["shards"]) if "shards" in kw else None
            if a.shape[1:] == kw["shape"][1:] and a.shape[0] != rows and a.chunks == kw["chunks"]:
                raise _RowsMismatch(f"{where}: array '{aname}' has {a.shape[0]} rows, the store {rows} (another "
                                    "process is adding items, or an add_items was interrupted)")
            # inner chunks may be any divisor of the shard (tuning them later keeps older v2 stores readable)
            inner_ok = a.chunks == kw["chunks"] or (shards is not None and a.chunks[1:] == kw["chunks"][1:]
                                                    and shards[0] % a.chunks[0] == 0)
            if a.shape != kw["shape"] or not inner_ok or a.shards != shards or not _dtype_ok(a, kw["dtype"]):
                raise StoreError(f"{where}: array '{aname}' has shape {a.shape} chunks {a.chunks} shards {a.shards} "
                                 f"dtype {a.dtype}, expected {kw['shape']} {kw['chunks']} {shards} {kw['dtype']} "
                                 "from its spec")
            arrays[aname] = a
        self._specs[name], self._arrays[name], self._shard_rows[name] = spec, arrays, shard_rows

    def _reload(self, repair: bool = True) -> None:
        """Re-read the whole store from disk (under the structural lock: shapes may have changed)."""
        self._g = zarr.open_group(store=self._g.store, path=self._g.path, mode=self.mode)
        self._specs, self._arrays, self._shard_rows = {}, {}, {}
        try:
            self._validate()
        except _RowsMismatch:
            if not repair or self.mode != "r+":
                raise
            self._trim_rows()  # we hold the lock, so nobody is adding items: an add_items died midway
            self._reload(repair=False)

    def _settle(self) -> None:
        """Row counts disagree: wait for the structural change in progress (lock), repairing a dead one (r+)."""
        lock = self._lock("structure", "structural (add_items / ensure_feature)")
        if self.mode == "r+":
            with lock:
                self._reload()
            return
        deadline = time.monotonic() + LOCK_TIMEOUT
        while lock.holder() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self._reload(repair=False)
        except _RowsMismatch as e:
            raise StoreError(f"{e}; open the store once with mode='r+' (or rerun tvr-extract) to repair it") from e

    def _trim_rows(self) -> None:
        """Undo the half of an interrupted add_items: arrays longer than the id tables lose their new (empty) rows."""
        g = self._g
        n, c = g["item_id"].shape[0], g["caption_id"].shape[0]
        for name, (_, dim, _) in ROOT_ARRAYS.items():
            want = n if dim == "item" else c
            if g[name].shape[0] > want:
                g[name].resize((want,))
        with _quiet_members():
            groups = [(k, v) for k, v in g.members() if isinstance(v, zarr.Group)]
        for key, grp in groups:
            axis = grp.attrs.get("spec", {}).get("axis", "item")
            want = n if axis == "item" else c
            for _, a in grp.arrays():
                if a.shape[0] > want:
                    a.resize((want, *a.shape[1:]))

    def _open_arrays(self, feature: str) -> dict[str, zarr.Array]:
        """Fresh handles (current shapes) of a feature's arrays."""
        base = f"{self._g.path}/{feature}" if self._g.path else feature
        return {k: zarr.open_array(store=self._g.store, path=f"{base}/{k}", mode="r+") for k in self._arrays[feature]}

    def _lock(self, name: str, purpose: str, timeout: float | None = None,
              stale_after: float | None = None) -> StoreLock:
        return StoreLock(self._g.store, self._local_root, name, url=self.url, purpose=purpose,
                         timeout=LOCK_TIMEOUT if timeout is None else timeout, stale_after=stale_after)

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
        """Append items and captions under the structural lock; every feature gains PENDING rows for them."""
        self._require_write()
        with self._lock("structure", "structural (add_items / ensure_feature)"):
            self._reload()  # another driver may have added rows or features since we opened: never use stale shapes
            items, captions = list(items), list(captions)
            known_caps = set(self._read_str("caption_id"))
            cap_rows = check_records(items, captions, self._rows(), known_caps)
            n, c = self.n_items + len(items), self.n_captions + len(captions)
            for name, spec in self._specs.items():  # features first: new rows read as PENDING (fill values)
                rows = n if spec.axis == "item" else c
                for a in self._arrays[name].values():
                    a.resize((rows, *a.shape[1:]))
            self._append_root(items, captions, cap_rows)

    def _check_new_feature(self, spec: FeatureSpec, provenance: Mapping[str, Any]) -> None:
        w = provenance.get("weights") if isinstance(provenance, Mapping) else None
        if not isinstance(w, Mapping) or not (("file" in w and "sha256" in w) or w.get("random") is True):
            raise StoreError(f"feature '{spec.name}': provenance['weights'] must be {{'file', 'sha256'}} or "
                             f"{{'random': True, 'seed': s}}, got {w!r}")
        if spec.name in ROOT_ARRAYS:
            raise StoreError(f"feature name '{spec.name}' collides with a root array; pick another name")

    def ensure_feature(self, spec: FeatureSpec, provenance: Mapping[str, Any], *,
                       shard_rows: int | None = None) -> None:
        """Create the group for `spec` if missing (under the structural lock); refuse a different existing one."""
        self._require_write()
        self._check_new_feature(spec, provenance)
        if spec.name in self._specs:
            self._same_feature(spec, provenance)
            return
        with self._lock("structure", "structural (add_items / ensure_feature)"):
            self._reload()
            if spec.name in self._specs:  # another driver created it meanwhile
                self._same_feature(spec, provenance)
                return
            self._create_feature(spec, provenance, shard_rows)

    def _same_feature(self, spec: FeatureSpec, provenance: Mapping[str, Any]) -> None:
        """Refuse a rerun whose spec or any value-changing provenance entry differs from the stored group's."""
        diffs = spec_diffs(self._specs[spec.name], spec) + value_diffs(self.provenance(spec.name), provenance)
        if diffs:
            raise StoreError(
                f"feature '{spec.name}' in {self.url} already holds rows made with other settings:\n  "
                + "\n  ".join(diffs) + "\nMixing weights, preprocessing, options or layouts in one feature group is "
                "refused because its rows would not be comparable. Rerun with the stored settings, or use a new "
                f"store or a new feature name (e.g. '{spec.name}_v2').")

    def _create_feature(self, spec: FeatureSpec, provenance: Mapping[str, Any], shard_rows: int | None = None,
                        keep_provenance: bool = False) -> None:
        layout = self._g.attrs.get(LAYOUT_ATTR) or {}
        s = shard_rows or layout.get("shard_rows") or auto_shard_rows(spec, layout.get("shard_bytes", SHARD_BYTES))
        if s % spec.chunk_rows:
            raise StoreError(f"feature '{spec.name}': shard_rows={s} must be a multiple of chunk_rows="
                             f"{spec.chunk_rows} (a written block never spans two shards)")
        rows = self.n_items if spec.axis == "item" else self.n_captions
        group = self._g.create_group(spec.name)
        arrays = {n: group.create_array(n, **kw) for n, kw in feature_arrays(spec, rows, s).items()}
        arrays["status"].attrs.update({"flag_values": [int(c) for c in Status],
                                       "flag_meanings": " ".join(c.name.lower() for c in Status)})
        prov = _jsonable(dict(provenance))
        if not keep_provenance:
            prov = {**prov, "tvr_version": tvr_version(), "created": now()}
        group.attrs.update({"spec": json.loads(spec.to_json()), "provenance": prov, "layout": {"shard_rows": s}})
        self._specs[spec.name], self._arrays[spec.name], self._shard_rows[spec.name] = spec, arrays, s

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


class _RowsMismatch(StoreError):
    """Arrays disagree on the row count: a structural change is in progress or was interrupted."""


def open_store(url: str | os.PathLike, mode: Literal["r", "r+"] = "r", **kw: Any) -> FeatureStore:
    """Shorthand for FeatureStore.open."""
    return FeatureStore.open(url, mode, **kw)
