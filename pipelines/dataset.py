"""Read a dataset source (a folder or a CSV/JSONL manifest) into item and caption records.

Manifest formats (paths are relative to the manifest's folder; absolute paths and URLs are kept as given):

* JSONL (``.jsonl``): one object per line with ``id``, ``path`` and optional ``split``, ``kind``,
  ``captions`` (a list of strings) or ``caption`` (one string). Every id appears once.
* CSV (``.csv``): a header with ``id`` and ``path`` and optional ``split``, ``kind``, ``caption``, ``captions``.
  Several captions per item: repeat the row with the same id (same path/split/kind), one ``caption`` each,
  and/or put several captions in one ``captions`` cell separated by ``|``.

A folder is searched recursively for video and image files by extension; an item's id is its path relative to the
folder with forward slashes. Folders carry no captions.

Caption ids are ``<item id>#<k>`` with k counting the item's captions from 0 in manifest order.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from store.schema import KINDS, SPLITS, CaptionRecord, ItemRecord

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp", ".ogv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CSV_CAPTION_SEP = "|"


class DatasetError(Exception):
    """A dataset source cannot be used; the message names the file, the problem and the fix."""


@dataclass
class Dataset:
    """Items and captions read from one source, plus the ids whose files do not exist."""

    source: str
    items: list[ItemRecord]
    captions: list[CaptionRecord] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # item ids whose local file does not exist


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths (left for the decoder to open)."""
    return "://" in path


def kind_from_path(path: str) -> str:
    """``"image"`` for image extensions, else ``"video"``."""
    return "image" if path.lower().endswith(IMAGE_EXTS) else "video"


def read_source(source: str | os.PathLike[str]) -> Dataset:
    """Read a folder, ``.csv`` or ``.jsonl`` manifest; raise DatasetError on anything unusable."""
    src = Path(source)
    if src.is_dir():
        return _read_folder(src)
    if not src.exists():
        raise DatasetError(f"dataset source {str(src)!r} does not exist: give a folder of videos/images or a "
                           f"manifest file (.csv or .jsonl)")
    suffix = src.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(src)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _read_jsonl(src)
    else:
        raise DatasetError(f"manifest {str(src)!r}: unknown format {suffix!r}; use a .csv or .jsonl manifest or a folder")
    return _build(str(src), src.resolve().parent, rows, allow_repeats=suffix == ".csv")


def _read_folder(root: Path) -> Dataset:
    """Every video/image file under `root`, sorted by id."""
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            low = name.lower()
            if not low.endswith(VIDEO_EXTS + IMAGE_EXTS):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            items.append(ItemRecord(id=rel, path=str(full.resolve()), kind=kind_from_path(name)))
    if not items:
        raise DatasetError(f"folder {str(root)!r} contains no video ({', '.join(VIDEO_EXTS)}) or image "
                           f"({', '.join(IMAGE_EXTS)}) files; point SOURCE at the dataset folder or a manifest")
    items.sort(key=lambda r: r.id)
    return Dataset(source=str(root), items=items)


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """Rows of a CSV manifest as (line number, dict with list-valued 'captions')."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if "id" not in header or "path" not in header:
                raise DatasetError(f"manifest {str(path)!r}: CSV header must contain 'id' and 'path' columns, "
                                   f"got {header}")
            rows = []
            for lineno, raw in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "") for k, v in raw.items() if k is not None}
                caps = [c.strip() for c in row.pop("captions", "").split(CSV_CAPTION_SEP) if c.strip()]
                cap = row.pop("caption", "").strip()
                if cap:
                    caps.append(cap)
                row["captions"] = caps
                rows.append((lineno, row))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"manifest {str(path)!r}: not a readable UTF-8 CSV file ({e})") from e
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Rows of a JSONL manifest as (line number, dict)."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"manifest {str(path)!r}: not a UTF-8 text file ({e})") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"manifest {str(path)!r} line {lineno}: invalid JSON ({e.msg}); each line must be "
                               f"one object like {{\"id\": ..., \"path\": ...}}") from e
        if not isinstance(obj, dict):
            raise DatasetError(f"manifest {str(path)!r} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        caps = obj.get("captions", [])
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DatasetError(f"manifest {str(path)!r} line {lineno}: 'captions' must be a list of strings")
        if isinstance(obj.get("caption"), str):
            caps = caps + [obj["caption"]]
        row = {k: obj[k] for k in ("id", "path", "split", "kind") if k in obj}
        row["captions"] = [c.strip() for c in caps if c.strip()]
        rows.append((lineno, row))
    return rows


def _build(source: str, base: Path, rows: list[tuple[int, dict]], *, allow_repeats: bool) -> Dataset:
    """Validate rows, resolve paths, merge repeated CSV rows, and collect missing files."""
    if not rows:
        raise DatasetError(f"manifest {source!r} has no rows; add one line per video/image")
    items: dict[str, ItemRecord] = {}
    first_line: dict[str, int] = {}
    caps: dict[str, list[str]] = {}
    for lineno, row in rows:
        where = f"manifest {source!r} line {lineno}"
        item_id = str(row.get("id", "")).strip() if row.get("id") is not None else ""
        raw_path = str(row.get("path", "") or "").strip()
        if not item_id:
            raise DatasetError(f"{where}: empty or missing 'id'")
        if not raw_path:
            raise DatasetError(f"{where}: item {item_id!r} has an empty or missing 'path'")
        path = raw_path if is_url(raw_path) or os.path.isabs(raw_path) else str((base / raw_path).resolve())
        kind = str(row.get("kind", "") or "").strip() or kind_from_path(raw_path)
        split = str(row.get("split", "") or "").strip()
        if kind not in KINDS:
            raise DatasetError(f"{where}: kind {kind!r} of item {item_id!r} must be one of {KINDS}")
        if split not in SPLITS:
            raise DatasetError(f"{where}: split {split!r} of item {item_id!r} must be one of {SPLITS}")
        try:
            rec = ItemRecord(id=item_id, path=path, kind=kind, split=split)
        except ValueError as e:
            raise DatasetError(f"{where}: {e}") from e
        if item_id in items:
            same = items[item_id] == rec
            if not (allow_repeats and same):
                raise DatasetError(
                    f"{where}: duplicate item id {item_id!r} (first on line {first_line[item_id]}); ids must be "
                    f"unique" + ("; repeated CSV rows for more captions must repeat the same path, split and kind"
                                 if allow_repeats else ""))
        else:
            items[item_id] = rec
            first_line[item_id] = lineno
            caps[item_id] = []
        caps[item_id].extend(row.get("captions", []))
    captions = [CaptionRecord(id=f"{iid}#{k}", item=iid, text=t) for iid, texts in caps.items()
                for k, t in enumerate(texts)]
    missing = [r.id for r in items.values() if not is_url(r.path) and not os.path.isfile(r.path)]
    return Dataset(source=source, items=list(items.values()), captions=captions, missing=missing)
