"""Test media written with PyAV: lossless video (libx264rgb crf 0) whose decoded frames equal the written ones.

One writer for every test module (the model is pytorchvideo's `temp_encoded_video`); conftest.py wraps it as the
`tiny_video` fixture. Files with a peculiar container or codec (display rotation, WebM, lossy H.264, packet
surgery) are written where they are tested.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np

AUDIO_CHUNK = 1024  # samples per encoded audio frame, as a muxer would get them from a recorder


def source_frame(i: int, h: int, w: int) -> np.ndarray:
    """Source frame i: red/green hold the index, blue a fixed spatial pattern (catches flips and shifts)."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = i % 256
    img[..., 1] = i // 256
    img[..., 2] = (np.arange(w)[None, :] * 7 + np.arange(h)[:, None] * 13) % 256
    return img


def numbered_frames(n: int, size: tuple[int, int] = (16, 24)) -> np.ndarray:
    """uint8 (n, h, w, 3): source_frame(0..n-1), each frame naming its own index."""
    h, w = size
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = source_frame(i, h, w)
    return out


def shown_index(frames: np.ndarray) -> np.ndarray:
    """Source index each output frame shows, read from its top-left pixel."""
    return frames[:, 0, 0, 0].astype(np.int64) + 256 * frames[:, 0, 0, 1].astype(np.int64)


def ramp_tone(sample_rate: int, seconds: float) -> np.ndarray:
    """Mono s16 samples (1, n): a 440 Hz tone whose amplitude ramps up, so a prefix identifies its position."""
    t = np.arange(int(round(sample_rate * seconds))) / sample_rate
    return np.round((0.1 + 0.8 * t / seconds) * np.sin(2 * np.pi * 440 * t) * 32767)[None].astype(np.int16)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """int16 (channels, n) from int16 samples as they are, or float samples in [-1, 1] (clipped, scaled by 32767)."""
    a = np.asarray(audio)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] not in (1, 2):
        raise ValueError(f"tests/_media.py: audio must be (n,) or (channels<=2, n), got shape {a.shape}")
    if a.dtype == np.int16:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"tests/_media.py: audio must be int16 or float, got {a.dtype}")
    return (np.clip(a, -1, 1) * 32767).astype(np.int16)


def _mux_audio(c: av.container.OutputContainer, stream: av.AudioStream, pcm: np.ndarray, sample_rate: int) -> None:
    """Encode s16 (channels, n) samples in AUDIO_CHUNK frames and flush."""
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    for s in range(0, pcm.shape[1], AUDIO_CHUNK):
        chunk = np.ascontiguousarray(pcm[:, s:s + AUDIO_CHUNK].T.reshape(1, -1))  # packed s16: interleaved
        af = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
        af.sample_rate, af.pts = sample_rate, s
        c.mux(stream.encode(af))
    c.mux(stream.encode())


def write_video(path: Path, frames: np.ndarray, *, fps: int | Fraction = 25,
                times: Sequence[Fraction | float] | None = None, time_base: Fraction | None = None,
                audio: np.ndarray | None = None, sample_rate: int = 16000) -> Path:
    """Lossless RGB video of uint8 (T, H, W, 3) `frames`; frame i at `times[i]` s (needs `time_base`) or at i/fps.

    `audio`: int16 or float in [-1, 1], shaped (n,) or (channels, n), muxed as pcm_s16le at `sample_rate`.
    The container follows the suffix (.mkv keeps PCM; .mp4 cannot).
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"tests/_media.py: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if times is not None and (time_base is None or len(times) != len(frames)):
        raise ValueError("tests/_media.py: `times` needs a `time_base` and one time per frame")
    pcm = None if audio is None else to_pcm16(audio)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264rgb", rate=fps)
        vs.width, vs.height, vs.pix_fmt, vs.options = frames.shape[2], frames.shape[1], "rgb24", {"crf": "0"}
        if time_base is not None:  # both, or the encoder rounds pts to 1/fps and VFR is lost
            vs.time_base = time_base
            vs.codec_context.time_base = time_base
        astream = None
        if pcm is not None:
            astream = c.add_stream("pcm_s16le", rate=sample_rate, layout="mono" if pcm.shape[0] == 1 else "stereo")
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i if times is None else round(Fraction(times[i]) / time_base)
            c.mux(vs.encode(frame))
        c.mux(vs.encode())
        if astream is not None and pcm is not None:
            _mux_audio(c, astream, pcm, sample_rate)
    return path


def write_numbered(path: Path, times: Sequence[Fraction | float] | None = None, *, n: int = 0,
                   rate: int | Fraction = 25, size: tuple[int, int] = (16, 24), time_base: Fraction | None = None,
                   audio: np.ndarray | None = None, sample_rate: int = 16000) -> Path:
    """write_video of numbered_frames: `len(times)` frames at `times`, or `n` frames at `rate`."""
    frames = numbered_frames(len(times) if times is not None else n, size)
    return write_video(path, frames, fps=rate, times=times, time_base=time_base, audio=audio, sample_rate=sample_rate)


def write_audio(path: Path, pcm: np.ndarray, sample_rate: int, codec: str = "pcm_s16le") -> Path:
    """Audio-only mono file from s16 samples shaped (n,) or (1, n); the container follows the suffix."""
    samples = to_pcm16(pcm)
    if samples.shape[0] != 1:
        raise ValueError(f"tests/_media.py: write_audio is mono, got {samples.shape[0]} channels")
    with av.open(str(path), "w") as c:
        a = c.add_stream(codec, rate=sample_rate, layout="mono")
        _mux_audio(c, a, samples, sample_rate)
    return path


def write_image(path: Path, img: np.ndarray) -> Path:
    """Lossless PNG of a uint8 (H, W, 3) image."""
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG")
    return path


def break_video_stream(src: Path, dst: Path) -> Path:
    """Copy `src` packet by packet, replacing every video packet's payload with noise; audio packets stay intact."""
    rng = np.random.default_rng(7)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for pkt in inp.demux():
            if pkt.dts is None:  # the demuxer's flush packets
                continue
            idx = pkt.stream.index
            if pkt.stream.type == "video":
                bad = av.Packet(rng.integers(0, 256, pkt.size, dtype=np.uint8).tobytes())
                bad.pts, bad.dts, bad.time_base = pkt.pts, pkt.dts, pkt.time_base
                pkt = bad
            pkt.stream = streams[idx]
            out.mux(pkt)
    return dst


@dataclass(frozen=True)
class TinyVideo:
    """A written lossless video and exactly what decoding it must give back."""

    path: Path
    frames: np.ndarray  # uint8 (T, H, W, 3), equal to the decoded frames
    fps: int | Fraction
    audio: np.ndarray | None  # int16 (channels, n) as muxed, or None
    sample_rate: int


class TinyVideoFactory(Protocol):
    """The `tiny_video` fixture: writes one lossless video under the test's tmp_path."""

    def __call__(self, frames: int | np.ndarray = 10, *, fps: int | Fraction = 25,
                 size: tuple[int, int] = (16, 24), audio: np.ndarray | None = None, sample_rate: int = 16000,
                 name: str = "tiny.mkv") -> TinyVideo: ...


def tiny_video(path: Path, frames: int | np.ndarray = 10, *, fps: int | Fraction = 25,
               size: tuple[int, int] = (16, 24), audio: np.ndarray | None = None,
               sample_rate: int = 16000) -> TinyVideo:
    """Write `frames` (an array, or a count of numbered frames of `size`) losslessly to `path`."""
    data = numbered_frames(frames, size) if isinstance(frames, int) else np.asarray(frames)
    write_video(path, data, fps=fps, audio=audio, sample_rate=sample_rate)
    return TinyVideo(path, data, fps, None if audio is None else to_pcm16(audio), sample_rate)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (SIGALRM; the tests run on Linux)."""
    def boom(*_: object) -> None:
        raise TimeoutError(f"decode did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
