"""PyAV decoding: probe (`extract.decode_probe`), 25 fps presentation-time resampling, 16 kHz mono audio, images.

Video is resampled onto an exact grid of `fps` output frames per second. By default (`frame_rule="nearest"`)
the choice of source frame is FFmpeg's own `fps` filter as `ffmpeg -i VIDEO -vf fps=25` applies it: output
slot n shows the latest source frame with t < (n + 0.5)/fps (t from the container's start time), and the stream
ends at round(t_end * fps) with t_end the last frame's end (`extract.decode_grid`). `frame_rule="floor"` keeps
the older rule: output k shows the latest source frame with t - t_first <= k/fps. Output index k counts from 0
at the first output frame either way. Frames come out upright: a display matrix (phone rotation) is applied as
ffmpeg's autorotate does. Frames stream out in bounded batches; nothing holds a whole video in memory.

A decode is reported truncated (TruncatedMedia) only on evidence of missing data: a demuxer or decoder error,
an incomplete packet, or file structure/index pointing past the end of the file (`extract.decode_integrity`).
Containers with no structure check (MPEG-TS, NUT, Ogg, ...) fall back to comparing the decoded end with the
declared duration.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Collection, Iterator
from fractions import Fraction
from typing import Any

import av
import av.error
import numpy as np

from extract.decode_frames import FrameBatch as FrameBatch  # re-exported: what iter_frames yields
from extract.decode_frames import Held
from extract.decode_grid import FRAME_RULES as FRAME_RULES  # re-exported: the accepted `frame_rule` values
from extract.decode_grid import FrameGrid, check_rule
from extract.decode_integrity import file_size, index_gap, packet_gap, structural_gap
# probing is part of decoding: these five stay importable from extract.decode
from extract.decode_probe import DEFAULT_FPS as DEFAULT_FPS
from extract.decode_probe import DecodeError as DecodeError
from extract.decode_probe import MediaInfo as MediaInfo
from extract.decode_probe import TruncatedMedia as TruncatedMedia
from extract.decode_probe import probe as probe
from extract.decode_probe import (declared_duration, frame_step, is_image_container, open_media, scan_duration,
                                  start_offset)

SAMPLE_RATE = 16000
# Fallback for containers without a structure check: a decode that stops short of the declared duration by more
# than this is reported as truncated. A stream's own duration (header or Matroska DURATION tag) is exact up to a
# frame; the container's may include another, longer stream, so it gets a looser bound. Audio allows for AAC
# priming/padding (1024 samples at 8 kHz = 0.13 s).
_SLACK_CONTAINER_S = 0.5
_SLACK_VIDEO_S = 0.1
_SLACK_AUDIO_S = 0.2


def _check_complete(path: str, stage: str, end: float, declared: float | None, source: str,
                    own_slack: float) -> None:
    """Raise TruncatedMedia when a stream that decoded up to `end` s falls short of its declared duration."""
    if declared is None or not math.isfinite(declared):
        return
    slack = own_slack if source == "own" else _SLACK_CONTAINER_S
    if end + slack >= declared:
        return
    # A shared duration may be a longer sibling's: the file is cut only if no stream's packets reach it either.
    # The scan reads the whole file (no decoding); it runs only here, and once per file for video and audio.
    if source == "shared" and _scan_cached(path, *_file_key(path)) + _SLACK_CONTAINER_S >= declared:
        return
    raise TruncatedMedia(path, stage, f"decoding stopped at {end:.2f} s of the declared {declared:.2f} s",
                         "the readable part was kept; re-encode or re-copy the file")


def _file_key(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a local file, (0, 0) for URLs: part of the scan cache key."""
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _scan_cached(path: str, size: int, mtime_ns: int) -> float:
    """`scan_duration` over all streams, remembered per file version."""
    return scan_duration(path)


class _Packets:
    """Decoded frames of one stream, packet by packet; evidence of missing data is noted, not raised."""

    def __init__(self, container: Any, stream: Any, path: str) -> None:
        self.c, self.stream, self.path = container, stream, path
        self.size = file_size(path)
        self.gap: str | None = None  # an incomplete packet
        self.error: str | None = None  # a demuxer/decoder error

    def frames(self) -> Iterator[Any]:
        """Frames in decode order; stops at an incomplete packet or error, after flushing the decoder.

        A packet the demuxer flags corrupt is decoded only once a later packet shows it was not cut off by the end
        of the file: damage mid-stream is the decoder's business, a partial last packet is missing data.
        """
        suspect: Any = None
        try:
            for pkt in self.c.demux(self.stream):
                if not pkt.size:  # the end-of-stream flush packet
                    if suspect is not None:
                        break
                elif (gap := packet_gap(pkt, self.size)) is not None:
                    self.gap = gap
                    break
                elif suspect is not None:
                    yield from suspect.decode()
                    suspect = None
                if pkt.size and pkt.is_corrupt:
                    suspect = pkt
                    continue
                yield from pkt.decode()
        except av.error.FFmpegError as e:
            self.error = f"FFmpeg: {e}"
        if suspect is not None and self.gap is None and self.error is None:
            self.gap = f"the last {suspect.stream.type} packet (byte {suspect.pos}) is incomplete"
        if self.gap is not None or self.error is not None:
            try:  # frames the decoder still holds (threads, reordering) are readable
                yield from self.stream.decode(None)
            except av.error.FFmpegError:
                pass

    def check(self, stage: str, end: float, declared: float | None, source: str, own_slack: float,
              done: str = "") -> None:
        """Raise TruncatedMedia on evidence of missing data (or, for unchecked containers, a short decode)."""
        if self.error is not None:
            raise TruncatedMedia(self.path, stage, f"{self.error}{done}", _FIX_CUT)
        stopped = ""
        if declared is not None and math.isfinite(declared) and end < declared:
            stopped = f"; decoding stopped at {end:.2f} s of the declared {declared:.2f} s"
        known = _raise_if_cut(self.path, stage, self.c, self.gap, stopped)
        if not known:
            _check_complete(self.path, stage, end, declared, source, own_slack)


_FIX_CUT = "the readable part was kept; re-encode or re-copy the file to recover the rest"


def _raise_if_cut(path: str, stage: str, container: Any, gap: str | None = None, more: str = "") -> bool:
    """Raise TruncatedMedia when `gap` or the file's structure or index shows missing data; else whether the
    container's structure could be checked at all."""
    known, structural = structural_gap(path)
    gap = gap or structural or index_gap(container, file_size(path))
    if gap is not None:
        raise TruncatedMedia(path, stage, f"the file is cut short: {gap}{more}", _FIX_CUT)
    return known


def iter_frames(path: str | os.PathLike[str], fps: float = DEFAULT_FPS, batch_size: int = 32,
                height: int | None = None, short_side: int | None = None,
                threads: int = 0, frame_rule: str = "nearest",
                keep: Collection[int] | None = None) -> Iterator[FrameBatch]:
    """Upright RGB frames resampled to `fps` by presentation time, in batches; images give one frame at t=0.

    `frame_rule`: "nearest" (FFmpeg's fps filter, default) or "floor" (see the module docstring).
    `keep`: output indices to yield (None: all); the others are decoded (the codec needs them) but never
    colour-converted or resized, and the last output frame is always yielded. Batches then hold the kept indices.
    Raises DecodeError before anything is yielded when the file cannot be opened, and TruncatedMedia after the
    readable part has been yielded on evidence of missing data. `threads`: FFmpeg decoder threads (0 = auto).
    """
    check_rule(frame_rule)
    step = frame_step(fps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = str(path)
    held = Held(batch_size, float(fps), height, short_side, keep)
    with open_media(p) as c:
        if not c.streams.video:
            _raise_if_cut(p, "stream probe", c)  # a cut MP4 may lose the video track's header
            raise DecodeError(p, "stream probe", "no video stream", "audio-only files have no frames; "
                              "only audio features apply to them")
        vs = c.streams.video[0]
        image = is_image_container(c, vs)
        vs.thread_type = "AUTO"
        vs.codec_context.thread_count = threads
        tb = vs.time_base or Fraction(1, 1)
        declared, source = (None, "") if image else declared_duration(c, vs)
        rate = vs.average_rate or vs.guessed_rate
        nominal = Fraction(1) / Fraction(rate) if rate else Fraction(1, 25)
        offset = start_offset(c, tb) if frame_rule == "nearest" else 0
        grid = FrameGrid(frame_rule, step)
        packets = _Packets(c, vs, p)
        t_first = t_last = t_max = Fraction(0)
        last_gap = nominal
        for frame in packets.frames():
            if image:
                held.hold(frame)
                break
            pts = frame.pts if frame.pts is not None else frame.dts
            t = (pts - offset) * tb if pts is not None else (t_last + nominal if held.frame is not None else t_first)
            if held.frame is None:
                t_first = t_max = t
            elif t > t_max:
                last_gap, t_max = t - t_max, t
            yield from held.emit(grid.push(t))
            held.hold(frame)
            t_last = t
        if held.frame is None:
            _raise_if_cut(p, "packet decode", c, packets.gap, "; no frame before the cut")
            if packets.error is not None:
                raise DecodeError(p, "packet decode", f"{packets.error} before any frame")
            raise DecodeError(p, "packet decode", "no decodable video frame", "the file holds no readable "
                              "picture; re-encode it")
        if image:
            yield from held.emit(1)
        else:
            dur = getattr(held.frame, "duration", None)
            tail = Fraction(dur) * tb if dur else last_gap
            yield from held.emit(grid.finish((t_last if frame_rule == "nearest" else t_max) + tail))
        yield from held.emit_last()
        last = held.batcher.flush()
        if last is not None:
            yield last
        if not image:
            packets.check("packet decode", float(t_max + tail - t_first), declared, source,
                          max(_SLACK_VIDEO_S, 2 * float(nominal)), f" after {held.k} output frame(s)")


def iter_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE,
               chunk_samples: int = SAMPLE_RATE * 10) -> Iterator[np.ndarray]:
    """Mono float32 samples at `sample_rate`, in chunks of about `chunk_samples`; nothing if no audio.

    Channels are averaged (as librosa and the VGGish reference do); FFmpeg's own downmix would scale correlated
    stereo by sqrt(2). Samples are not clipped: float sources and resampling overshoot may exceed [-1, 1], as in
    FFmpeg and TF VGGish. Raises TruncatedMedia after the readable part on evidence of missing data.
    """
    p = str(path)
    with open_media(p) as c:
        if not c.streams.audio:
            return
        stream = c.streams.audio[0]
        stream.thread_type = "AUTO"
        declared, source = declared_duration(c, stream)
        resampler: Any = None
        pending: list[np.ndarray] = []
        n_pending = 0
        n_total = 0
        packets = _Packets(c, stream, p)

        def convert(frames: list[Any], final: bool = False) -> Iterator[np.ndarray]:
            nonlocal n_pending, n_total
            for f in frames:
                a = f.to_ndarray()  # planar float: (channels, samples)
                a = a[0] if a.shape[0] == 1 else a.mean(axis=0, dtype=np.float32)
                pending.append(a)
                n_pending += a.size
                n_total += a.size
            if pending and (n_pending >= chunk_samples or final):
                out = np.concatenate(pending)
                pending.clear()
                n_pending = 0
                yield out

        try:
            for frame in packets.frames():
                frame.pts = None  # let the resampler count samples; gaps in pts are not silence here
                if resampler is None:  # keeps the source channels: they are averaged in numpy
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sample_rate)
                yield from convert(resampler.resample(frame))
        except av.error.FFmpegError as e:  # the resampler: same outcome as a decoder error
            packets.error = f"FFmpeg: {e}"
        yield from convert(resampler.resample(None) if resampler is not None else [], final=True)
        packets.check("audio decode", n_total / sample_rate, declared, source, _SLACK_AUDIO_S)


def read_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """The whole audio track as mono float32 (not clipped); None when the file has no audio stream."""
    info = probe(path)
    if not info.has_audio:
        return None
    chunks = list(iter_audio(path, sample_rate))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def read_frames(path: str | os.PathLike[str], fps: float = DEFAULT_FPS, **kw: Any) -> FrameBatch:
    """All resampled frames at once (short clips and tests only; use iter_frames for real videos)."""
    batches = list(iter_frames(path, fps=fps, **kw))
    frames = np.concatenate([b.frames for b in batches])
    index = np.concatenate([b.index for b in batches])
    return FrameBatch(frames, index / float(fps), index)
