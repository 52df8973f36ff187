"""Read a dataset source (a folder or a CSV/JSONL manifest) into item and caption records.

Manifest formats (paths are relative to the manifest's folder; absolute paths and URLs are kept as given):

* JSONL (``.jsonl``): one object per line with ``id``, ``path`` and optional ``split``, ``kind``,
  ``captions`` (a list of strings) or ``caption`` (one string). Every id appears once.
* CSV (``.csv``): a header with ``id`` and ``path`` and optional ``split``, ``kind``, ``caption``, ``captions``.
  Several captions per item: repeat the row with the same id (same path/split/kind), one ``caption`` each,
  and/or put several captions in one ``captions`` cell separated by ``|``.

A folder is searched recursively for video and image files by extension; an item's id is its path relative to the
folder with forward slashes. Folders carry no captions.

Caption ids are ``<item id>#<k>`` with k counting the item's captions from 0 in manifest order. Empty captions
(whitespace only, an empty ``|`` segment, ``""`` in JSONL, or a repeated CSV row with no caption) keep their k and
are dropped: the remaining ids never shift, and ``Dataset.dropped_captions`` names them.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from store.common import is_url
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
    missing: list[str] = field(default_factory=list)  # item ids whose local file cannot be read (see `problems`)
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # item id -> (reason code, message)
    dropped_captions: list[str] = field(default_factory=list)  # ids of empty captions (their k is not reused)


def kind_from_path(path: str) -> str:
    """``"image"`` for image extensions, else ``"video"``."""
    return "image" if path.lower().endswith(IMAGE_EXTS) else "video"


def resolve_path(path: Path) -> str:
    """`path` made absolute with symlinks resolved; a symlink loop leaves it unresolved (`file_problem` reports it)."""
    try:
        return str(path.resolve())
    except (RuntimeError, OSError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        return str(path.absolute())


def file_problem(path: str) -> tuple[str, str] | None:
    """(reason code, message) when a local media path cannot be read as a file, else None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            return "missing_file", f"missing_file: {path} is a symbolic link to a file that does not exist"
        return "missing_file", f"missing_file: file not found: {path}"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink_loop", (f"symlink_loop: {path} is a loop of symbolic links (too many levels); "
                                    f"point the link at the real file or fix the manifest path")
        return "unreadable_file", f"unreadable_file: {path}: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return "is_directory", (f"is_directory: {path} is a directory, not a video or image file; list the files "
                                f"inside it, or pass the folder itself as SOURCE")
    if not stat.S_ISREG(st.st_mode):
        return "not_a_file", f"not_a_file: {path} is not a regular file (device, socket or pipe)"
    return None


def read_source(source: str | os.PathLike[str]) -> Dataset:
    """Read a folder, ``.csv`` or ``.jsonl`` manifest; raise DatasetError on anything unusable."""
    src = Path(source)
    if src.is_dir():
        return _read_folder(src)
    if not src.exists():
        problem = file_problem(str(src)) if os.path.lexists(src) else None  # a dangling link or a link loop
        detail = problem[1].split(": ", 1)[1] if problem else "does not exist"
        raise DatasetError(f"dataset source {str(src)!r}: {detail}; give a folder of videos/images or a "
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
    problems: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):  # never follows directory links, so no walk loops
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            low = name.lower()
            if not low.endswith(VIDEO_EXTS + IMAGE_EXTS):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            path = resolve_path(full)
            items.append(ItemRecord(id=rel, path=path, kind=kind_from_path(name)))
            problem = file_problem(path)  # dangling links and link loops are listed like any file
            if problem is not None:
                problems[rel] = problem
    if not items:
        raise DatasetError(f"folder {str(root)!r} contains no video ({', '.join(VIDEO_EXTS)}) or image "
                           f"({', '.join(IMAGE_EXTS)}) files; point SOURCE at the dataset folder or a manifest")
    items.sort(key=lambda r: r.id)
    return Dataset(source=str(root), items=items, missing=[r.id for r in items if r.id in problems],
                   problems=problems)


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """Rows of a CSV manifest as (line number, dict with list-valued 'captions'; '' marks an empty caption)."""
    try:
        # utf-8-sig: Excel writes "UTF-8 CSV" with a byte-order mark, which would otherwise glue onto 'id'
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if "id" not in header or "path" not in header:
                raise DatasetError(f"manifest {str(path)!r}: CSV header must contain 'id' and 'path' columns, "
                                   f"got {header}")
            rows = []
            for raw in reader:
                lineno = reader.line_num  # the record's last physical line (quoted fields may span lines)
                if None in raw:  # more fields than header columns: an unquoted comma, most likely in a caption
                    raise DatasetError(
                        f"manifest {str(path)!r} line {lineno}: {len(header) + len(raw[None])} fields but the header "
                        f"has {len(header)} ({', '.join(header)}); quote fields that contain commas, e.g. "
                        f"\"a dog, running\"")
                row = {(k or "").strip(): (v or "") for k, v in raw.items()}
                cell = row.pop("captions", "")
                caps = [c.strip() for c in cell.split(CSV_CAPTION_SEP)] if cell.strip() else []
                cap = row.pop("caption", "")
                if cap:  # a wholly empty cell gives no caption; whitespace only is an empty caption
                    caps.append(cap.strip())
                row["captions"] = caps
                rows.append((lineno, row))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"manifest {str(path)!r}: not a readable UTF-8 CSV file ({e})") from e
    return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Rows of a JSONL manifest as (line number, dict)."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")
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
        row["captions"] = [c.strip() for c in caps]  # '' stays: an empty caption keeps its k
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
        path = raw_path if is_url(raw_path) or os.path.isabs(raw_path) else resolve_path(base / raw_path)
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
        row_caps = list(row.get("captions", []))
        if allow_repeats and lineno != first_line[item_id] and not row_caps:
            row_caps = [""]  # a repeated CSV row exists only to add a caption: an empty one keeps its k
        caps[item_id].extend(row_caps)
    captions, dropped = _caption_records(caps)
    problems = {r.id: p for r in items.values() if not is_url(r.path) and (p := file_problem(r.path)) is not None}
    return Dataset(source=source, items=list(items.values()), captions=captions, missing=list(problems),
                   problems=problems, dropped_captions=dropped)


def _caption_records(caps: dict[str, list[str]]) -> tuple[list[CaptionRecord], list[str]]:
    """Caption records `<item>#<k>` numbered over every caption slot, and the ids of the empty (dropped) ones."""
    captions, dropped = [], []
    for iid, texts in caps.items():
        for k, text in enumerate(texts):
            if text:
                captions.append(CaptionRecord(id=f"{iid}#{k}", item=iid, text=text))
            else:
                dropped.append(f"{iid}#{k}")
    return captions, dropped
