"""The staging area of a v2 store: finished rows wait here, one atomic object per write, until their shard is packed.

Key: `.tvr/staging/<feature>/<shard>/<start>-<stop>-<code>-<time_ns>-<rand>.row`, holding rows start..stop of
every array of the feature (a JSON header with dtypes, shapes and strings, then raw bytes; nothing is unpickled). `code` is the
rows' common status (or `x` when they differ), so status scans need only the listing. Objects are written whole
(temp file + rename locally, one PUT on object stores), so a staged object is either complete or absent: the
row-level "status last" rule holds without a separate status write. Unique names mean a rewrite never replaces
an object a packer has already read; the packer deletes exactly the objects it packed (design.md §1).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from store._zarr_io import _gather
from store.schema import StoreError

STAGING_DIR = ".tvr/staging"
SUFFIX = ".row"


@dataclass(frozen=True)
class Staged:
    """One staged object: rows start..stop of one feature, written at time_ns."""

    shard: int
    start: int
    stop: int
    code: int  # common status of its rows, -1 when mixed
    time_ns: int
    key: str

    @property
    def order(self) -> tuple[int, str]:
        return self.time_ns, self.key


_MAGIC = b"TVRSTAGE1\n"


def encode(data: dict[str, np.ndarray]) -> list[Any]:
    """Serialise a block of rows (arrays name -> (n, ...)) as byte parts: magic, JSON header (with the strings), buffers."""
    head: dict[str, Any] = {}
    bufs, offset = [], 0
    for k, v in data.items():
        a = np.asarray(v)
        if a.dtype == object or a.dtype.kind in "UT":
            head[k] = {"str": [str(x) for x in a.tolist()]}
            continue
        a = np.ascontiguousarray(a)
        head[k] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
        bufs.append(a.data.cast("B") if a.nbytes else b"")
        offset += a.nbytes
    header = json.dumps(head).encode()
    return [_MAGIC, len(header).to_bytes(8, "little"), header, *bufs]  # parts: written without joining


def decode(raw: bytes, where: str) -> dict[str, np.ndarray]:
    """Inverse of `encode`; a damaged object is a StoreError naming it and the fix."""
    try:
        if not raw.startswith(_MAGIC):
            raise ValueError("not a tvr staged object")
        n = int.from_bytes(raw[len(_MAGIC):len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8 + n
        head = json.loads(raw[len(_MAGIC) + 8:start])
        out = {}
        for k, h in head.items():
            if "str" in h:
                out[k] = np.array(h["str"], dtype=object)
                continue
            lo = start + h["offset"]
            if lo + h["nbytes"] > len(raw):
                raise ValueError(f"array '{k}' is truncated")
            out[k] = np.frombuffer(raw, dtype=np.dtype(h["dtype"]), count=int(np.prod(h["shape"], dtype=np.int64)),
                                   offset=lo).reshape(h["shape"])
        return out
    except Exception as e:
        raise StoreError(f"staged object {where} is unreadable ({e}); delete it (its rows become PENDING again) "
                         "and re-run extraction") from e


def parse_name(shard: int, name: str, key: str) -> Staged | None:
    """The Staged entry for an object name, or None for anything that is not one (temp files, strays)."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    parts = name[: -len(SUFFIX)].split("-")
    if len(parts) != 5 or not (parts[0].isdigit() and parts[1].isdigit() and parts[3].isdigit()):
        return None
    code = -1 if parts[2] == "x" else int(parts[2]) if parts[2].isdigit() else None
    if code is None:
        return None
    return Staged(shard, int(parts[0]), int(parts[1]), code, int(parts[3]), key)


class Staging:
    """Put, list, read and delete staged objects of one store (local directory or any zarr store)."""

    def __init__(self, zstore: Any, local_root: Path | None) -> None:
        self._store, self._root = zstore, local_root
        self._made: set[Path] = set()  # staging folders this process made (skips a mkdir per row)

    def _prefix(self, feature: str, shard: int | None = None) -> str:
        return f"{STAGING_DIR}/{feature}" + (f"/{shard}" if shard is not None else "")

    def put(self, feature: str, shard: int, start: int, status: np.ndarray, data: dict[str, np.ndarray]) -> str:
        """Stage rows start..start+n (all inside `shard`); returns the object key."""
        codes = np.unique(status)
        code = str(int(codes[0])) if len(codes) == 1 else "x"
        name = f"{start}-{start + len(status)}-{code}-{time.time_ns()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        key = f"{self._prefix(feature, shard)}/{name}"
        body = encode(data)
        if self._root is not None:
            folder = self._root / self._prefix(feature, shard)
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            for attempt in range(20):
                if folder not in self._made:
                    folder.mkdir(parents=True, exist_ok=True)
                    self._made.add(folder)
                try:
                    with open(tmp, "wb") as f:
                        f.writelines(body)
                    os.replace(tmp, folder / name)  # atomic: readers see the whole object or nothing
                    break
                except FileNotFoundError:  # a packer removed the (empty) folder meanwhile: make it again
                    self._made.discard(folder)
                    if attempt == 19:
                        raise
        else:
            sync(self._store.set(key, default_buffer_prototype().buffer.from_bytes(b"".join(body))))
        return key

    def _ls(self, prefix: str) -> list[str]:
        if self._root is not None:
            try:
                return os.listdir(self._root / prefix)
            except (FileNotFoundError, NotADirectoryError):
                return []

        async def run() -> list[str]:
            return [k async for k in self._store.list_dir(prefix)]

        return sync(run())

    def shards(self, feature: str) -> list[int]:
        """Shards of `feature` that have a staging folder (prefix)."""
        return sorted(int(n) for n in self._ls(self._prefix(feature)) if n.isdigit())

    def list(self, feature: str, shard: int | None = None) -> list[Staged]:
        """Staged objects of `feature` (of one shard, or all), oldest first."""
        out: list[Staged] = []
        for s in ([shard] if shard is not None else self.shards(feature)):
            prefix = self._prefix(feature, s)
            for name in self._ls(prefix):
                e = parse_name(s, name, f"{prefix}/{name}")
                if e is not None:
                    out.append(e)
        return sorted(out, key=lambda e: e.order)

    def read(self, entries: list[Staged]) -> list[dict[str, np.ndarray]]:
        """Decode several staged objects (one batched round trip on object stores)."""
        if self._root is not None:
            raws = []
            for e in entries:
                try:
                    raws.append((self._root / e.key).read_bytes())
                except FileNotFoundError:
                    raws.append(None)  # packed and removed since it was listed
        else:
            proto = default_buffer_prototype()
            bufs = sync(_gather([self._store.get(e.key, prototype=proto) for e in entries]))
            raws = [None if b is None else b.to_bytes() for b in bufs]
        return [{} if r is None else decode(r, e.key) for e, r in zip(entries, raws)]

    def delete(self, entries: list[Staged]) -> None:
        """Remove packed objects, then their shard folder when it is empty (local)."""
        if self._root is not None:
            folders = set()
            for e in entries:
                (self._root / e.key).unlink(missing_ok=True)
                folders.add((self._root / e.key).parent)
            for d in folders:
                for p in (d, d.parent, d.parent.parent, d.parent.parent.parent):
                    try:
                        p.rmdir()  # only succeeds when empty: a concurrent writer's new object keeps it
                    except OSError:
                        break
        else:
            sync(_gather([self._store.delete(e.key) for e in entries]))

    def count(self, feature: str) -> int:
        """Number of staged objects of `feature`."""
        return len(self.list(feature))
