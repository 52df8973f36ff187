"""The staging area of a v2 store: finished rows wait here until their shard is packed.

Local stores: each writer appends its rows to its own segment file per shard,
`.tvr/staging/<feature>/<shard>/<time_ns>-<rand>.seg`, as length + crc32c framed records (store/_segment.py):
one writev per write, no file opened or renamed per row; a record counts only once complete.
Object stores: one object per write, `.tvr/staging/<feature>/<shard>/<start>-<stop>-<code>-<time_ns>-<rand>.row`
(written whole by one PUT); `code` is the rows' common status (or `x` when they differ), so status scans need
only the listing. Local stores written by older tvr may hold `.row` files too; both kinds are read and packed.
A staged block holds rows start..stop of every array of the feature (a JSON header with dtypes, shapes and
strings, then raw bytes; nothing is unpickled), so the row-level "status last" rule holds without a separate
status write. The newest record of a row wins (time, then key, then offset).

A pack consumes a shard's staging through a `Claim`: it reads everything staged for the shard, commits the shard,
then deletes what it read. When that is more than one file, a marker `packed-<time_ns>-<rand>.json` naming each
file (and, for segments, the bytes consumed) is written first: a crash midway through the deletions then never
lets an older record be applied again over newer packed rows, and records appended after the consumed bytes
(a live writer, after the packer died) still count (design.md §1).
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

from store import _segment
from store._segment import SEG_SUFFIX
from store._zarr_io import _gather
from store.schema import StoreError

STAGING_DIR = ".tvr/staging"
SUFFIX = ".row"
MARKER = "packed-"  # + <time_ns>-<rand>.json: what a pack consumed, while it deletes it


@dataclass(frozen=True)
class Staged:
    """One staged block: rows start..stop of one feature, written at time_ns (a .row object or a segment record)."""

    shard: int
    start: int
    stop: int
    code: int  # common status of its rows, -1 when mixed
    time_ns: int
    key: str  # the object or segment file
    offset: int = -1  # segment records: byte offset of the record in its segment; -1 for .row objects
    size: int = 0  # segment records: bytes of the record

    @property
    def order(self) -> tuple[int, str, int]:
        return self.time_ns, self.key, self.offset


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


def decode(raw: bytes | memoryview, where: str) -> dict[str, np.ndarray]:
    """Inverse of `encode`; a damaged object is a StoreError naming it and the fix."""
    try:
        if bytes(raw[:len(_MAGIC)]) != _MAGIC:
            raise ValueError("not a tvr staged object")
        n = int.from_bytes(raw[len(_MAGIC):len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8 + n
        head = json.loads(bytes(raw[len(_MAGIC) + 8:start]))
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


def _code(status: np.ndarray) -> int:
    """The rows' common status code, -1 when they differ."""
    first = int(status[0])
    return first if len(status) == 1 or bool((status == first).all()) else -1


class Staging:
    """Put, list, read and consume staged rows of one store (local directory or any zarr store)."""

    def __init__(self, zstore: Any, local_root: Path | None) -> None:
        self._store, self._root = zstore, local_root
        local_fs = local_root is not None and _segment.segments_ok(local_root)
        self._writer = _segment.SegmentWriter(local_root) if local_fs and local_root is not None else None

    def _prefix(self, feature: str, shard: int | None = None) -> str:
        return f"{STAGING_DIR}/{feature}" + (f"/{shard}" if shard is not None else "")

    def put(self, feature: str, shard: int, start: int, status: np.ndarray, data: dict[str, np.ndarray]) -> str:
        """Stage rows start..start+n (all inside `shard`); returns where (object key, or segment key@offset)."""
        code, stop = _code(status), start + len(status)
        if self._writer is not None:
            return self._writer.append(self._prefix(feature, shard), _segment.frame(encode(data), start, stop, code))
        name = f"{start}-{stop}-{'x' if code < 0 else code}-{time.time_ns()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        key = f"{self._prefix(feature, shard)}/{name}"
        if self._root is not None:
            self._put_file(self._root / self._prefix(feature, shard), name, encode(data))
        else:
            sync(self._store.set(key, default_buffer_prototype().buffer.from_bytes(b"".join(encode(data)))))
        return key

    @staticmethod
    def _put_file(folder: Path, name: str, body: list[Any]) -> None:
        """One staged file on a shared file system: temp file + rename, so readers see it whole or not at all."""
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        for attempt in range(20):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.writelines(body)
                os.replace(tmp, folder / name)
                return
            except FileNotFoundError:  # a packer removed the (empty) folder meanwhile: make it again
                if attempt == 19:
                    raise

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

    def _consumed(self, prefix: str, names: list[str]) -> dict[str, int]:
        """File name -> bytes already packed (0 for a whole .row object), from the markers among `names`."""
        out: dict[str, int] = {}
        for n in names:
            if not (n.startswith(MARKER) and n.endswith(".json")):
                continue
            if self._root is not None:
                try:
                    raw: bytes | None = (self._root / prefix / n).read_bytes()
                except FileNotFoundError:
                    raw = None
            else:
                buf = sync(self._store.get(f"{prefix}/{n}", prototype=default_buffer_prototype()))
                raw = None if buf is None else buf.to_bytes()
            if raw is None:
                continue  # its pack finished meanwhile
            for name, end in json.loads(raw)["consumed"].items():
                out[name] = max(out.get(name, 0), int(end))
        return out

    def _entries(self, shard: int, prefix: str, names: list[str],
                 fds: dict[str, int] | None = None) -> list[Staged]:
        """Live staged blocks of one shard folder holding `names` (segment descriptors from `fds` when given)."""
        consumed = self._consumed(prefix, names) if any(n.startswith(MARKER) for n in names) else {}
        out: list[Staged] = []
        for n in names:
            key = f"{prefix}/{n}"
            if n.endswith(SEG_SUFFIX) and self._root is not None:
                if fds is not None:
                    recs = _segment.records(fds[n], key, consumed.get(n, 0)) if n in fds else []
                else:
                    try:
                        fd = os.open(self._root / key, os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        continue  # packed and removed since the listing
                    try:
                        recs = _segment.records(fd, key, consumed.get(n, 0))
                    finally:
                        os.close(fd)
                out += [Staged(shard, a, b, c, t, key, off, size) for off, size, a, b, c, t in recs]
            elif n not in consumed:
                e = parse_name(shard, n, key)
                if e is not None:
                    out.append(e)
        return out

    def by_shard(self, feature: str) -> dict[int, list[Staged]]:
        """Staged blocks of `feature` per shard folder, oldest first ([] for a folder holding only leftovers)."""
        out = {}
        for s in self.shards(feature):
            prefix = self._prefix(feature, s)
            out[s] = sorted(self._entries(s, prefix, self._ls(prefix)), key=lambda e: e.order)
        return out

    def list(self, feature: str, shard: int | None = None) -> list[Staged]:
        """Staged blocks of `feature` (of one shard, or all), oldest first."""
        if shard is None:
            out = [e for es in self.by_shard(feature).values() for e in es]
        else:
            prefix = self._prefix(feature, shard)
            out = self._entries(shard, prefix, self._ls(prefix))
        return sorted(out, key=lambda e: e.order)

    def read(self, entries: list[Staged], fds: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
        """Decode staged blocks; {} for one packed and removed since it was listed (one round trip on object stores)."""
        if self._root is None:
            proto = default_buffer_prototype()
            bufs = sync(_gather([self._store.get(e.key, prototype=proto) for e in entries]))
            return [{} if b is None else decode(b.to_bytes(), e.key) for e, b in zip(entries, bufs)]
        out: list[dict[str, np.ndarray]] = []
        opened: dict[str, int | None] = {}
        try:
            for e in entries:
                if e.offset < 0:
                    try:
                        out.append(decode((self._root / e.key).read_bytes(), e.key))
                    except FileNotFoundError:
                        out.append({})
                    continue
                name = e.key.rsplit("/", 1)[1]
                fd = fds.get(name) if fds is not None else None
                if fd is None:
                    if e.key not in opened:
                        try:
                            opened[e.key] = os.open(self._root / e.key, os.O_RDONLY | os.O_CLOEXEC)
                        except FileNotFoundError:
                            opened[e.key] = None
                    fd = opened[e.key]
                out.append({} if fd is None else decode(_segment.body(fd, e.offset, e.size, e.key), e.key))
        finally:
            for fd in opened.values():
                if fd is not None:
                    os.close(fd)
        return out

    def claim(self, feature: str, shard: int) -> Claim:
        """Everything staged for one shard, held for a pack (call under the shard's pack lock)."""
        return Claim(self, feature, shard)

    def count(self, feature: str) -> int:
        """Number of staged blocks of `feature`."""
        return len(self.list(feature))


class Claim:
    """One shard's staging, held by its packer: segments flocked (no append in between) until `consume`/`close`."""

    def __init__(self, staging: Staging, feature: str, shard: int) -> None:
        self._st, self.prefix = staging, staging._prefix(feature, shard)
        root = staging._root
        self.names = staging._ls(self.prefix)
        self.fds: dict[str, int] = {}
        try:
            for n in self.names:
                if n.endswith(SEG_SUFFIX) and root is not None:
                    fd = _segment.open_locked(root / self.prefix / n)
                    if fd is not None:
                        self.fds[n] = fd
            self.entries = sorted(staging._entries(shard, self.prefix, self.names, self.fds), key=lambda e: e.order)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the segments (closing a descriptor drops its flock)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def read(self, entries: list[Staged]) -> list[dict[str, np.ndarray]]:
        """Decode claimed blocks."""
        return self._st.read(entries, self.fds)

    def consume(self) -> None:
        """Delete everything claimed (after the shard commit): marker first when that is several files."""
        st, root = self._st, self._st._root
        rows = [n for n in self.names if parse_name(0, n, n) is not None]
        markers = [n for n in self.names if (n.startswith(MARKER) and n.endswith(".json"))
                   or (n.startswith(f".{MARKER}") and n.endswith(".tmp"))]  # with a crashed pack's temp files
        files = list(self.fds) + rows
        mine = None
        if len(files) > 1:
            ends = {n: os.fstat(fd).st_size for n, fd in self.fds.items()} | {n: 0 for n in rows}
            mine = f"{MARKER}{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
            self._put(mine, json.dumps({"consumed": ends}).encode())
        rows.sort(key=lambda n: parse_name(0, n, n).order)  # type: ignore[union-attr]
        if root is not None:
            for n in rows + list(self.fds) + markers + ([mine] if mine else []):
                (root / self.prefix / n).unlink(missing_ok=True)
            self.close()
            d = root / self.prefix
            for p in (d, d.parent, d.parent.parent, d.parent.parent.parent):
                try:
                    p.rmdir()  # only succeeds when empty: a concurrent writer's new segment keeps it
                except OSError:
                    break
        else:
            sync(_gather([st._store.delete(f"{self.prefix}/{n}") for n in rows]))
            sync(_gather([st._store.delete(f"{self.prefix}/{n}") for n in markers + ([mine] if mine else [])]))

    def _put(self, name: str, raw: bytes) -> None:
        root = self._st._root
        if root is None:
            sync(self._st._store.set(f"{self.prefix}/{name}", default_buffer_prototype().buffer.from_bytes(raw)))
            return
        tmp = root / self.prefix / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, root / self.prefix / name)  # complete or absent
