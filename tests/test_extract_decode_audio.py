"""iter_audio keeps resampled values beyond [-1, 1] (as FFmpeg and TF VGGish do) and downmixes by the channel mean.

The reference is FFmpeg's own `aresample` + `aformat` filter graph (PyAV's av.filter.Graph) on the same decoded
frames, with the channel mean taken in numpy.
"""
from __future__ import annotations

from pathlib import Path

import av
import av.filter
import numpy as np

from extract.decode import SAMPLE_RATE, iter_audio, read_audio
from tests._media import write_numbered


def ffmpeg_resampled(path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """FFmpeg's aresample to `rate` Hz, planar float, channels averaged: (n,) float64."""
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        graph = av.filter.Graph()
        src = graph.add_abuffer(template=stream)
        res = graph.add("aresample", str(rate))
        fmt = graph.add("aformat", f"sample_fmts=fltp:sample_rates={rate}")
        sink = graph.add("abuffersink")
        src.link_to(res)
        res.link_to(fmt)
        fmt.link_to(sink)
        graph.configure()
        out: list[np.ndarray] = []

        def drain() -> None:
            while True:
                try:
                    out.append(graph.pull().to_ndarray().astype(np.float64))
                except (av.error.BlockingIOError, av.error.EOFError):
                    return

        for frame in c.decode(stream):
            graph.push(frame)
            drain()
        graph.push(None)
        drain()
    return np.concatenate(out, axis=1).mean(axis=0)


def square_wave(sr: int, seconds: float, hz: float, amp: float) -> np.ndarray:
    """Full-scale square wave: band-limiting it when resampling rings past the peak (Gibbs)."""
    t = np.arange(int(sr * seconds)) / sr
    return amp * np.sign(np.sin(2 * np.pi * hz * t) + 1e-12)


def test_loud_stereo_keeps_overshoot_and_matches_ffmpeg(tmp_path: Path) -> None:
    sr = 44100
    left = square_wave(sr, 1.0, 441.0, 32767)
    right = square_wave(sr, 1.0, 441.0, 24000)  # different levels: the mean is not either channel
    pcm = np.round(np.stack([left, right])).astype(np.int16)
    path = tmp_path / "loud.mkv"
    write_numbered(path, n=25, rate=25, audio=pcm, sample_rate=sr)
    got = read_audio(path)
    want = ffmpeg_resampled(path)
    assert got is not None and got.dtype == np.float32
    assert abs(got.size - want.size) <= 1
    n = min(got.size, want.size)
    np.testing.assert_allclose(got[:n], want[:n], atol=2e-6)
    assert np.abs(want).max() > 1.0  # the reference overshoots: the test can see clipping
    assert np.abs(got).max() > 1.0


def test_float_source_beyond_full_scale_is_kept(tmp_path: Path) -> None:
    samples = (np.sin(np.arange(SAMPLE_RATE) * 2 * np.pi * 200 / SAMPLE_RATE) * 1.7).astype(np.float32)
    path = tmp_path / "hot.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_f32le", rate=SAMPLE_RATE, layout="mono")
        for i in range(0, samples.size, 1000):
            f = av.AudioFrame.from_ndarray(samples[None, i:i + 1000], format="flt", layout="mono")
            f.sample_rate, f.pts = SAMPLE_RATE, i
            c.mux(s.encode(f))
        c.mux(s.encode())
    got = np.concatenate(list(iter_audio(path, chunk_samples=4000)))
    np.testing.assert_array_equal(got, samples)  # 16 kHz float in, 16 kHz float out: exact
    assert got.max() > 1.69
