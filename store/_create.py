"""Store creation helpers: record checks, atomic local creation, and removal of only tvr's own temp folders."""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from store._lock import _pid_alive
from store.common import is_url
from store.schema import CaptionRecord, ItemRecord, StoreError

PARTIAL_MARKER = ".tvr-partial"  # written first into every temp folder tvr creates; only such folders are removed


class StoreExistsError(StoreError):
    """The store already exists (possibly created by another process at the same moment)."""


def now() -> str:
    """ISO UTC time, seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_local(url: str | os.PathLike) -> bool:
    """True for plain paths (and PathLikes), False for URLs."""
    return not is_url(url)


def open_kwargs(url: str | os.PathLike, storage_options: Mapping[str, object] | None) -> dict[str, object]:
    """zarr.open_group keywords for `url`: URL stores never serve cached listings (other processes stage rows,
    pack shards and add feature groups at any time; fsspec's listing cache would hide them), then the caller's.

    Plain paths take none (zarr refuses them there): a run config's options for an object store must not break
    the same config pointed at a local store.
    """
    if is_local(url):
        return {}
    return {"storage_options": {"use_listings_cache": False, **dict(storage_options or {})}}


def check_records(items: Sequence[ItemRecord], captions: Sequence[CaptionRecord],
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


def sweep_partials(target: Path) -> list[Path]:
    """Remove `<target>.partial-*` folders that tvr made in a process of this host that is gone; return them.

    A folder without tvr's marker (a user's `X.zarr.partial-backup`) or whose creator still runs is kept.
    """
    removed = []
    for p in target.parent.glob(f"{target.name}.partial-*"):
        try:
            mark = json.loads((p / PARTIAL_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if mark.get("host") == socket.gethostname() and not _pid_alive(int(mark.get("pid", -1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def create_local_atomic(target: Path, build: Callable[[Path], None]) -> None:
    """Build a store in a marked temp folder next to `target`, then rename it into place in one step.

    A crash leaves only the marked temp folder (swept by the next creation); losing a creation race raises
    StoreExistsError after removing our own temp folder.
    """
    sweep_partials(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        build(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails when target is a non-empty folder (someone else won)
        except OSError as e:
            raise StoreExistsError(
                f"{target} already exists: another process created it while this one was creating it ({e}); "
                "open it with FeatureStore.open(path, 'r+') (tvr-extract does so when rerun)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: it carries our marker
        raise
    (target / PARTIAL_MARKER).unlink(missing_ok=True)
