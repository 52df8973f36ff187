"""PyAV decoding: probe, 25 fps presentation-time resampling of video, 16 kHz mono audio, still images.

Video output frame k represents t = k/fps seconds (relative to the first video frame) and is the latest source
frame whose timestamp is <= t, so variable-frame-rate sources and sources above or below the target rate all map
onto one exact grid. Frames stream out in bounded batches; nothing holds a whole video in memory.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error
from av.video.reformatter import VideoReformatter
import numpy as np

SAMPLE_RATE = 16000
DEFAULT_FPS = 25.0
# Container demuxers that hold still images; decoded as a one-frame "video" with no audio.
_IMAGE_FORMATS = {"image2", "image2pipe"}
_ANIMATED = {"gif", "gif_pipe", "apng", "webp_anim"}
# A decode that stops short of the declared duration by more than this is reported as truncated. A stream's own
# duration (header or Matroska DURATION tag) is exact up to a frame; the container's may include another, longer
# stream, so it gets a looser bound. Audio allows for AAC priming/padding (1024 samples at 8 kHz = 0.13 s).
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
    """What `probe` learns from container headers (and a packet scan when headers lack a duration)."""

    path: str
    kind: str  # "video" | "image" | "audio" (audio-only file)
    duration: float  # seconds; 0.0 for images
    has_video: bool
    has_audio: bool
    width: int = 0
    height: int = 0
    fps: float = float("nan")  # average source frame rate (NaN when unknown / images)
    n_frames: int = 0  # source frame count from the header, 0 when the container does not say
    video_codec: str = ""
    audio_codec: str = ""
    audio_sample_rate: int = 0
    audio_channels: int = 0
    container: str = ""
    size_bytes: int = 0

    @property
    def is_image(self) -> bool:
        """True for still images (one frame at t=0, no audio)."""
        return self.kind == "image"

    def n_output_frames(self, fps: float = DEFAULT_FPS) -> int:
        """How many frames `iter_frames(fps=fps)` yields for an intact file."""
        if not self.has_video:
            return 0
        if self.kind == "image":
            return 1
        return max(1, math.ceil(self.duration * fps - 1e-9))


@dataclass
class FrameBatch:
    """Consecutive output frames: RGB uint8 (B, H, W, 3), their times k/fps (B,) and indices k (B,)."""

    frames: np.ndarray
    times: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


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
    """Metadata without decoding frames: kind, duration, size, rates, codecs."""
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
            return MediaInfo(p, "image", 0.0, True, False, int(cc.width or 0), int(cc.height or 0),
                             float("nan"), 1, cc.name or "", container=container, size_bytes=size)
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
    if duration is None or not math.isfinite(duration) or duration <= 0:
        duration = _scan_duration(p, main_index)
    return MediaInfo(p, "video" if video is not None else "audio", float(duration), video is not None,
                     audio is not None, container=container, size_bytes=size, **vinfo, **ainfo)


def _out_size(w: int, h: int, height: int | None, short_side: int | None) -> tuple[int, int]:
    """Output (width, height) keeping the aspect ratio; even-free, at least 1 px."""
    if height is not None and short_side is not None:
        raise ValueError("give either height or short_side, not both")
    if height is not None:
        scale = height / h
    elif short_side is not None:
        scale = short_side / min(w, h)
    else:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


class _ToRGB:
    """Converts av.VideoFrames to RGB uint8 (H, W, 3), resized (bilinear, aspect kept by the caller) when asked.

    Resizing first scales within the source pixel format and then converts at the output size: swscale's combined
    scale+convert path is ~4x slower for yuv420p, and for planar RGB sources it keeps channels from bleeding.
    Reformatters are kept across frames so swscale contexts are reused.
    """

    def __init__(self) -> None:
        self.scale = VideoReformatter()
        self.convert = VideoReformatter()
        self.two_step = True

    def __call__(self, frame: Any, size: tuple[int, int] | None) -> np.ndarray:
        if size is None or (size[0] == frame.width and size[1] == frame.height):
            return self.convert.reformat(frame, format="rgb24").to_ndarray()
        if self.two_step:
            try:
                small = self.scale.reformat(frame, width=size[0], height=size[1], interpolation="BILINEAR")
                return self.convert.reformat(small, format="rgb24").to_ndarray()
            except (ValueError, av.error.FFmpegError):  # a pixel format swscale cannot scale in place
                self.two_step = False
        return self.convert.reformat(frame, format="rgb24", width=size[0], height=size[1],
                                     interpolation="BILINEAR").to_ndarray()


class _Batcher:
    """Collects output frames and hands out FrameBatches of `batch_size`."""

    def __init__(self, batch_size: int, fps: float) -> None:
        self.batch_size, self.fps = batch_size, fps
        self.frames: list[np.ndarray] = []
        self.index: list[int] = []

    def add(self, k: int, rgb: np.ndarray) -> FrameBatch | None:
        self.frames.append(rgb)
        self.index.append(k)
        return self.flush() if len(self.frames) >= self.batch_size else None

    def flush(self) -> FrameBatch | None:
        if not self.frames:
            return None
        idx = np.asarray(self.index, dtype=np.int64)
        batch = FrameBatch(np.stack(self.frames), idx.astype(np.float64) / self.fps, idx)
        self.frames, self.index = [], []
        return batch


def iter_frames(path: str | os.PathLike[str], fps: float = DEFAULT_FPS, batch_size: int = 32,
                height: int | None = None, short_side: int | None = None,
                threads: int = 0) -> Iterator[FrameBatch]:
    """RGB frames resampled to `fps` by presentation time, in batches; images give one frame at t=0.

    Raises DecodeError before anything is yielded when the file cannot be opened, and TruncatedMedia after the
    readable part has been yielded when decoding breaks off or stops short of the declared duration.
    `threads` is FFmpeg's decoder thread count (0 = FFmpeg decides).
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = str(path)
    step = Fraction(fps).limit_denominator(1_000_000)  # output frames per second, exact
    batcher = _Batcher(batch_size, float(fps))
    to_rgb = _ToRGB()
    with _open(p) as c:
        if not c.streams.video:
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

        size: tuple[int, int] | None = None
        held: Any = None  # the latest source frame not yet superseded
        held_t = Fraction(0)
        held_rgb: np.ndarray | None = None
        first_pts: int | None = None
        k = 0  # next output frame index
        last_gap = nominal
        error: DecodeError | None = None

        def emit_until(limit: Fraction) -> Iterator[FrameBatch]:
            """Output frames k with k/fps < limit, all showing the held frame."""
            nonlocal k, held_rgb
            while k / step < limit:
                if held_rgb is None:
                    held_rgb = to_rgb(held, size)
                b = batcher.add(k, held_rgb)
                k += 1
                if b is not None:
                    yield b

        try:
            for frame in c.decode(vs):
                if size is None:
                    size = _out_size(frame.width, frame.height, height, short_side)
                if image:
                    held, held_rgb = frame, None
                    break
                pts = frame.pts if frame.pts is not None else frame.dts
                if pts is None:  # no timestamps at all: assume the nominal rate
                    t = held_t + nominal if held is not None else Fraction(0)
                else:
                    first_pts = pts if first_pts is None else first_pts
                    t = (pts - first_pts) * tb
                if held is not None:
                    if t <= held_t:  # same or earlier timestamp: the later frame wins
                        held, held_rgb = frame, None
                        continue
                    last_gap = t - held_t
                    yield from emit_until(t)
                held, held_t, held_rgb = frame, t, None
        except av.error.FFmpegError as e:
            error = TruncatedMedia(p, "packet decode", f"FFmpeg: {e} after {k} output frame(s)",
                                   "the readable part was kept; re-encode the file to recover the rest")
        if held is None:
            if error is not None:
                raise DecodeError(p, "packet decode", error.detail) from None
            raise DecodeError(p, "packet decode", "no decodable video frame", "the file holds no readable "
                              "picture; re-encode it")
        if image:
            b = batcher.add(0, to_rgb(held, size))
            if b is not None:
                yield b
        else:
            dur = getattr(held, "duration", None)
            tail = Fraction(dur) * tb if dur else last_gap
            yield from emit_until(held_t + tail)
        last = batcher.flush()
        if last is not None:
            yield last
        if error is not None:
            raise error
        if not image:
            end = float(held_t + tail)
            _check_complete(p, "packet decode", end, declared, source, max(_SLACK_VIDEO_S, 2 * float(nominal)))


def iter_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE,
               chunk_samples: int = SAMPLE_RATE * 10) -> Iterator[np.ndarray]:
    """Mono float32 samples in [-1, 1] at `sample_rate`, in chunks of about `chunk_samples`; nothing if no audio.

    Channels are averaged (as librosa and the VGGish reference do); FFmpeg's own downmix would scale correlated
    stereo by sqrt(2) and clip it. Raises TruncatedMedia after the readable part when decoding breaks off or stops
    short of the audio stream's declared duration.
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
        error: TruncatedMedia | None = None

        def convert(frames: list[Any], final: bool = False) -> Iterator[np.ndarray]:
            nonlocal n_pending, n_total
            for f in frames:
                a = f.to_ndarray()  # planar float: (channels, samples)
                a = a[0] if a.shape[0] == 1 else a.mean(axis=0, dtype=np.float32)
                pending.append(a)
                n_pending += a.size
                n_total += a.size
            if pending and (n_pending >= chunk_samples or final):
                out = np.clip(np.concatenate(pending), -1.0, 1.0)
                pending.clear()
                n_pending = 0
                yield out

        try:
            for frame in c.decode(stream):
                frame.pts = None  # let the resampler count samples; gaps in pts are not silence here
                if resampler is None:  # keeps the source channels: they are averaged in numpy
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sample_rate)
                yield from convert(resampler.resample(frame))
        except av.error.FFmpegError as e:
            error = TruncatedMedia(p, "audio decode", f"FFmpeg: {e}", "the readable part was kept; re-encode "
                                   "the file to recover the rest")
        yield from convert(resampler.resample(None) if resampler is not None else [], final=True)
        if error is not None:
            raise error
        _check_complete(p, "audio decode", n_total / sample_rate, declared, source, _SLACK_AUDIO_S)


def read_audio(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """The whole audio track as mono float32 in [-1, 1]; None when the file has no audio stream."""
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


def is_media_path(path: str | os.PathLike[str]) -> bool:
    """Cheap filter for folder inputs: a known video, audio or image extension."""
    return Path(path).suffix.lower() in MEDIA_EXTENSIONS


MEDIA_EXTENSIONS = frozenset(
    ".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .ts .flv .wmv .3gp .ogv .gif .jpg .jpeg .png .webp .bmp .tif .tiff "
    ".wav .mp3 .m4a .aac .flac .ogg .opus".split()
)
