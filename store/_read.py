"""The read side of FeatureStore: status scans, row reads and reasons, merging staged rows into packed ones.

An OK row whose data is missing (lost chunk or shard: its inner chunk is absent from the shard index, v2 float
values read as the NaN fill value, or no valid mask step) and a status byte outside the Status codes are
StoreErrors naming the rows and the fix, never valid data. The shard-index check covers every dtype (uint8
frames have no NaN); packs store every inner chunk of the per-step data arrays whose fill value is a valid value
(store/_pack.py), so a packed OK row always has its chunks.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from zarr.core.sync import sync

from store._pack import effective_status, is_data
from store._shard_io import _ABSENT, ShardLayout, decode, fetch, fetch_local, shard_layout
from store._zarr_io import _fast_status, _gather, _get, _quiet_members
from store.schema import FeatureBatch, Status, StoreError, bad_value_rows

_MAX_CODE = max(int(s) for s in Status)
PRESENT = "_present"  # key of the per-row "every per-step data chunk is stored" flags among the read arrays


def present(lay: ShardLayout, rows: np.ndarray, fetched: tuple[np.ndarray, list[Any]]) -> np.ndarray:
    """Per row of `rows`: whether its inner chunk is stored (in the shard index) in `fetch`'s shards."""
    chunks, shards = fetched
    n, have = lay.chunks_per_shard, np.zeros(len(chunks), bool)
    cuts = np.flatnonzero(np.diff(chunks // n)) + 1 if len(chunks) else []
    for sh, pos in zip(shards, np.split(np.arange(len(chunks)), cuts) if len(chunks) else []):
        if sh.index is not None:
            have[pos] = sh.index[chunks[pos] % n, 0] != _ABSENT
    return have[np.searchsorted(chunks, np.asarray(rows, dtype=np.int64) // lay.inner_rows)]


class ReadMixin:
    """Reading methods of FeatureStore (uses its _arrays, _staging, _specs, version and url)."""

    _arrays: dict[str, dict[str, Any]]
    _staging: Any
    version: int
    url: str

    # ---- reading ----
    def status(self, feature: str) -> np.ndarray:
        """(R,) uint8 Status codes of every row (staged rows included); invalid codes are a StoreError."""
        self._check_feature(feature)
        a = self._arrays[feature]["status"]
        try:
            fast = _fast_status(a) if self.version < 2 else None
            packed = fast if fast is not None else np.asarray(a[:], dtype=np.uint8)
        except Exception as e:
            raise StoreError(f"{self.url}: cannot read '{feature}/status' ({type(e).__name__}: {e}); a status chunk "
                             f"or shard file is damaged. Run `tvr-store verify {self.url}` to locate it; deleting "
                             "the damaged file turns its rows PENDING so extraction redoes them") from e
        st = packed
        if self._staging is not None:
            entries = self._staging.list(feature)
            if entries:
                st = effective_status(self, feature, packed, 0, entries)
        bad = np.flatnonzero(st > _MAX_CODE)
        if len(bad):
            raise StoreError(f"{self.url}: '{feature}/status' holds invalid codes {sorted(set(st[bad].tolist()))[:5]} "
                             f"at {len(bad)} row(s), e.g. {bad[:5].tolist()} (valid: 0-{_MAX_CODE}); run "
                             f"`tvr-store verify {self.url} --repair` to reset them to PENDING so extraction redoes them")
        return st

    def _overlay(self, feature: str, idx: np.ndarray, got: dict[str, np.ndarray]) -> bool:
        """Apply staged rows (oldest first) to `got` (arrays aligned with `idx`); False if one vanished meanwhile."""
        entries = self._staging.list(feature) if self._staging is not None else []
        if not entries:
            return True
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        hits = []
        for e in entries:
            lo, hi = np.searchsorted(sidx, [e.start, e.stop])
            if lo < hi:
                hits.append((e, order[lo:hi]))
        blocks = self._staging.read([e for e, _ in hits]) if hits else []
        for (e, pos), blk in zip(hits, blocks):
            if not blk:
                return False  # packed and removed after we listed it: read again
            for k, v in got.items():
                v[pos] = True if k == PRESENT else blk[k][idx[pos] - e.start]  # a staged row has all its data
        return True

    def _read_rows(self, feature: str, sel: slice | np.ndarray, idx: np.ndarray, names: list[str]) -> dict[str, Any]:
        """Packed rows merged with staged rows, as writable numpy arrays (strings as objects)."""
        return self._read_many_rows(sel, idx, {feature: names})[feature]

    def _read_many_rows(self, sel: slice | np.ndarray, idx: np.ndarray,
                        names: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
        """`_read_rows` of several features at once: every array in one concurrent zarr round trip."""
        keys = [(f, k) for f, ks in names.items() for k in ks]
        # v2 shards are fetched whole (or their needed byte ranges) and decoded here in bulk: zarr's own path
        # costs ~0.5 ms per inner chunk, and decoding in the caller's thread lets reader threads run in parallel
        lays = [self._layout(self._arrays[f][k]) for f, k in keys]
        for _ in range(5):
            try:
                local = [None if lay is None else fetch_local(lay, idx) for lay in lays]  # plain file reads
                coros = [_get(self._arrays[f][k], sel) if lay is None else fetch(lay, idx)
                         for (f, k), lay, got in zip(keys, lays, local) if got is None]
                remote = iter(sync(_gather(coros)) if coros else [])
                raw = [next(remote) if got is None else got for got in local]
                got: dict[str, dict[str, Any]] = {f: {} for f in names}
                for (f, k), lay, v in zip(keys, lays, raw):
                    if lay is not None:
                        got[f][k] = decode(lay, idx, v)
                        if is_data(k):
                            have = present(lay, idx, v)
                            got[f][PRESENT] = have & got[f][PRESENT] if PRESENT in got[f] else have
                    elif self._arrays[f][k].dtype.kind in "OTU":
                        got[f][k] = np.asarray(v, dtype=object)
                    else:
                        got[f][k] = np.array(v)
            except Exception as e:
                raise StoreError(f"{self.url}: cannot read features {list(names)} ({type(e).__name__}: {e}); a "
                                 f"chunk or shard file is damaged: run `tvr-store verify {self.url}`") from e
            if all(self._overlay(f, idx, got[f]) for f in names):
                return got
        raise StoreError(f"{self.url}: features {list(names)} kept changing while being read; retry")

    def _layout(self, a: Any) -> ShardLayout | None:
        """The bulk-read layout of v2 array `a` (cached per array object), or None: read it through zarr."""
        if self.version < 2:
            return None
        cache = self.__dict__.setdefault("_shard_layouts", {})
        hit = cache.get(id(a))
        if hit is None or hit[0] is not a:
            hit = cache[id(a)] = (a, shard_layout(a))
        return hit[1]

    def _rows_of(self, feature: str, status: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        idx = np.flatnonzero(status)
        if not len(idx):
            return {k: np.zeros(0, object) for k in names}
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if len(idx) * 8 < hi - lo:  # sparse: read just those rows
            return self._read_rows(feature, idx, idx, names)
        span = np.arange(lo, hi)  # dense: one contiguous read beats a per-row orthogonal selection
        got = self._read_rows(feature, slice(lo, hi), span, names)
        return {k: v[idx - lo] for k, v in got.items()}

    def reasons(self, feature: str, status: np.ndarray | None = None) -> np.ndarray:
        """(R,) reason codes (object dtype); only ABSENT/FAILED rows are read, others are ''."""
        st = self.status(feature) if status is None else status
        out = np.full(st.shape, "", dtype=object)
        want = (st == Status.ABSENT) | (st == Status.FAILED)
        if want.any():
            out[want] = self._rows_of(feature, want, ["reason"])["reason"]
        return out

    def messages(self, feature: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Messages of the given rows (object dtype)."""
        self._check_feature(feature)
        idx = np.asarray(rows, dtype=np.int64).ravel()
        return self._read_rows(feature, idx, idx, ["message"])["message"]

    def _select(self, feature: str, rows: Sequence[int] | np.ndarray | slice | None) -> tuple[np.ndarray, Any]:
        """(row indices, zarr selection: a slice when contiguous) of `rows`, range-checked."""
        total = self.n_rows(feature)
        if rows is None:
            rows = slice(0, total)
        if isinstance(rows, slice):
            idx = np.arange(total, dtype=np.int64)[rows]
        else:
            idx = np.asarray(rows, dtype=np.int64).ravel()
        if len(idx) and (idx.min() < 0 or idx.max() >= total):
            raise StoreError(f"feature '{feature}': rows out of range 0:{total}")
        contiguous = len(idx) > 0 and bool(np.all(np.diff(idx) == 1))
        return idx, (slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx)

    def read(self, feature: str, rows: Sequence[int] | np.ndarray | slice | None = None) -> FeatureBatch:
        """Rows of a feature as float32 with masks and availability; an OK row whose data was lost is an error."""
        return self.read_many([feature], rows)[feature]

    def _batch(self, feature: str, idx: np.ndarray, got: dict[str, np.ndarray], stored_dtype: bool = False
               ) -> FeatureBatch:
        """FeatureBatch of rows `idx` from raw merged arrays, after the integrity checks."""
        spec = self.spec(feature)
        status = got["status"].astype(np.uint8)
        ok = status == Status.OK
        # uint8 features (frames) stay uint8: 4x less memory than float32, and the trainer normalises on device
        keep = stored_dtype or spec.dtype == "uint8"
        values = got["values"] if keep else got["values"].astype(np.float32, copy=False)
        mask = got["mask"].astype(bool)
        self._check_rows(feature, idx, status, values, mask, got.get(PRESENT))
        values[~ok] = 0  # v2 PENDING rows hold the NaN fill value
        mask &= ok[:, None]
        slot_mask = got.get("slot_mask")
        if slot_mask is not None:
            slot_mask = slot_mask.astype(bool) & ok[:, None, None]
        return FeatureBatch(rows=idx, values=values, mask=mask, time=got["time"].astype(np.float32), status=status,
                            available=ok, slot_mask=slot_mask,
                            extras={e.name: got[f"extra_{e.name}"] for e in spec.extras})

    def _check_rows(self, feature: str, idx: np.ndarray, status: np.ndarray, values: np.ndarray,
                    mask: np.ndarray, stored: np.ndarray | None = None) -> None:
        """Refuse invalid status codes and OK rows whose data is missing (lost chunk/shard: absent from the shard
        index, NaN fill, no mask)."""
        ok = status == Status.OK
        lost = ok & ~mask.any(axis=1)
        if stored is not None:
            lost |= ok & ~stored
        if self.version >= 2 and values.dtype.kind == "f":
            lost |= ok & bad_value_rows(values, nan_only=True)
        bad = status > _MAX_CODE
        if lost.any() or bad.any():
            what = "are marked OK but their data is missing (a chunk or shard file was lost)" if lost.any() \
                else f"have invalid status codes {sorted(set(status[bad].tolist()))[:5]}"
            rows = idx[lost | bad][:5].tolist()
            raise StoreError(f"{self.url}: feature '{feature}' rows {rows} (of {int((lost | bad).sum())}) {what}; "
                             f"run `tvr-store verify {self.url} --repair` to reset them to PENDING, then re-run "
                             "extraction to redo them")

    def read_many(self, features: Sequence[str], rows: Sequence[int] | np.ndarray | slice | None = None,
                  stored_dtype: bool = False) -> dict[str, FeatureBatch]:
        """The same rows of several features of one axis (items, or captions for text features): name -> batch
        (values as float32, or in the store's dtype with `stored_dtype`: float16 stays float16)."""
        axes = {f: self.spec(f).axis for f in features}
        if len(set(axes.values())) > 1:
            raise StoreError(f"read_many: features {axes} mix item and caption axes; their rows differ, so read "
                             "item features and caption features in separate calls")
        if not features:
            return {}
        idx, sel = self._select(features[0], rows)
        names = {f: [k for k in self._arrays[f] if k not in ("reason", "message")] for f in features}
        got = self._read_many_rows(sel, idx, names)  # one round trip for every array of every feature
        return {f: self._batch(f, idx, got[f], stored_dtype) for f in features}

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
            if self.staged_count(feature):
                warnings.warn(f"{self.url}: feature '{feature}' has staged rows that xarray does not see yet; call "
                              "FeatureStore.open(url, 'r+').pack_ready(partial=True) first", stacklevel=2)
        with _quiet_members():
            ds = xr.open_zarr(self._g.store, group=feature if feature else None, consolidated=False)
        ids = {"item": self._read_str("item_id").astype(str), "caption": self._read_str("caption_id").astype(str)}
        return ds.assign_coords({d: ids[d] for d in ds.dims if d in ids})


