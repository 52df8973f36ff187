"""iter_frames' default frame choice equals FFmpeg's own `fps` filter, frame for frame; probe predicts the count.

The reference runs FFmpeg's `fps=25` filter (PyAV's av.filter.Graph) on the decoded source frames, fed as the
`ffmpeg` command line feeds it: every pts shifted by the container's start time. Sources are lossless and every
source frame carries its index in its pixels, so frames are compared by index, exactly.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import av.filter
import numpy as np
import pytest

from extract.decode import FRAME_RULES, iter_frames, probe, read_frames
from tests._media import shown_index, source_frame, write_numbered


def ffmpeg_fps(path: Path, fps: str = "25") -> np.ndarray:
    """Source indices shown by FFmpeg's fps filter (defaults: round=near, eof_action=round)."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        tb = vs.time_base
        # ffmpeg (no -copyts) adds av_rescale_q(-start_time, AV_TIME_BASE_Q, tb): round half away from zero
        start = Fraction(c.start_time or 0, 1_000_000) / tb
        shift = int(start + Fraction(1, 2)) if start >= 0 else -int(-start + Fraction(1, 2))
        graph = av.filter.Graph()
        src = graph.add_buffer(template=vs)
        flt = graph.add("fps", fps)
        sink = graph.add("buffersink")
        src.link_to(flt)
        flt.link_to(sink)
        graph.configure()
        shown: list[int] = []

        def drain() -> None:
            while True:
                try:
                    out = graph.pull()
                except (av.error.BlockingIOError, av.error.EOFError):
                    return
                shown.append(int(shown_index(out.to_ndarray(format="rgb24")[None])[0]))

        for frame in c.decode(vs):
            frame.pts -= shift
            graph.push(frame)
            drain()
        graph.push(None)
        drain()
    return np.asarray(shown, np.int64)


def check_against_ffmpeg(path: Path, size: tuple[int, int] = (16, 24), fps: float = 25.0) -> np.ndarray:
    """tvr's default output equals the filter's, index for index and pixel for pixel; probe predicts the count."""
    want = ffmpeg_fps(path, str(fps))
    fb = read_frames(path, fps=fps)
    np.testing.assert_array_equal(shown_index(fb.frames), want)
    np.testing.assert_array_equal(fb.index, np.arange(len(want)))
    np.testing.assert_allclose(fb.times, np.arange(len(want)) / fps)
    for k in range(len(want)):  # whole frames, not just the index pixel
        np.testing.assert_array_equal(fb.frames[k], source_frame(int(want[k]), *size))
    info = probe(path)
    assert info.n_output_frames(fps) == len(want)
    assert info.n_output_frames(fps, frame_rule="floor") == len(read_frames(path, fps=fps, frame_rule="floor"))
    return want


@pytest.mark.parametrize("rate,n,ext", [(30, 45, "mp4"), (24, 36, "mkv"), (50, 61, "mkv"), (25, 20, "mp4"),
                                        (10, 12, "mkv"), (Fraction(30000, 1001), 40, "mp4"),
                                        (Fraction(981, 50), 90, "mkv"), (Fraction(981, 50), 90, "mp4")],
                         ids=["30-mp4", "24-mkv", "50-mkv", "25-mp4", "10-mkv", "29.97-mp4", "19.62-mkv",
                              "19.62-mp4"])
def test_constant_rate_matches_ffmpeg_fps_filter(tmp_path: Path, rate: Fraction, n: int, ext: str) -> None:
    path = tmp_path / f"cfr.{ext}"
    write_numbered(path, n=n, rate=rate)
    want = check_against_ffmpeg(path)
    if rate == 50:  # t = (2j+1)/50 sits exactly on a half slot: FFmpeg rounds it up, to the next slot
        assert want[:3].tolist() == [0, 2, 4]


def test_floor_and_nearest_differ_where_the_issue_says(tmp_path: Path) -> None:
    path = tmp_path / "v30.mp4"
    write_numbered(path, n=90, rate=30)
    nearest = shown_index(read_frames(path).frames)
    floor = shown_index(read_frames(path, frame_rule="floor").frames)
    assert len(nearest) == len(floor) == 75
    assert 0.3 < np.mean(nearest != floor) < 0.5  # about 40% of frames move by one source frame
    assert np.abs(nearest - floor).max() == 1


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_rate_matches_ffmpeg_fps_filter(tmp_path: Path, ext: str) -> None:
    # bursts, a frame superseded within one slot, exact half-slot times (20, 60 ms), long gaps
    ms = [0, 10, 20, 60, 100, 130, 500, 520, 900, 1300, 1318, 3100]
    path = tmp_path / f"vfr.{ext}"
    write_numbered(path, [Fraction(t, 1000) for t in ms], rate=25, time_base=Fraction(1, 1000))
    want = check_against_ffmpeg(path)
    assert want[:4].tolist() == [1, 2, 3, 5]  # 10 ms -> slot 0; 20 ms = 0.5 -> 1; 60 ms = 1.5 -> 2; 130 ms -> 3


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_first_timestamp_not_zero(tmp_path: Path, ext: str) -> None:
    ms = [370 + 33 * i for i in range(30)]
    path = tmp_path / f"late.{ext}"
    write_numbered(path, [Fraction(t, 1000) for t in ms], rate=30, time_base=Fraction(1, 1000))
    with av.open(str(path)) as c:  # guards the fixture: the video really starts late
        first = next(c.decode(video=0))
        assert first.pts * first.time_base == Fraction(37, 100)
    check_against_ffmpeg(path)
    assert probe(path).video_start == pytest.approx(0.0)  # ffmpeg's timeline starts at the container start


def test_video_starting_after_audio(tmp_path: Path) -> None:
    # Audio from 0 s, video from 50 ms: ffmpeg keeps the 50 ms, so its grid is not anchored on the first frame
    ms = [50 + 40 * i for i in range(20)]
    pcm = np.zeros((1, 16000), np.int16)
    path = tmp_path / "av.mkv"
    write_numbered(path, [Fraction(t, 1000) for t in ms], rate=25, time_base=Fraction(1, 1000),
                   audio=pcm, sample_rate=16000)
    want = check_against_ffmpeg(path)
    assert probe(path).video_start == pytest.approx(0.05)
    assert want[0] == 0 and len(want) == 20  # slots 1..20: 50 ms -> 1.25 -> 1; end 0.85 s -> 21.25 -> 21


@pytest.mark.parametrize("fps", [1.0, 10.0, 30.0])
def test_other_output_rates_match_ffmpeg(tmp_path: Path, fps: float) -> None:
    path = tmp_path / "v.mkv"
    write_numbered(path, n=70, rate=Fraction(981, 50))
    check_against_ffmpeg(path, fps=fps)


def test_frame_rule_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "v.mkv"
    write_numbered(path, n=3)
    assert FRAME_RULES == ("nearest", "floor")
    with pytest.raises(ValueError, match="frame_rule"):
        next(iter_frames(path, frame_rule="round"))


def write_lossy(path: Path, n: int, rate: Fraction | int) -> None:
    """Ordinary H.264 (yuv420p, B-frames, lossy) as cameras and datasets ship it."""
    yy, xx = np.mgrid[0:36, 0:64]
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=rate)
        vs.width, vs.height, vs.pix_fmt, vs.options = 64, 36, "yuv420p", {"preset": "ultrafast", "bf": "2"}
        for i in range(n):
            img = np.stack([(xx + 5 * i) % 256, (yy + 3 * i) % 256, np.full_like(xx, i % 256)], -1).astype(np.uint8)
            c.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(vs.encode())


def ffmpeg_fps_frames(path: Path) -> np.ndarray:
    """RGB frames out of FFmpeg's fps=25 filter (same decoder, same conversion): (n, h, w, 3)."""
    out = []
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        start = Fraction(c.start_time or 0, 1_000_000) / vs.time_base
        shift = int(start + Fraction(1, 2))
        graph = av.filter.Graph()
        src, flt, sink = graph.add_buffer(template=vs), graph.add("fps", "25"), graph.add("buffersink")
        src.link_to(flt)
        flt.link_to(sink)
        graph.configure()
        frames = list(c.decode(vs)) + [None]
        for frame in frames:
            if frame is not None:
                frame.pts -= shift
            graph.push(frame)
            while True:
                try:
                    out.append(graph.pull().to_ndarray(format="rgb24"))
                except (av.error.BlockingIOError, av.error.EOFError):
                    break
    return np.stack(out)


@pytest.mark.parametrize("rate,ext", [(30, "mp4"), (Fraction(981, 50), "mp4"), (30, "mkv"), (Fraction(981, 50), "mkv")],
                         ids=["30-mp4", "19.62-mp4", "30-mkv", "19.62-mkv"])
def test_bframe_h264_matches_ffmpeg_and_probe(tmp_path: Path, rate: Fraction | int, ext: str) -> None:
    # B-frames + an MP4 edit list: the header's duration and the last packet's end disagree (issue 10: 452 vs 453)
    path = tmp_path / f"cam.{ext}"
    write_lossy(path, 61, rate)
    want = ffmpeg_fps_frames(path)
    got = read_frames(path).frames
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert probe(path).n_output_frames() == len(want)
