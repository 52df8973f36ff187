"""Store locks: a create-only lock object holding its holder's host, pid and time (local files or object stores).

Local stores use `O_CREAT | O_EXCL`, atomic on POSIX file systems (and on NFSv3+). On s3fs the lock object is
written with a conditional PUT (If-None-Match: *), atomic on AWS S3 and servers that implement it; other
object stores use zarr's `set_if_not_exists` and then read the lock back to confirm it is ours, which is not
atomic (two processes racing within the same few milliseconds could both believe they hold it) — documented
in docs/design.md §1.
A lock whose holder runs on this host and no longer exists is stale and is broken automatically.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from store.schema import StoreError

LOCK_DIR = ".tvr/locks"


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """A named lock inside a store: `with StoreLock(store, root, "structure", url=...)`."""

    def __init__(self, zstore: Any, local_root: Path | None, name: str, *, url: str, purpose: str,
                 timeout: float = 120.0, stale_after: float | None = None) -> None:
        self._store, self._root, self.url, self.purpose = zstore, local_root, url, purpose
        self.key = f"{LOCK_DIR}/{name}.lock"
        self.timeout = timeout
        self.stale_after = stale_after  # seconds after which a lock is stale whatever its host (short operations)
        self._token: str | None = None

    # ---- raw create / read / delete ----
    def _create(self, body: bytes) -> bool:
        if self._root is not None:
            path = self._root / self.key
            for attempt in range(20):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    break
                except FileExistsError:
                    return False
                except FileNotFoundError:  # the empty folder was removed in between: make it again
                    if attempt == 19:
                        raise
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        fs, base = getattr(self._store, "fs", None), getattr(self._store, "path", None)
        if fs is not None and base is not None and getattr(fs, "async_impl", False):
            try:  # s3fs: a conditional PUT (If-None-Match: *), atomic on S3 and S3-compatible servers
                sync(fs._pipe_file(f"{base.rstrip('/')}/{self.key}", body, mode="create"))
                return True
            except TypeError:
                pass  # this filesystem has no create-only put: fall back below
            except Exception as e:  # the object exists (412 PreconditionFailed / FileExistsError)
                if isinstance(e, FileExistsError) or "Precondition" in str(e) or "412" in str(e):
                    return False
                raise
        proto = default_buffer_prototype()
        sync(self._store.set_if_not_exists(self.key, proto.buffer.from_bytes(body)))
        held = self.holder()
        return held is not None and held.get("token") == json.loads(body)["token"]

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record, or None when the lock is free."""
        if self._root is not None:
            try:
                raw = (self._root / self.key).read_bytes()
            except FileNotFoundError:
                return None
        else:
            buf = sync(self._store.get(self.key, prototype=default_buffer_prototype()))
            if buf is None:
                return None
            raw = buf.to_bytes()
        try:
            return json.loads(raw)
        except ValueError:
            return {"host": "?", "pid": -1, "time": 0.0, "token": "unreadable"}  # half-written: treat as held

    def _delete(self) -> None:
        if self._root is not None:
            path = self._root / self.key
            path.unlink(missing_ok=True)
            for d in (path.parent, path.parent.parent):  # .tvr/locks, .tvr: gone when empty (zarr warns on them)
                try:
                    d.rmdir()
                except OSError:
                    break
        else:
            sync(self._store.delete(self.key))

    def _stale(self, held: dict[str, Any]) -> bool:
        if self.stale_after is not None and time.time() - float(held.get("time", 0.0)) > self.stale_after:
            return True  # e.g. a pack lock left by a process killed on another host
        return held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1)))

    # ---- public ----
    def try_acquire(self) -> bool:
        """Take the lock without waiting (breaking a stale one); True when we hold it."""
        me = _holder()
        body = json.dumps(me).encode()
        if self._create(body):
            self._token = me["token"]
            return True
        held = self.holder()
        if held is not None and self._stale(held):
            self._delete()  # its process is gone (e.g. kill -9): nobody else can release it
            if self._create(body):
                self._token = me["token"]
                return True
        return False

    def acquire(self) -> None:
        """Take the lock, waiting up to `timeout` seconds; StoreError names the holder and the fix."""
        deadline, pause = time.monotonic() + self.timeout, 0.01
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                held = self.holder() or {}
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("time", 0))))
                raise StoreError(
                    f"{self.url}: the {self.purpose} lock is held by host {held.get('host')} pid {held.get('pid')} "
                    f"since {since}; waited {self.timeout:.0f}s. If that process is still running, wait for it; "
                    f"if it is gone (on another host), delete {self.url}/{self.key} and retry")
            time.sleep(pause)
            pause = min(0.5, pause * 2)

    def release(self) -> None:
        """Drop the lock if we still hold it."""
        if self._token is not None:
            held = self.holder()
            if held is not None and held.get("token") == self._token:
                self._delete()
            self._token = None

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
