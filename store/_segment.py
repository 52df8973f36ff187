"""Append-only staging segments of a local store: one file per writer and shard, length + crc32c framed records.

A writer (one FeatureStore in one process) appends each staged row block of a shard to its own segment
`.tvr/staging/<feature>/<shard>/<time_ns>-<rand>.seg`: one writev under an exclusive flock, no file opened or
renamed per row. A record is a fixed prefix (magic, crc32c of the body, body length, rows, status code, time)
and the body (`_staging.encode`). It counts only once all its bytes are in the file, so a writer killed midway
leaves a truncated tail that every reader ignores (those rows stay as they were: status is effectively last).
A failed append is cut back off and its segment takes no more records: a partial record is only ever the last.

A packer flocks every segment of the shard (waiting out at most one append each), reads them, commits the shard
and deletes them while still holding the locks, so no append falls between its read and its delete; a writer
that finds its segment deleted (st_nlink == 0 under the lock) starts a new one. This needs flock and unlink
semantics that network file systems do not give reliably (NFS renames a deleted open file instead of removing
it, and caches attributes), so segments are used only on local file systems (`segments_ok`); shared file
systems and object stores stage one whole file or object per write instead (store/_staging.py).
"""
from __future__ import annotations

import fcntl
import os
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from store.schema import StoreError

SEG_SUFFIX = ".seg"
MAGIC = b"TVR2"
PREFIX = struct.Struct("<4sIQqqB3xQ")  # magic, crc32c(body), body bytes, start, stop, code (255: mixed), time_ns
MIXED = 255
MAX_OPEN = 16  # segments one writer keeps open (least recently used closed first: bounded file descriptors)
_IOV_MAX = 1024
# file systems where flock, st_nlink and unlink behave as on one machine; anything else (nfs, cifs, lustre, fuse)
# stages one atomically renamed file per write
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "jfs", "reiserfs",
                      "bcachefs", "ramfs"})


def segments_ok(root: Path) -> bool:
    """Whether `root` lies on a local file system (the mount with the longest matching path in /proc/mounts);
    `TVR_STAGING=files` forces one file per write (a shared file system that looks local)."""
    if os.environ.get("TVR_STAGING") == "files":
        return False
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False  # not Linux: stay with one file per write
    path, best, fstype = os.path.realpath(root), -1, ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best:
            best, fstype = len(mnt), parts[2]
    return fstype in LOCAL_FS


def _crc(parts: Sequence[Any]) -> int:
    crc = 0
    for p in parts:
        a = np.frombuffer(p, dtype=np.uint8)
        a.flags.writeable = False  # google_crc32c takes read-only buffers only (no copy this way)
        crc = google_crc32c.extend(crc, a)
    return crc


def frame(parts: Sequence[Any], start: int, stop: int, code: int) -> list[Any]:
    """A record: its prefix, then the body parts (written with one writev, never joined)."""
    body = [memoryview(p).cast("B") for p in parts]
    size = sum(len(b) for b in body)
    prefix = PREFIX.pack(MAGIC, _crc(body), size, start, stop, MIXED if code < 0 else code, time.time_ns())
    return [prefix, *body]


def _write_all(fd: int, parts: list[Any]) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0], n = views[0][n:], 0


class SegmentWriter:
    """This process's open segments in one store's staging area."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._open: OrderedDict[str, tuple[int, str]] = OrderedDict()  # shard folder -> (fd, segment name)
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"_root": self._root}  # descriptors mean nothing in another process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_root"])  # type: ignore[misc]

    def __del__(self) -> None:
        try:
            for rel in list(self._open):
                self._close(rel)
        except Exception:  # interpreter shutdown: the OS closes them anyway
            pass

    def _close(self, rel: str) -> None:
        fd, _ = self._open.pop(rel)
        os.close(fd)  # also releases our flock

    def _segment(self, rel: str) -> tuple[int, str]:
        """The open segment for shard folder `rel` (a new file when there is none)."""
        if os.getpid() != self._pid:  # a forked child: the parent's descriptors share its locks, use our own
            self._open.clear()
            self._pid = os.getpid()
        if rel in self._open:
            self._open.move_to_end(rel)
            return self._open[rel]
        folder = self._root / rel
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}{SEG_SUFFIX}"
        for attempt in range(20):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
                break
            except FileNotFoundError:  # a packer removed the (empty) folder meanwhile: make it again
                if attempt == 19:
                    raise
        self._open[rel] = (fd, name)
        while len(self._open) > MAX_OPEN:
            self._close(next(iter(self._open)))
        return fd, name

    def append(self, rel: str, record: list[Any]) -> str:
        """Append one framed record to this writer's segment of shard folder `rel`; returns `<key>@<offset>`."""
        for _ in range(100):
            fd, name = self._segment(rel)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                break
            self._close(rel)  # a packer consumed and deleted it: start a new segment
        else:
            raise StoreError(f"{self._root / rel}: staging segments keep being deleted under this writer; is "
                             "another tool clearing .tvr/staging while extraction runs?")
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, record)
        except BaseException:
            try:
                os.ftruncate(fd, end)  # best effort: a partial record must never precede a later one ...
            except OSError:
                pass
            self._close(rel)  # ... so this segment takes no more records either way
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return f"{rel}/{name}@{end}"


def records(fd: int, where: str, start_at: int = 0) -> list[tuple[int, int, int, int, int, int]]:
    """Complete records of an open segment from byte `start_at`: (offset, size, start, stop, code, time_ns)."""
    size, off, out = os.fstat(fd).st_size, start_at, []
    while off + PREFIX.size <= size:
        magic, _, n, start, stop, code, t = PREFIX.unpack(os.pread(fd, PREFIX.size, off))
        if magic != MAGIC:
            raise StoreError(f"staging segment {where} is damaged at byte {off} (no record starts there); delete "
                             "it (its rows become PENDING again) and re-run extraction")
        if off + PREFIX.size + n > size:
            break  # being written right now, or cut short by a crash: not a finished row
        out.append((off, PREFIX.size + n, start, stop, -1 if code == MIXED else code, t))
        off += PREFIX.size + n
    return out


def body(fd: int, offset: int, size: int, where: str) -> memoryview:
    """The body of the record at `offset`, its checksum checked."""
    raw = os.pread(fd, size, offset)
    magic, crc, n, *_ = PREFIX.unpack_from(raw)
    data = memoryview(raw)[PREFIX.size:]  # read-only view: no copy of the body
    if magic != MAGIC or len(data) != n or _crc([data]) != crc:
        raise StoreError(f"staging segment {where}: the record at byte {offset} fails its checksum (damaged "
                         "file); delete the segment (its rows become PENDING again) and re-run extraction")
    return data


def open_locked(path: Path) -> int | None:
    """A read descriptor of segment `path` holding its exclusive flock (waits out an append), or None if gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
