"""Writing methods of FeatureStore: rows are staged (one atomic object per call and shard), packed by pack_ready.

Writers never touch shards (docs/design.md §1): `write`/`write_block`/`write_failed` stage rows, status last;
`reset_rows`/`update_items`/`update_captions` stage PENDING rows under the structural lock (store/_rows.py).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from store import _pack, _rows
from store.schema import FeatureRows, FeatureSpec, Status, StoreError, pad_row


class WriteMixin:
    """Writing methods of FeatureStore (uses its specs, shard sizes, staging area, lock and url)."""

    _specs: dict[str, FeatureSpec]
    _shard_rows: dict[str, int]
    _staging: Any
    url: str

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

    def reset_rows(self, feature: str | None, rows: Sequence[int] | np.ndarray, *, axis: str = "item") -> int:
        """Mark `rows` PENDING again (so extraction redoes them) in `feature`, or in every feature of `axis` (None).

        Takes the structural lock; chunk_rows > 1 features reset the whole chunks holding the rows. Returns the
        rows reset (summed over features). Staged like a write: atomic per block, packed by `pack_ready`.
        """
        self._require_write()
        with self._lock("structure", "row reset"):
            self._reload()
            names = [feature] if feature is not None else [f for f in self.features if self.spec(f).axis == axis]
            return sum(_rows.reset_feature(self, f, rows) for f in names)

    def update_items(self, rows: Sequence[int] | np.ndarray, columns: Mapping[str, Sequence[Any]]) -> int:
        """Write new item table values (`columns`: path/kind/split/duration -> one value per row), under the
        structural lock; rows whose path or kind changes are first reset to PENDING in every item feature.
        Returns the rows reset."""
        self._require_write()
        with self._lock("structure", "item table update"):
            self._reload()
            return _rows.update_items(self, rows, columns)

    def update_captions(self, rows: Sequence[int] | np.ndarray, texts: Sequence[str]) -> int:
        """Write new caption texts under the structural lock; changed rows are first reset to PENDING in every
        caption feature (whole chunks). Returns the caption rows whose text changed."""
        self._require_write()
        with self._lock("structure", "caption table update"):
            self._reload()
            return _rows.update_captions(self, rows, texts)

    def _commit(self, feature: str, start: int, padded: list[dict[str, Any]]) -> None:
        """Stage rows start.. as one atomic object per shard they touch (a crash leaves them PENDING)."""
        self._require_write()
        total = self.n_rows(feature)
        if start < 0 or start + len(padded) > total:
            raise StoreError(f"feature '{feature}': rows {start}:{start + len(padded)} out of range 0:{total}")
        one = len(padded) == 1  # the common case: a view instead of a stacked copy
        data = {k: (np.asarray(padded[0][k])[None] if one else np.stack([p[k] for p in padded]))
                if k not in ("reason", "message", "status")
                else np.array([p[k] for p in padded], dtype=object if k != "status" else np.uint8)
                for k in padded[0]}
        s, i = self._shard_rows[feature], 0
        while i < len(padded):
            shard = (start + i) // s
            j = min(len(padded), (shard + 1) * s - start)
            self._staging.put(feature, shard, start + i, data["status"][i:j], {k: v[i:j] for k, v in data.items()})
            i = j

    def pack_ready(self, feature: str | None = None, *, partial: bool = False) -> int:
        """Pack every shard whose rows are all final (OK/ABSENT/FAILED) into the sharded arrays; returns shards packed.

        Safe to call from any number of processes at any time (one packer per shard, by lock; a crash midway is
        repaired by the next call). `partial=True` also packs shards that still have PENDING rows (end of a run,
        before xarray/dask reads). Read-only and v1 stores raise StoreError: they cannot be written.
        """
        return _pack.pack_ready(self, feature, partial)

    def shard_rows(self, feature: str) -> int:
        """Rows per shard of `feature` (its chunk_rows for a v1 store)."""
        self._check_feature(feature)
        return self._shard_rows[feature] or self._specs[feature].chunk_rows

    def staged_count(self, feature: str) -> int:
        """How many staged (not yet packed) objects `feature` has."""
        self._check_feature(feature)
        return 0 if self._staging is None else self._staging.count(feature)
