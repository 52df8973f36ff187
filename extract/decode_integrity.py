"""Evidence that a media file is missing data: structure that points past the end of the file.

A file is truncated only when something in it promises bytes that are not there: a Matroska/WebM segment,
an MP4/MOV top-level box or a RIFF (AVI/WAV) chunk larger than the rest of the file, an FLV file that does not
end on a tag boundary, or a container index (MP4 sample table, Matroska cues) pointing past the end. Timestamps
are never compared with durations here: an intact variable-frame-rate file may end seconds after its last frame
starts. Reading costs a few header reads per top-level box (MP4, RIFF) or two small reads (Matroska, FLV).
"""
from __future__ import annotations

import functools
import os
import struct
from typing import Any, BinaryIO

from store.common import is_url

_EBML_ID = b"\x1a\x45\xdf\xa3"
_SEGMENT_ID = b"\x18\x53\x80\x67"
_MP4_TYPES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp", b"moof", b"sidx"}
_MAX_BOXES = 1_000_000  # fragmented MP4s have one moof+mdat pair per fragment; bounded either way


def file_size(path: str) -> int | None:
    """Size of a local file, None for URLs or unreadable paths."""
    if is_url(path):
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def structural_gap(path: str) -> tuple[bool, str | None]:
    """(whether the container's structure could be checked, a sentence saying what is missing or None)."""
    size = file_size(path)
    if size is None:
        return False, None
    try:
        st = os.stat(path)
    except OSError:
        return False, None
    return _structural_cached(path, size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _structural_cached(path: str, size: int, mtime_ns: int) -> tuple[bool, str | None]:
    """`structural_gap` remembered per file version (video and audio decoding both ask)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head.startswith(_EBML_ID):
                return True, _matroska_gap(f, size)
            if head[4:8] in _MP4_TYPES:
                return True, _boxes_gap(f, size)
            if head[:4] in (b"RIFF", b"RF64"):
                return True, _riff_gap(f, size)
            if head.startswith(b"FLV"):
                return True, _flv_gap(f, size)
    except (OSError, struct.error):
        return False, None
    return False, None


def index_gap(container: Any, size: int | None) -> str | None:
    """A sentence when a stream's index (MP4 sample table, Matroska cues) points past the end of the file."""
    if size is None:
        return None
    for s in container.streams:
        try:
            entries = s.index_entries
        except AttributeError:  # PyAV < 15 has no index access
            return None
        end = max((e.pos + max(e.size, 0) for e in entries if e.pos >= 0), default=-1)
        if end > size:
            return f"the {s.type} index points to byte {end} but the file ends at {size}"
    return None


def packet_gap(packet: Any, size: int | None) -> str | None:
    """A sentence when a demuxed packet extends past the end of the file."""
    pos = packet.pos
    if size is not None and pos is not None and pos >= 0 and pos + packet.size > size:
        return f"a {packet.stream.type} packet at byte {pos} needs {packet.size} bytes but the file ends at {size}"
    return None


def _vint(f: BinaryIO) -> tuple[int, int, bool]:
    """One EBML variable-length integer: (value, byte length, all value bits set = unknown size)."""
    first = f.read(1)
    if not first:
        raise EOFError
    b0 = first[0]
    length = next((i + 1 for i in range(8) if b0 & (0x80 >> i)), 0)
    if length == 0:
        raise ValueError("invalid EBML length")
    rest = f.read(length - 1)
    if len(rest) < length - 1:
        raise EOFError
    value = b0 & (0xFF >> length)
    for b in rest:
        value = (value << 8) | b
    return value, length, value == (1 << (7 * length)) - 1


def _matroska_gap(f: BinaryIO, size: int) -> str | None:
    """The Segment's declared size runs past the end (unknown-size segments, as live writers leave, say nothing)."""
    try:
        f.seek(4)
        header_size, _, _ = _vint(f)
        f.seek(header_size, os.SEEK_CUR)
        if f.read(4) != _SEGMENT_ID:
            return None
        seg_size, _, unknown = _vint(f)
    except (EOFError, ValueError):
        return f"the Matroska header is cut off ({size} bytes)"
    if unknown:
        return None
    end = f.tell() + seg_size
    if end > size:
        return f"the Matroska segment declares {end} bytes but the file ends at {size}"
    return None


def _boxes_gap(f: BinaryIO, size: int) -> str | None:
    """A top-level MP4/MOV box whose size runs past the end of the file."""
    pos = 0
    for _ in range(_MAX_BOXES):
        if pos >= size:
            return None
        f.seek(pos)
        hdr = f.read(16)
        if len(hdr) < 8:
            return f"an MP4 box header at byte {pos} is cut off (file ends at {size})"
        box_size, kind = struct.unpack(">I4s", hdr[:8])
        if box_size == 1:
            if len(hdr) < 16:
                return f"an MP4 box header at byte {pos} is cut off (file ends at {size})"
            box_size = struct.unpack(">Q", hdr[8:16])[0]
        elif box_size == 0:  # "extends to the end of the file"
            return None
        if box_size < 8 or not all(32 <= ch < 127 for ch in kind):
            return None  # trailing bytes that are not a box (some cameras pad files): no evidence either way
        if pos + box_size > size:
            name = kind.decode("latin-1")
            return f"MP4 box '{name}' at byte {pos} declares {box_size} bytes but the file ends at {size}"
        pos += box_size
    return None


def _riff_gap(f: BinaryIO, size: int) -> str | None:
    """A RIFF chunk (AVI, WAV; OpenDML AVIX continuations too) larger than the rest of the file."""
    pos = 0
    while pos + 8 <= size:
        f.seek(pos)
        tag, chunk = struct.unpack("<4sI", f.read(8))
        if tag not in (b"RIFF", b"RF64"):
            return None
        if tag == b"RF64" or chunk == 0xFFFFFFFF:
            return None  # 64-bit sizes live in a ds64 chunk; not checked
        if pos + 8 + chunk > size:
            return f"the RIFF chunk at byte {pos} declares {chunk + 8} bytes but the file ends at {size}"
        pos += 8 + chunk + (chunk & 1)
    return None


def _flv_gap(f: BinaryIO, size: int) -> str | None:
    """An FLV file ends with the size of its last tag; a cut file ends mid-tag."""
    if size < 13:
        return f"the FLV header is cut off ({size} bytes)"
    f.seek(5)
    data_offset = struct.unpack(">I", f.read(4))[0]
    if size <= data_offset + 4:
        return None  # header only: no tags, nothing promised
    f.seek(size - 4)
    last = struct.unpack(">I", f.read(4))[0]
    start = size - 4 - last
    if last < 11 or start < data_offset + 4:
        return f"the FLV file does not end on a tag boundary (file ends at {size})"
    f.seek(start)
    tag = f.read(11)
    if len(tag) < 11 or tag[0] & 0x1F not in (8, 9, 18) or int.from_bytes(tag[1:4], "big") + 11 != last:
        return f"the FLV file does not end on a tag boundary (file ends at {size})"
    return None
