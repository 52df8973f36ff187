"""Low-level Zarr I/O behind FeatureStore: raw metadata reads, batched async gets/sets, fast status scans."""
from __future__ import annotations

import asyncio
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from store.schema import STR_DTYPE, StoreError


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def _looks_like_tvr(p: Path) -> bool:
    try:
        return "tvr_store" in json.loads((p / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _dtype_ok(a: zarr.Array, dtype: str) -> bool:
    return a.dtype.kind in "OTU" if dtype == STR_DTYPE else a.dtype == np.dtype(dtype)


def _check_dims(url: str, name: str, a: zarr.Array, dims: tuple[str, ...]) -> None:
    got = tuple(a.metadata.dimension_names or ()) if a.metadata.zarr_format == 3 else ()
    if got != tuple(dims):
        raise StoreError(f"{url}: array '{name}' has dimension_names {got or None}, expected {tuple(dims)} "
                         "(xarray needs them); recreate the store with tvr")


def _listdir(store: Any, prefix: str) -> list[str]:
    async def run() -> list[str]:
        return [k async for k in store.list_dir(prefix)]

    return sync(run())


def _get_json(store: Any, key: str) -> dict[str, Any] | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    if buf is None:
        return None
    try:
        return json.loads(buf.to_bytes())
    except ValueError:
        return {"unparseable": True}


def _set_all(arrays: Mapping[str, zarr.Array], sel: slice, data: Mapping[str, np.ndarray]) -> None:
    """Write several arrays' rows concurrently (one event-loop round trip)."""
    sync(_gather([arrays[k].async_array.setitem(sel, v) for k, v in data.items()]))


async def _gather(coros: list[Any]) -> list[Any]:
    """Gather inside zarr's event loop (asyncio.gather outside it binds the wrong loop)."""
    return list(await asyncio.gather(*coros))


async def _get(a: zarr.Array, sel: slice | np.ndarray) -> Any:
    if isinstance(sel, slice):
        return await a.async_array.getitem(sel)
    return await a.async_array.get_orthogonal_selection((sel,))


def _status_folder(a: zarr.Array) -> Path | None:
    """Folder of an uncompressed uint8 status array's chunk files in a local store, or None (use zarr)."""
    store, meta = a.store_path.store, a.metadata
    enc = getattr(meta, "chunk_key_encoding", None)
    if not (isinstance(store, LocalStore) and meta.zarr_format == 3 and len(meta.codecs) == 1
            and isinstance(meta.codecs[0], BytesCodec) and a.dtype == np.uint8 and a.fill_value == 0
            and getattr(enc, "name", "") == "default" and getattr(enc, "separator", "") == "/"):
        return None
    return Path(store.root) / a.path / "c"


def _fast_status(a: zarr.Array) -> np.ndarray | None:
    """Read an uncompressed uint8 status array of a local store straight from its chunk files, or None."""
    folder = _status_folder(a)
    if folder is None:
        return None
    total, per = a.shape[0], a.chunks[0]
    nchunks = -(-total // per)
    out = np.zeros((nchunks, per), dtype=np.uint8)
    try:
        names = [n for n in os.listdir(folder) if n.isdigit()]  # skips zarr's '<n>.<uuid>.partial' temp files
    except FileNotFoundError:
        return out.reshape(-1)[:total]
    idx = np.fromiter((int(n) for n in names), dtype=np.int64, count=len(names))
    buf = bytearray()
    for n in names:
        with open(folder / n, "rb") as f:
            chunk = f.read()
        if len(chunk) != per:
            return None
        buf += chunk
    keep = idx < nchunks
    out[idx[keep]] = np.frombuffer(bytes(buf), dtype=np.uint8).reshape(-1, per)[keep]
    return out.reshape(-1)[:total]


@contextmanager
def _quiet_members() -> Iterator[None]:
    """Hide zarr's warning about tvr's own non-zarr folders (.tvr/ staging and locks) while listing members."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not recognized as a component of a Zarr hierarchy")
        yield
