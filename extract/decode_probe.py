"""PyAV probing: what a media file holds (kind, duration, size, codecs, rotation, exact video span) and the
shared pieces of opening it, used by the decoders in `extract.decode` (which re-exports the public names)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import av.error

from extract.decode_frames import display_matrix
from extract.decode_grid import check_rule, count_output_frames, display_transform, round_half_away
from extract.decode_integrity import file_size, structural_gap
from store.common import is_url

DEFAULT_FPS = 25.0
# Container demuxers that hold still images; decoded as a one-frame "video" with no audio.
_IMAGE_FORMATS = {"image2", "image2pipe"}
_ANIMATED = {"gif", "gif_pipe", "apng", "webp_anim"}


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
    # The audio stream's own duration in seconds (its header or DURATION tag, or the container's when it is the
    # only stream); NaN when unknown or only a container duration shared with other streams is declared.
    audio_duration: float = float("nan")

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
        step = frame_step(fps)
        if self.video_span is not None:
            first, end = self.video_span
            return count_output_frames(frame_rule, step, first, first, end)
        dur = Fraction(repr(self.duration)) if math.isfinite(self.duration) else Fraction(0)  # decimal, exact
        return count_output_frames(frame_rule, step, Fraction(0), Fraction(0), dur)


def frame_step(fps: float) -> Fraction:
    """Output frames per second as an exact fraction (25.0 -> 25, 29.97 -> 2997/100)."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    return Fraction(fps).limit_denominator(1_000_000)


def open_media(path: str | os.PathLike[str]) -> Any:
    """av.open with every failure turned into a DecodeError naming the file."""
    p = str(path)
    if not is_url(p):
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


def is_image_container(container: Any, vstream: Any) -> bool:
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


def declared_duration(container: Any, stream: Any) -> tuple[float | None, str]:
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


def scan_duration(path: str, stream_index: int | None = None) -> float:
    """Seconds spanned by demuxed packet timestamps (no decoding) of one stream, or of all video/audio streams."""
    end = None
    start = None
    with open_media(path) as c:
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
    with open_media(p) as c:
        video = c.streams.video[0] if c.streams.video else None
        audio = c.streams.audio[0] if c.streams.audio else None
        if video is None and audio is None:
            raise DecodeError(p, "stream probe", f"no video or audio stream (container {c.format.name!r})",
                              "this is not a media file; remove it from the manifest")
        container = c.format.name
        size = file_size(p) or 0
        if video is not None and is_image_container(c, video):
            cc = video.codec_context
            first = _first_frame(c, video)  # EXIF orientation comes as a display matrix: size as displayed
            shape = _upright(first) if first is not None else dict(width=int(cc.width or 0),
                                                                    height=int(cc.height or 0))
            return MediaInfo(p, "image", 0.0, True, False, fps=float("nan"), n_frames=1, video_codec=cc.name or "",
                             container=container, size_bytes=size, **shape)
        main = video if video is not None else audio
        duration, _ = declared_duration(c, main)
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
            own, source = declared_duration(c, audio)
            ainfo = dict(audio_codec=acc.name or "", audio_sample_rate=int(acc.sample_rate or 0),
                         audio_channels=int(acc.channels or 0),
                         audio_duration=float(own) if own is not None and source != "shared" else float("nan"))
        main_index = main.index
        if video is not None:
            vinfo.update(_probe_video(c, video))
    if duration is None or not math.isfinite(duration) or duration <= 0:
        duration = scan_duration(p, main_index)
        if video is None:  # an audio-only file: its duration is the audio's
            ainfo["audio_duration"] = float(duration)
    return MediaInfo(p, "video" if video is not None else "audio", float(duration), video is not None,
                     audio is not None, container=container, size_bytes=size, **vinfo, **ainfo)


def _probe_video(c: Any, vs: Any) -> dict[str, Any]:
    """Rotation, displayed size and exact span of video stream `vs` of open container `c`; {} when no frame
    decodes. Reads from the start, then seeks to the end: call it last on `c`."""
    tb = vs.time_base or Fraction(1, 1)
    offset = start_offset(c, tb)
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


def start_offset(c: Any, tb: Fraction) -> int:
    """The container start time in stream ticks: what `ffmpeg` (without -copyts) subtracts from every pts."""
    start = c.start_time
    if start is None:
        return 0
    return round_half_away(Fraction(int(start), 1_000_000) / tb)
