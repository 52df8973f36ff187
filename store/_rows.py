"""Row resets and item/caption table updates of a v2 store (FeatureStore.reset_rows / update_items / update_captions).

A reset stages PENDING rows exactly as a write stages finished ones (one block per contiguous run of rows, at
most RESET_BYTES of padded values at a time, whole chunks for chunk_rows > 1), so it is atomic per block and
packed like any write. Table updates reset the dependent rows first and only then write the tables, under the
structural lock: a crash in between leaves rows PENDING for the old entry (redone), never old values marked
done for a new file or text.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from store.schema import FeatureRows, Status, StoreError, pad_row

if TYPE_CHECKING:
    from store.zarr_store import FeatureStore

RESET_BYTES = 32 << 20  # padded values built per staged reset block (bounded memory for any number of rows)
ITEM_COLUMNS = {"path": "item_path", "kind": "item_kind", "split": "item_split", "duration": "item_duration"}
VALUE_COLUMNS = ("path", "kind")  # a feature's values depend on the item's file and kind, not on its split


def _rows(fs: FeatureStore, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """Sorted unique rows, range-checked, widened to whole chunks."""
    idx = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    total, c = fs.n_rows(name), fs.spec(name).chunk_rows
    if len(idx) and (idx[0] < 0 or idx[-1] >= total):
        raise StoreError(f"{fs.url}: feature '{name}': rows to reset must lie in 0:{total}, got "
                         f"{int(idx[0])}..{int(idx[-1])}")
    if c > 1:  # one writer per chunk: reset whole chunks
        idx = np.unique((idx // c)[:, None] * c + np.arange(c)[None, :])
        idx = idx[idx < total]
    return idx


def reset_feature(fs: FeatureStore, name: str, rows: Sequence[int] | np.ndarray) -> int:
    """Stage `rows` of feature `name` as PENDING (no lock taken); returns how many rows were reset."""
    spec, idx = fs.spec(name), _rows(fs, name, rows)
    row_bytes = max(1, int(np.prod(spec.value_shape())) * np.dtype(spec.dtype).itemsize)
    most = max(spec.chunk_rows, RESET_BYTES // row_bytes // spec.chunk_rows * spec.chunk_rows)
    empty = FeatureRows.absent(spec, "")
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(idx) else []
    for run in runs:
        for lo in range(0, len(run), most):
            start = int(run[lo])
            block = []
            for r in range(start, start + min(most, len(run) - lo)):
                p = pad_row(spec, r, empty)
                p.update(status=np.uint8(Status.PENDING), reason="", message="")
                block.append(p)
            fs._commit(name, start, block)
    return len(idx)


def update_items(fs: FeatureStore, rows: Sequence[int] | np.ndarray, columns: Mapping[str, Sequence[object]]) -> int:
    """Write new item table values; rows whose path or kind changes are reset in every item feature first."""
    idx = np.asarray(rows, dtype=np.int64).ravel()
    bad = sorted(set(columns) - set(ITEM_COLUMNS))
    if bad:
        raise StoreError(f"{fs.url}: update_items: unknown item column(s) {bad}; columns are {sorted(ITEM_COLUMNS)}")
    if len(idx) and (idx.min() < 0 or idx.max() >= fs.n_items):
        raise StoreError(f"{fs.url}: update_items: rows must lie in 0:{fs.n_items}")
    new = {c: np.asarray(v, dtype=np.float64 if c == "duration" else object) for c, v in columns.items()}
    for c, v in new.items():
        if v.shape != idx.shape:
            raise StoreError(f"{fs.url}: update_items: column '{c}' has {len(v)} values for {len(idx)} rows")
    table = fs.items()
    stored = {"path": table.path, "kind": table.kind}
    changed = np.zeros(len(idx), bool)
    for c in VALUE_COLUMNS:
        if c in new:
            changed |= np.asarray(stored[c], dtype=object)[idx] != new[c]
    reset = idx[changed]
    if len(reset):
        for name in fs.features:  # status first: a crash before the tables leaves the rows PENDING
            if fs.spec(name).axis == "item":
                reset_feature(fs, name, reset)
    for c, v in new.items():
        if len(idx):
            fs._root[ITEM_COLUMNS[c]].set_orthogonal_selection((idx,), v)
    return len(reset)


def update_captions(fs: FeatureStore, rows: Sequence[int] | np.ndarray, texts: Sequence[str]) -> int:
    """Write new caption texts; the changed rows (their whole chunks) are reset in every caption feature first."""
    idx = np.asarray(rows, dtype=np.int64).ravel()
    new = np.asarray(texts, dtype=object)
    if new.shape != idx.shape:
        raise StoreError(f"{fs.url}: update_captions: {len(new)} texts for {len(idx)} rows")
    if len(idx) and (idx.min() < 0 or idx.max() >= fs.n_captions):
        raise StoreError(f"{fs.url}: update_captions: rows must lie in 0:{fs.n_captions}")
    changed = idx[np.asarray(fs.captions().text, dtype=object)[idx] != new]
    if len(changed):
        for name in fs.features:
            if fs.spec(name).axis == "caption":
                reset_feature(fs, name, changed)
        fs._root["caption_text"].set_orthogonal_selection((idx,), new)
    return len(changed)
