"""extract.decode on real files written here with PyAV: exact 25 fps resampling, resize, audio, images, errors.

Video pixels encode the source frame index (red = i % 256, green = i // 256; blue is a fixed spatial pattern),
and the codecs are lossless (libx264rgb crf 0), so every output frame is checked against the exact source frame
the contract says it must show. The exact-mapping tests here pin the "floor" rule (output k is the latest source
frame whose timestamp is <= k/25); the default "nearest" rule is checked against FFmpeg's own fps filter in
test_extract_decode_fps.py.
"""
from __future__ import annotations

import math
import pickle
import tracemalloc
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from extract.decode import (
    DecodeError,
    FrameBatch,
    MediaInfo,
    TruncatedMedia,
    iter_audio,
    iter_frames,
    probe,
    read_audio,
    read_frames,
)
from tests._media import deadline, ramp_tone, shown_index, source_frame, write_audio, write_numbered

OUT_FPS = 25


def expected_mapping(times: Sequence[Fraction], n_out: int) -> np.ndarray:
    """Contract: output k shows the latest source frame with timestamp <= k/25 (times relative to frame 0)."""
    t0 = times[0]
    out = []
    for k in range(n_out):
        t = Fraction(k, OUT_FPS)
        out.append(max(i for i, ti in enumerate(times) if ti - t0 <= t))
    return np.asarray(out, np.int64)


def collect(path: Path, **kw: object) -> tuple[list[FrameBatch], BaseException | None]:
    """All batches iter_frames yields, and the exception it ended with (if any)."""
    batches: list[FrameBatch] = []
    try:
        for b in iter_frames(path, **kw):
            batches.append(b)
    except DecodeError as e:
        return batches, e
    return batches, None


# ---- constant-rate sources above, at and below 25 fps ----
@pytest.mark.parametrize("src_fps,n,ext", [(30, 45, "mp4"), (24, 36, "mkv"), (50, 60, "mkv"), (25, 20, "mp4"),
                                           (10, 12, "mkv")])
def test_constant_rate_resampled_exactly(tmp_path: Path, src_fps: int, n: int, ext: str) -> None:
    path = tmp_path / f"v{src_fps}.{ext}"
    write_numbered(path, n=n, rate=src_fps)
    info = probe(path)
    assert (info.kind, info.has_video, info.has_audio) == ("video", True, False)
    assert info.duration == pytest.approx(n / src_fps, abs=2e-3)
    assert (info.width, info.height) == (24, 16) and info.fps == pytest.approx(src_fps, rel=1e-3)
    n_out = math.ceil(Fraction(n, src_fps) * OUT_FPS)
    assert info.n_output_frames(frame_rule="floor") == n_out
    fb = read_frames(path, frame_rule="floor")
    assert fb.frames.shape == (n_out, 16, 24, 3) and fb.frames.dtype == np.uint8
    want = expected_mapping([Fraction(i, src_fps) for i in range(n)], n_out)
    np.testing.assert_array_equal(shown_index(fb.frames), want)
    for k in range(n_out):  # whole frames, not just the index pixel
        np.testing.assert_array_equal(fb.frames[k], source_frame(int(want[k]), 16, 24))
    np.testing.assert_array_equal(fb.index, np.arange(n_out))


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_frame_rate(tmp_path: Path, ext: str) -> None:
    ms = [0, 10, 100, 130, 500, 520, 900, 1300]  # bursts, a frame superseded within one grid step, a long gap
    times = [Fraction(t, 1000) for t in ms]
    path = tmp_path / f"vfr.{ext}"
    write_numbered(path, times, rate=25, time_base=Fraction(1, 1000))
    with av.open(str(path)) as c:  # the file really is VFR (guards the fixture itself)
        got = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    np.testing.assert_allclose(got, [float(t) for t in times], atol=1e-6)
    info = probe(path)
    assert 1.3 < info.duration <= 1.3 + 0.1  # last frame's start + its duration
    fb = read_frames(path, frame_rule="floor")
    assert len(fb) == math.ceil(info.duration * OUT_FPS - 1e-9) == info.n_output_frames(frame_rule="floor")
    want = expected_mapping(times, len(fb))
    np.testing.assert_array_equal(shown_index(fb.frames), want)
    assert 4 not in want and want[-1] == 7  # 0.50 s is replaced by 0.52 s before any grid point shows it
    np.testing.assert_array_equal(fb.frames[3], source_frame(2, 16, 24))


def test_batches_bounded_with_grid_times(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    write_numbered(path, n=45, rate=30)
    batches, err = collect(path, batch_size=7)
    assert err is None
    assert [len(b) for b in batches] == [7, 7, 7, 7, 7, 3]  # 38 output frames
    for b in batches:
        assert b.frames.shape[0] == b.times.shape[0] == b.index.shape[0] == len(b)
        assert b.times.dtype == np.float64 and b.index.dtype == np.int64
        np.testing.assert_array_equal(b.times, b.index / 25.0)
    index = np.concatenate([b.index for b in batches])
    np.testing.assert_array_equal(index, np.arange(38))
    frames = np.concatenate([b.frames for b in batches])
    np.testing.assert_array_equal(frames, read_frames(path, batch_size=64).frames)  # batching changes nothing
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_frames(path, batch_size=0))
    with pytest.raises(ValueError, match="fps"):
        next(iter_frames(path, fps=0))


def test_other_output_fps(tmp_path: Path) -> None:
    path = tmp_path / "v.mkv"
    write_numbered(path, n=30, rate=30)
    fb = read_frames(path, fps=10.0, frame_rule="floor")
    assert len(fb) == 10
    np.testing.assert_array_equal(shown_index(fb.frames), np.arange(10) * 3)
    np.testing.assert_allclose(fb.times, np.arange(10) / 10.0)
    fb = read_frames(path, fps=10.0)  # nearest: slot n shows the latest frame with t < (n + 0.5)/10
    np.testing.assert_array_equal(shown_index(fb.frames), np.arange(10) * 3 + 1)
    np.testing.assert_allclose(fb.times, np.arange(10) / 10.0)


@pytest.mark.parametrize("size,kw,want_hw", [((30, 40), {"height": 12}, (12, 16)),
                                             ((40, 30), {"short_side": 15}, (20, 15)),
                                             ((30, 40), {"short_side": 15}, (15, 20)),
                                             ((36, 64), {"height": 18}, (18, 32))])
def test_resize_keeps_aspect(tmp_path: Path, size: tuple[int, int], kw: dict, want_hw: tuple[int, int]) -> None:
    path = tmp_path / "v.mkv"
    write_numbered(path, n=10, rate=25, size=size)
    fb = read_frames(path, **kw)
    assert fb.frames.shape == (10, *want_hw, 3)
    # red/green are constant per frame, so scaling keeps them up to swscale's rounding: the mapping survives
    red = fb.frames[..., 0].astype(int)
    assert (np.abs(red - np.arange(10)[:, None, None]) <= 2).all()  # bilinear rounding
    np.testing.assert_array_equal(np.median(red.reshape(10, -1), axis=1), np.arange(10))
    assert (fb.frames[..., 1] <= 2).all()


def test_resize_needs_one_rule(tmp_path: Path) -> None:
    path = tmp_path / "v.mkv"
    write_numbered(path, n=2)
    with pytest.raises(ValueError, match="height or short_side"):
        list(iter_frames(path, height=8, short_side=8))


# ---- audio ----
def test_video_with_44k_stereo_audio_resampled_to_16k_mono(tmp_path: Path) -> None:
    sr, seconds = 44100, 2.0
    t = np.arange(int(sr * seconds)) / sr
    left = 0.6 * np.sin(2 * np.pi * 440 * t)
    right = 0.2 * np.sin(2 * np.pi * 1000 * t)
    pcm = np.round(np.stack([left, right]) * 32767).astype(np.int16)
    path = tmp_path / "av.mkv"
    write_numbered(path, n=50, rate=25, audio=pcm, sample_rate=sr)
    info = probe(path)
    assert info.has_audio and info.has_video and info.kind == "video"
    assert (info.audio_sample_rate, info.audio_channels) == (sr, 2)
    a = read_audio(path)
    assert a is not None and a.dtype == np.float32 and a.ndim == 1
    assert abs(a.size - 32000) <= 32  # duration * 16 kHz
    assert np.abs(a).max() <= 1.0
    # mono = mean of the channels: 0.3 at 440 Hz + 0.1 at 1 kHz (FFT bins are exactly 0.5 Hz wide over 2 s)
    seg = a[:32000].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg)) * 2 / seg.size
    freqs = np.fft.rfftfreq(seg.size, 1 / 16000)
    assert spec[freqs == 440][0] == pytest.approx(0.3, abs=0.01)
    assert spec[freqs == 1000][0] == pytest.approx(0.1, abs=0.01)
    others = spec.copy()
    others[(np.abs(freqs - 440) < 3) | (np.abs(freqs - 1000) < 3)] = 0
    assert others.max() < 0.01
    # chunks stream in order and add up to the whole track
    chunks = list(iter_audio(path, chunk_samples=5000))
    assert len(chunks) >= 6 and all(ch.dtype == np.float32 for ch in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), a)
    # the video track is untouched by the audio track
    np.testing.assert_array_equal(shown_index(read_frames(path).frames), np.arange(50))


def test_full_scale_stereo_is_not_clipped(tmp_path: Path) -> None:
    sr = 16000
    t = np.arange(sr) / sr
    wave = 0.9 * np.sin(2 * np.pi * 250 * t)
    pcm = np.round(np.stack([wave, wave]) * 32767).astype(np.int16)
    path = tmp_path / "loud.mkv"
    write_numbered(path, n=25, audio=pcm, sample_rate=sr)
    a = read_audio(path)
    assert a is not None
    np.testing.assert_allclose(a[:sr], pcm[0].astype(np.float32) / 32768, atol=1e-4)  # mean of equal channels


def test_video_without_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent.mp4"
    write_numbered(path, n=10)
    info = probe(path)
    assert info.has_audio is False and info.audio_sample_rate == 0
    assert list(iter_audio(path)) == []
    assert read_audio(path) is None


def test_audio_only_wav(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-20000, 20000, 24000, dtype=np.int16)
    path = tmp_path / "speech.wav"
    write_audio(path, pcm, 16000)
    info = probe(path)
    assert (info.kind, info.has_video, info.has_audio) == ("audio", False, True)
    assert info.duration == pytest.approx(1.5, abs=1e-3) and info.n_output_frames() == 0
    a = read_audio(path)
    np.testing.assert_array_equal(a, pcm.astype(np.float32) / 32768.0)  # 16 kHz mono s16: exact
    with pytest.raises(DecodeError) as ei:
        list(iter_frames(path))
    assert ei.value.stage == "stream probe" and str(path) in str(ei.value) and "no video stream" in str(ei.value)


@pytest.mark.parametrize("ext,codec", [("flac", "flac"), ("mka", "pcm_s16le")])
def test_truncated_audio_reports_after_readable_part(tmp_path: Path, ext: str, codec: str) -> None:
    # (a cut .wav cannot be told from a short one: FFmpeg sizes its data chunk from the file)
    pcm = np.random.default_rng(1).integers(-20000, 20000, 48000, dtype=np.int16)
    path = tmp_path / f"cut.{ext}"
    write_audio(path, pcm, 16000, codec)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 3])
    assert probe(path).duration == pytest.approx(3.0, abs=0.01)  # the header still declares 3 s
    got: list[np.ndarray] = []
    with deadline(20), pytest.raises(TruncatedMedia) as ei:
        for chunk in iter_audio(path, chunk_samples=4000):
            got.append(chunk)
    a = np.concatenate(got)
    assert 4000 < a.size < 24000
    np.testing.assert_array_equal(a, pcm[:a.size].astype(np.float32) / 32768.0)
    assert str(path) in str(ei.value) and ei.value.stage == "audio decode"


# ---- still images ----
def write_image(path: Path, img: np.ndarray, codec: str, pix_fmt: str, options: dict[str, str]) -> None:
    """One picture through FFmpeg's image2 muxer."""
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream(codec, rate=1, options=options)
        s.width, s.height, s.pix_fmt = img.shape[1], img.shape[0], pix_fmt
        c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)))
        c.mux(s.encode())


@pytest.mark.parametrize("ext,codec,pix_fmt,options,tol", [("png", "png", "rgb24", {}, 0),
                                                            ("jpg", "mjpeg", "yuvj444p", {"qscale": "2"}, 12),
                                                            ("webp", "libwebp", "bgra", {"lossless": "1"}, 0)])
def test_still_images(tmp_path: Path, ext: str, codec: str, pix_fmt: str, options: dict, tol: int) -> None:
    img = source_frame(0, 20, 30)
    img[..., 0] = np.arange(30)[None, :] * 8
    img[..., 1] = (np.arange(20) * 12)[:, None]
    img = np.ascontiguousarray(img)
    path = tmp_path / f"pic.{ext}"
    write_image(path, img, codec, pix_fmt, options)
    info = probe(path)
    assert info.kind == "image" and info.is_image and info.duration == 0.0
    assert (info.has_video, info.has_audio, info.width, info.height) == (True, False, 30, 20)
    assert info.n_output_frames() == 1
    batches, err = collect(path, batch_size=4)
    assert err is None and len(batches) == 1
    b = batches[0]
    assert b.frames.shape == (1, 20, 30, 3) and b.times.tolist() == [0.0] and b.index.tolist() == [0]
    diff = np.abs(b.frames[0].astype(int) - img.astype(int))
    if tol == 0:  # lossless formats: exact pixels
        np.testing.assert_array_equal(b.frames[0], img)
    else:
        assert diff.mean() <= tol / 4 and diff.max() <= tol * 4
    assert read_audio(path) is None and list(iter_audio(path)) == []
    assert read_frames(path, height=10).frames.shape == (1, 10, 15, 3)


def test_animated_gif_is_a_video_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    with av.open(str(path), "w") as c:  # 10 frames at 10 fps; frame i lights column i (exact in GIF's palette)
        s = c.add_stream("gif", rate=10)
        s.width, s.height, s.pix_fmt = 16, 8, "rgb8"
        for i in range(10):
            img = np.zeros((8, 16, 3), np.uint8)
            img[:, i] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(s.encode(frame))
        c.mux(s.encode())
    info = probe(path)
    assert (info.kind, info.is_image, info.has_audio) == ("video", False, False)
    assert info.duration == pytest.approx(1.0)
    fb = read_frames(path)
    assert len(fb) == 25 == info.n_output_frames()
    want = expected_mapping([Fraction(i, 10) for i in range(10)], 25)
    np.testing.assert_array_equal(fb.frames[:, 0, :, 0].argmax(axis=1), want)


# ---- broken input ----
def test_truncated_video_yields_readable_part_then_raises(tmp_path: Path) -> None:
    path = tmp_path / "cut.mkv"
    write_numbered(path, n=100, rate=25, size=(32, 32))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert probe(path).duration == pytest.approx(4.0)  # the header still promises 4 s
    with deadline(30):
        batches, err = collect(path, batch_size=8)
    assert isinstance(err, TruncatedMedia)
    assert str(path) in str(err) and err.stage == "packet decode"
    frames = np.concatenate([b.frames for b in batches])
    assert 10 <= len(frames) < 100
    np.testing.assert_array_equal(np.concatenate([b.index for b in batches]), np.arange(len(frames)))
    for k in range(len(frames)):  # what was yielded is the real picture, not garbage
        np.testing.assert_array_equal(frames[k], source_frame(k, 32, 32))


# FLV has no per-stream durations (only the container's, shared by both streams) and takes 22.05 kHz, not 16 kHz.
AV_FORMATS = [("mkv", 16000), ("flv", 22050)]


def decode_all(path: Path) -> tuple[np.ndarray, np.ndarray, BaseException | None, BaseException | None]:
    """Frames and audio as far as they decode, with the exception each stream ended with (or None)."""
    batches, verr = collect(path, batch_size=8)
    chunks: list[np.ndarray] = []
    aerr: BaseException | None = None
    try:
        for chunk in iter_audio(path, chunk_samples=4000):
            chunks.append(chunk)
    except DecodeError as e:
        aerr = e
    frames = np.concatenate([b.frames for b in batches]) if batches else np.zeros((0, 1, 1, 3), np.uint8)
    return frames, np.concatenate(chunks) if chunks else np.zeros(0, np.float32), verr, aerr


@pytest.mark.parametrize("ext,sr", AV_FORMATS)
def test_truncated_video_with_audio_reports_both_streams(tmp_path: Path, ext: str, sr: int) -> None:
    path = tmp_path / f"cut.{ext}"
    pcm = ramp_tone(sr, 4.0)
    write_numbered(path, n=100, rate=25, size=(32, 32), audio=pcm, sample_rate=sr)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert probe(path).duration == pytest.approx(4.0)  # the header still promises 4 s
    with deadline(30):
        frames, audio, verr, aerr = decode_all(path)
    assert isinstance(verr, TruncatedMedia) and verr.stage == "packet decode" and str(path) in str(verr)
    assert isinstance(aerr, TruncatedMedia) and aerr.stage == "audio decode" and str(path) in str(aerr)
    assert "of the declared 4.00 s" in str(verr) and "of the declared 4.00 s" in str(aerr)
    assert 25 <= len(frames) < 100 and 1.0 * 16000 <= audio.size < 3.5 * 16000
    for k in range(len(frames)):  # the readable part is the real picture
        np.testing.assert_array_equal(frames[k], source_frame(k, 32, 32))
    ref = pcm[0].astype(np.float32) / 32768
    if sr == 16000:  # and the real sound (PCM at 16 kHz is not resampled: exact)
        np.testing.assert_array_equal(audio, ref[:audio.size])
    else:  # resampled: same envelope as the source prefix
        n = audio.size * sr // 16000
        assert np.abs(audio).max() == pytest.approx(np.abs(ref[:n]).max(), abs=0.02)


# Per-stream durations: MKV (DURATION tags) and MP4 have both; NUT and FLV only the container's; AVI none for audio.
@pytest.mark.parametrize("ext,sr", AV_FORMATS + [("mp4", 16000), ("nut", 16000), ("avi", 16000)])
@pytest.mark.parametrize("video_s,audio_s", [(2.0, 3.0), (4.0, 2.0)], ids=["audio_longer", "video_longer"])
def test_intact_streams_of_different_lengths_are_not_truncated(tmp_path: Path, ext: str, sr: int,
                                                               video_s: float, audio_s: float) -> None:
    path = tmp_path / f"av.{ext}"
    pcm = ramp_tone(sr, audio_s)
    n = int(video_s * 25)
    write_numbered(path, n=n, rate=25, size=(16, 16), audio=pcm, sample_rate=sr)
    with deadline(30):
        frames, audio, verr, aerr = decode_all(path)
    assert verr is None and aerr is None, (verr, aerr)
    np.testing.assert_array_equal(shown_index(frames), np.arange(n))
    assert abs(audio.size - audio_s * 16000) <= 16
    if sr == 16000:
        np.testing.assert_array_equal(audio, pcm[0].astype(np.float32) / 32768)


@pytest.mark.parametrize("case", ["missing", "empty", "text"])
def test_unreadable_files_name_file_and_stage(tmp_path: Path, case: str) -> None:
    path = tmp_path / "clip.mp4"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is not a video\n" * 50)
    calls = [probe, lambda p: list(iter_frames(p)), read_audio, lambda p: list(iter_audio(p)), read_frames]
    for call in calls:
        with deadline(20), pytest.raises(DecodeError) as ei:
            call(path)
        e = ei.value
        assert not isinstance(e, TruncatedMedia)
        assert e.path == str(path) and e.stage == "open"
        assert str(path) in str(e) and "open failed" in str(e) and "fix:" in str(e)
    want = {"missing": "not found", "empty": "empty", "text": "Invalid data"}[case]
    assert want in str(e)


def test_decode_error_survives_pickling() -> None:
    e = TruncatedMedia("/x/clip.mp4", "packet decode", "FFmpeg: boom", "re-encode")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is TruncatedMedia and str(back) == str(e) and back.stage == "packet decode"


def test_media_info_fields() -> None:
    info = MediaInfo("a.mp4", "video", 2.01, True, False)  # no exact span: counted from the duration
    assert info.n_output_frames(frame_rule="floor") == 51 and info.n_output_frames(10.0, "floor") == 21
    assert info.n_output_frames() == 50 and info.n_output_frames(10.0) == 20 and not info.is_image
    assert MediaInfo("a.mp4", "video", 1.6, True, False).n_output_frames(frame_rule="floor") == 40
    with pytest.raises(ValueError, match="frame_rule"):
        info.n_output_frames(frame_rule="round")


# ---- streaming: memory does not grow with video length ----
def peak_while_streaming(path: Path) -> tuple[int, int]:
    """tracemalloc peak (bytes) while iterating in batches of 4, and the number of frames seen."""
    tracemalloc.start()
    try:
        n = 0
        for b in iter_frames(path, batch_size=4):
            n += len(b)
        return tracemalloc.get_traced_memory()[1], n
    finally:
        tracemalloc.stop()


def test_memory_flat_with_length(tmp_path: Path) -> None:
    short, long = tmp_path / "short.mkv", tmp_path / "long.mkv"
    write_numbered(short, n=20, size=(64, 64))
    write_numbered(long, n=400, size=(64, 64))  # 400 x 12 KiB = 4.7 MiB if it were all held
    peak_short, n_short = peak_while_streaming(short)
    peak_long, n_long = peak_while_streaming(long)
    assert (n_short, n_long) == (20, 400)
    assert peak_long < 1 << 20, peak_long
    assert peak_long < 2 * peak_short + (256 << 10), (peak_short, peak_long)


_RSS_CHILD = """
import json, sys
from extract.decode import iter_frames
def vm(key):  # VmHWM is this process's own peak (ru_maxrss would include the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
before = vm("VmRSS")
n = sum(len(b) for b in iter_frames(sys.argv[1], batch_size=16))
print(json.dumps([n, before, vm("VmHWM")]))
"""


def write_h264(path: Path, n: int, size: tuple[int, int] = (360, 640), rate: int = 30) -> None:
    """Real (lossy, yuv420p) H.264 with moving gradients: decoder buffers as for ordinary videos."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt, vs.options = w, h, "yuv420p", {"preset": "ultrafast"}
        for i in range(n):
            img = np.stack([(xx + 3 * i) % 256, (yy + 2 * i) % 256, (xx + yy + i) % 256], axis=-1).astype(np.uint8)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(vs.encode())


@pytest.mark.slow
def test_peak_rss_flat_with_video_length(tmp_path: Path) -> None:
    # Peak RSS of a fresh process (FFmpeg's own buffers included, which tracemalloc does not see).
    import json
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    got = {}
    for name, n in (("short", 90), ("long", 360)):  # 3 s and 12 s at 30 fps, 640x360
        path = tmp_path / f"{name}.mp4"
        write_h264(path, n)
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path)], env=env, check=True,
                             capture_output=True, text=True, timeout=240).stdout
        frames, before, peak = json.loads(out.strip().splitlines()[-1])
        got[name] = (frames, (peak - before) / 1024)  # MiB the decode added
    assert got["short"][0] == 75 and got["long"][0] == 300
    held_long = 300 * 360 * 640 * 3 / 2**20  # 198 MiB if every output frame were kept
    assert got["long"][1] < got["short"][1] + 32, got
    assert got["long"][1] < held_long / 2, got
