"""PyAV decoding: probe, 25 fps presentation-time resampling of video, 16 kHz mono audio, still images.

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
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import av.error
import numpy as np

from extract.decode_grid import FRAME_RULES as FRAME_RULES  # re-exported: the accepted `frame_rule` values
from extract.decode_frames import FrameBatch as FrameBatch  # re-exported: what iter_frames yields
from extract.decode_frames import Held, display_matrix
from extract.decode_grid import FrameGrid, check_rule, count_output_frames, display_transform, round_half_away
from extract.decode_integrity import file_size, index_gap, packet_gap, structural_gap

SAMPLE_RATE = 16000
DEFAULT_FPS = 25.0
# Container demuxers that hold still images; decoded as a one-frame "video" with no audio.
_IMAGE_FORMATS = {"image2", "image2pipe"}
_ANIMATED = {"gif", "gif_pipe", "apng", "webp_anim"}
# Fallback for containers without a structure check: a decode that stops short of the declared duration by more
# than this is reported as truncated. A stream's own duration (header or Matroska DURATION tag) is exact up to a
# frame; the container's may include another, longer stream, so it gets a looser bound. Audio allows for AAC
# priming/padding (1024 samples at 8 kHz = 0.13 s).
_SLACK_CONTAINER_S = 0.5
_SLACK_VIDEO_S = 0.1
_SLACK_AUDIO_S = 0.2


class DecodeError(Exception):
    """A media file could not be decoded; the message names the file, the stage and the FFmpeg error."""

    def __init__(self, path: str | os.PathLike[str], stage: str, detail: str, fix: str = "") -> None:
        self.path, self.stage, self.detail = str(path), stage, detail
        self.fix = fix or "check the file plays with `ffprobe`; re-encode or remove it from the manifest"
        super().__init__(f"{self.path}: {stage} failed: {detail} (fix: {self.fix})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the exception picklable across Ray/multiprocessing boundaries.
        return (type(self), (self.path, self.stage, self.detail, self.fix))


class TruncatedMedia(DecodeError):
    """The readable part was decoded and yielded, but the file ends early or breaks off mid-stream."""


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` learns from container headers, the first decoded frame and the last packets."""

    path: str
    kind: str  # "video" | "image" | "audio" (audio-only file)
    duration: float  # seconds; 0.0 for images
    has_video: bool
    has_audio: bool
    width: int = 0  # as displayed: after the rotation below, like the frames iter_frames yields
    height: int = 0
    fps: float = float("nan")  # average source frame rate (NaN when unknown / images)
    n_frames: int = 0  # source frame count from the header, 0 when the container does not say
    video_codec: str = ""
    audio_codec: str = ""
    audio_sample_rate: int = 0
    audio_channels: int = 0
    container: str = ""
    size_bytes: int = 0
    rotation: int = 0  # clockwise degrees applied to show frames upright (display matrix / `rotate` tag)
    # Exact (first frame start, last frame end) in seconds on FFmpeg's timeline (from the container start);
    # None when unknown. n_output_frames counts from it; video_start/video_end are the same as floats.
    video_span: tuple[Fraction, Fraction] | None = None

    @property
    def is_image(self) -> bool:
        """True for still images (one frame at t=0, no audio)."""
        return self.kind == "image"

    @property
    def video_start(self) -> float:
        """Seconds from the container start to the first video frame (NaN when unknown)."""
        return float(self.video_span[0]) if self.video_span else float("nan")

    @property
    def video_end(self) -> float:
        """Seconds from the container start to the end of the last video frame (NaN when unknown)."""
        return float(self.video_span[1]) if self.video_span else float("nan")

    def n_output_frames(self, fps: float = DEFAULT_FPS, frame_rule: str = "nearest") -> int:
        """How many frames `iter_frames(fps=fps, frame_rule=frame_rule)` yields for an intact file."""
        check_rule(frame_rule)
        if not self.has_video:
            return 0
        if self.kind == "image":
            return 1
        step = _step(fps)
        if self.video_span is not None:
            first, end = self.video_span
            return count_output_frames(frame_rule, step, first, first, end)
        dur = Fraction(repr(self.duration)) if math.isfinite(self.duration) else Fraction(0)  # decimal, exact
        return count_output_frames(frame_rule, step, Fraction(0), Fraction(0), dur)


def _step(fps: float) -> Fraction:
    """Output frames per second as an exact fraction (25.0 -> 25, 29.97 -> 2997/100)."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    return Fraction(fps).limit_denominator(1_000_000)


def _open(path: str | os.PathLike[str]) -> Any:
    """av.open with every failure turned into a DecodeError naming the file."""
    p = str(path)
    if "://" not in p:
        if not os.path.exists(p):
            raise DecodeError(p, "open", "file not found", "check the path in the manifest (relative paths are "
                              "resolved against the manifest's folder)")
        if os.path.getsize(p) == 0:
            raise DecodeError(p, "open", "file is empty (0 bytes)", "re-copy or re-download the file")
    try:
        return av.open(p, "r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        _, gap = structural_gap(p)
        if gap is not None:  # e.g. an MP4 cut before its moov box: nothing is readable
            raise TruncatedMedia(p, "open", f"FFmpeg: {e}; the file is cut short: {gap}",
                                 "re-copy or re-download the whole file") from e
        raise DecodeError(p, "open", f"FFmpeg: {e}") from e
    except (OSError, ValueError) as e:
        raise DecodeError(p, "open", f"{type(e).__name__}: {e}") from e


def _is_image(container: Any, vstream: Any) -> bool:
    """True when the demuxer is one of FFmpeg's still-image readers (jpg, png, webp, bmp, tiff ...)."""
    names = set(container.format.name.split(","))
    if names & _ANIMATED:
        return False
    return bool(names & _IMAGE_FORMATS) or any(n.endswith("_pipe") for n in names)


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    """A stream timestamp in seconds, or None when missing."""
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _tag_seconds(value: str | None) -> float | None:
    """A Matroska-style DURATION tag ("HH:MM:SS.fffffffff") in seconds, or None."""
    if not value:
        return None
    try:
        h, m, sec = value.strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None


def _declared(container: Any, stream: Any) -> tuple[float | None, str]:
    """(declared duration of `stream` in seconds or None, where it comes from: "own", "container" or "shared").

    "own": the stream's Matroska DURATION tag or header duration. "container": the container's duration, and the
    stream is its only video/audio stream. "shared": the container's duration while other video/audio streams
    exist, so it may be a longer sibling's (FLV, NUT and MPEG-TS give no per-stream durations).
    """
    # Matroska's per-track DURATION tag is written by the muxer; FFmpeg may fill stream.duration with an estimate
    own = _tag_seconds(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    if own is None:
        own = _seconds(stream.duration, stream.time_base)
    if own is not None and math.isfinite(own) and own > 0:
        return own, "own"
    if container.duration is None:
        return None, ""
    media = [s for s in container.streams if s.type in ("video", "audio")]
    return container.duration / av.time_base, "container" if len(media) == 1 else "shared"


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
    """`_scan_duration` over all streams, remembered per file version."""
    return _scan_duration(path)


def _scan_duration(path: str, stream_index: int | None = None) -> float:
    """Seconds spanned by demuxed packet timestamps (no decoding) of one stream, or of all video/audio streams."""
    end = None
    start = None
    with _open(path) as c:
        streams = ([c.streams[stream_index]] if stream_index is not None
                   else [s for s in c.streams if s.type in ("video", "audio")])
        try:
            for pkt in c.demux(*streams):
                if pkt.pts is None or pkt.stream.time_base is None:
                    continue
                tb = pkt.stream.time_base
                t0 = float(pkt.pts * tb)
                t1 = t0 + float((pkt.duration or 0) * tb)
                start = t0 if start is None else min(start, t0)
                end = t1 if end is None else max(end, t1)
        except av.error.FFmpegError:
            pass  # a truncated tail: the readable part still gives a duration
    if end is None or start is None:
        return float("nan")
    return max(0.0, end - start)


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Metadata without decoding the video: kind, duration, size, rates, codecs, rotation, exact video span.

    Decodes only the first video frame (its timestamp and display matrix) and demuxes the last group of
    pictures (the last frame's end), so `n_output_frames` equals what `iter_frames` yields.
    """
    p = str(path)
    with _open(p) as c:
        video = c.streams.video[0] if c.streams.video else None
        audio = c.streams.audio[0] if c.streams.audio else None
        if video is None and audio is None:
            raise DecodeError(p, "stream probe", f"no video or audio stream (container {c.format.name!r})",
                              "this is not a media file; remove it from the manifest")
        container = c.format.name
        size = os.path.getsize(p) if "://" not in p and os.path.exists(p) else 0
        if video is not None and _is_image(c, video):
            cc = video.codec_context
            first = _first_frame(c, video)  # EXIF orientation comes as a display matrix: size as displayed
            shape = _upright(first) if first is not None else dict(width=int(cc.width or 0),
                                                                    height=int(cc.height or 0))
            return MediaInfo(p, "image", 0.0, True, False, fps=float("nan"), n_frames=1, video_codec=cc.name or "",
                             container=container, size_bytes=size, **shape)
        main = video if video is not None else audio
        duration, _ = _declared(c, main)
        vinfo: dict[str, Any] = {}
        if video is not None:
            cc = video.codec_context
            rate = video.average_rate or video.guessed_rate or video.base_rate
            vinfo = dict(width=int(cc.width or 0), height=int(cc.height or 0),
                         fps=float(rate) if rate else float("nan"), n_frames=int(video.frames or 0),
                         video_codec=cc.name or "")
        ainfo: dict[str, Any] = {}
        if audio is not None:
            acc = audio.codec_context
            ainfo = dict(audio_codec=acc.name or "", audio_sample_rate=int(acc.sample_rate or 0),
                         audio_channels=int(acc.channels or 0))
        main_index = main.index
        if video is not None:
            vinfo.update(_probe_video(c, video))
    if duration is None or not math.isfinite(duration) or duration <= 0:
        duration = _scan_duration(p, main_index)
    return MediaInfo(p, "video" if video is not None else "audio", float(duration), video is not None,
                     audio is not None, container=container, size_bytes=size, **vinfo, **ainfo)


def _probe_video(c: Any, vs: Any) -> dict[str, Any]:
    """Rotation, displayed size and exact span of video stream `vs` of open container `c`; {} when no frame
    decodes. Reads from the start, then seeks to the end: call it last on `c`."""
    tb = vs.time_base or Fraction(1, 1)
    offset = _start_offset(c, tb)
    first = _first_frame(c, vs)
    if first is None:
        return {}
    out = _upright(first)
    t0 = first.pts if first.pts is not None else first.dts
    rate = vs.average_rate or vs.guessed_rate
    tail = _tail_packets(c, vs)
    if t0 is None or not tail:
        return out
    nominal = Fraction(1) / Fraction(rate) if rate else Fraction(1, 25)  # as iter_frames assumes
    pts = sorted(tail)
    last, dur = pts[-1], tail[pts[-1]]
    gap = (last - pts[-2]) * tb if len(pts) > 1 else nominal
    end = (last - offset) * tb + (dur * tb if dur else gap)
    out["video_span"] = ((t0 - offset) * tb, max(end, (t0 - offset) * tb))
    return out


def _first_frame(c: Any, vs: Any) -> Any:
    """The first decoded frame of `vs`, or None when none decodes."""
    vs.codec_context.thread_count = 1  # one frame: decoder threads would only cost their start-up
    try:
        for frame in c.decode(vs):
            return frame
    except av.error.FFmpegError:
        pass
    return None


def _upright(frame: Any) -> dict[str, Any]:
    """rotation (clockwise degrees) and the displayed width/height of `frame`."""
    rot, _, _ = display_transform(display_matrix(frame))
    w, h = (frame.height, frame.width) if rot in (90, 270) else (frame.width, frame.height)
    return dict(rotation=rot, width=int(w), height=int(h))


def _tail_packets(c: Any, vs: Any) -> dict[int, int]:
    """{pts: duration} of the video packets from the last keyframe on (no decoding); {} when unreadable."""
    try:
        c.seek(1 << 62, stream=vs, backward=True)
    except (av.error.FFmpegError, OverflowError, ValueError):
        pass  # not seekable: the demux below continues from the first frame
    tail: dict[int, int] = {}
    try:
        for pkt in c.demux(vs):
            if pkt.size and pkt.pts is not None:
                tail[int(pkt.pts)] = int(pkt.duration or 0)
    except av.error.FFmpegError:
        pass  # a cut file: what was read is still the best estimate
    return tail


def _start_offset(c: Any, tb: Fraction) -> int:
    """The container start time in stream ticks: what `ffmpeg` (without -copyts) subtracts from every pts."""
    start = c.start_time
    if start is None:
        return 0
    return round_half_away(Fraction(int(start), 1_000_000) / tb)


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
    step = _step(fps)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = str(path)
    held = Held(batch_size, float(fps), height, short_side, keep)
    with _open(p) as c:
        if not c.streams.video:
            _raise_if_cut(p, "stream probe", c)  # a cut MP4 may lose the video track's header
            raise DecodeError(p, "stream probe", "no video stream", "audio-only files have no frames; "
                              "only audio features apply to them")
        vs = c.streams.video[0]
        image = _is_image(c, vs)
        vs.thread_type = "AUTO"
        vs.codec_context.thread_count = threads
        tb = vs.time_base or Fraction(1, 1)
        declared, source = (None, "") if image else _declared(c, vs)
        rate = vs.average_rate or vs.guessed_rate
        nominal = Fraction(1) / Fraction(rate) if rate else Fraction(1, 25)
        offset = _start_offset(c, tb) if frame_rule == "nearest" else 0
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
    with _open(p) as c:
        if not c.streams.audio:
            return
        stream = c.streams.audio[0]
        stream.thread_type = "AUTO"
        declared, source = _declared(c, stream)
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
