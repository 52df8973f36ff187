"""Truncation is decided from evidence of missing data, never from the last timestamp vs the declared duration.

Intact variable-frame-rate files whose frames are seconds apart (screen recordings, timelapses) in MKV, MP4 and
WebM are never flagged, including files whose last frame's display time is in the header (Matroska DURATION
tag) but not in the last block. Cut-off copies of each, at several cut points, are always flagged.
"""
from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from extract.decode import DecodeError, TruncatedMedia, iter_audio, iter_frames, probe
from extract.decode_integrity import structural_gap
from tests._media import deadline, ramp_tone, shown_index, source_frame, write_audio, write_numbered

GAPS_MS = [0, 40, 80, 3000, 3040, 6200]  # two gaps of about 3 s; the last frame is shown for 2.8 s
END_MS = 9000
LAYOUTS = ["mkv", "mp4", "mp4-faststart", "webm"]


def write_vfr(path: Path, layout: str) -> None:
    """Frame i at GAPS_MS[i] ms, each packet carrying its true display duration (the last one 2.8 s)."""
    ends = GAPS_MS[1:] + [END_MS]
    dur_ms = {t: e - t for t, e in zip(GAPS_MS, ends)}
    webm = layout == "webm"
    codec, pix, opts = ("libvpx-vp9", "yuv444p", {"lossless": "1"}) if webm else ("libx264rgb", "rgb24", {"crf": "0"})
    cont = {"movflags": "+faststart"} if layout == "mp4-faststart" else {}
    with av.open(str(path), "w", options=cont) as c:
        vs = c.add_stream(codec, rate=25)
        vs.width, vs.height, vs.pix_fmt, vs.options = 24, 16, pix, opts
        vs.time_base = vs.codec_context.time_base = Fraction(1, 1000)

        def mux(packets: list[av.Packet]) -> None:
            for p in packets:
                if p.pts is not None:  # the encoder says 40 ms (its nominal rate); a recorder knows better
                    ms = round(p.pts * p.time_base * 1000)
                    p.duration = round(Fraction(dur_ms[ms], 1000) / p.time_base)
                c.mux(p)

        for i, t in enumerate(GAPS_MS):
            frame = av.VideoFrame.from_ndarray(source_frame(i, 16, 24), format="rgb24")
            frame = frame.reformat(format=pix) if webm else frame
            frame.pts = t
            mux(vs.encode(frame))
        mux(vs.encode())


def hide_last_duration(path: Path) -> None:
    """Matroska: the last block says 40 ms while the DURATION tag keeps its 2.8 s (older muxers write this)."""
    data = bytearray(path.read_bytes())
    i = data.rfind(b"\x9b\x82\x0a\xf0")  # BlockDuration, 2 bytes, 2800 ms
    assert i > 0, "fixture: no 2.8 s BlockDuration found"
    data[i + 2:i + 4] = (40).to_bytes(2, "big")
    path.write_bytes(bytes(data))


def decode_outcome(path: Path) -> tuple[int, BaseException | None]:
    """Output frames iter_frames yields and the DecodeError it ends with (None when clean)."""
    n = 0
    try:
        with deadline(30):
            for b in iter_frames(path):
                n += len(b)
    except DecodeError as e:
        return n, e
    return n, None


@pytest.mark.parametrize("layout,hidden", [(lay, False) for lay in LAYOUTS] + [("mkv", True), ("webm", True)])
def test_intact_vfr_with_long_gaps_is_not_truncated(tmp_path: Path, layout: str, hidden: bool) -> None:
    # hidden: the exact false alarm of issue 10 ("decoding stopped at 6.24 s of the declared 9.00 s")
    ext = layout.split("-")[0]
    path = tmp_path / f"gaps.{ext}"
    write_vfr(path, layout)
    if hidden:
        hide_last_duration(path)
    info = probe(path)
    assert info.duration == pytest.approx(END_MS / 1000)  # the header promises the full 9 s either way
    n, err = decode_outcome(path)
    assert err is None, err
    assert n == info.n_output_frames()
    assert structural_gap(str(path)) == (True, None)
    if ext != "webm":  # lossless RGB: the frames are the real pictures
        frames = np.concatenate([b.frames for b in iter_frames(path)])
        assert set(shown_index(frames).tolist()) == set(range(len(GAPS_MS)))


CUTS = [0.2, 0.5, 0.8, 0.95]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_cut_copy_is_caught(tmp_path: Path, layout: str) -> None:
    ext = layout.split("-")[0]
    whole = tmp_path / f"whole.{ext}"
    write_vfr(whole, layout)
    data = whole.read_bytes()
    cuts = sorted({int(len(data) * f) for f in CUTS} | {len(data) - 1, len(data) - 9})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.{ext}"
        path.write_bytes(data[:cut])
        n, err = decode_outcome(path)
        assert isinstance(err, TruncatedMedia), (layout, cut, len(data), err)
        assert str(path) in str(err) and "cut short" in str(err), err
        known, gap = structural_gap(str(path))
        assert known and gap is not None, (layout, cut)


def test_cut_at_a_box_boundary_is_caught_by_the_index(tmp_path: Path) -> None:
    # faststart MP4 = ftyp, moov, mdat: cut right before mdat, every box left is whole; the sample index is not
    path = tmp_path / "v.mp4"
    write_numbered(path, n=50, rate=25, size=(32, 32))
    whole = tmp_path / "fast.mp4"
    with av.open(str(path)) as src, av.open(str(whole), "w", options={"movflags": "+faststart"}) as dst:
        s = dst.add_stream_from_template(src.streams.video[0])
        for pkt in src.demux(src.streams.video[0]):
            if pkt.size:
                pkt.stream = s
                dst.mux(pkt)
    data = whole.read_bytes()
    mdat = data.find(b"mdat") - 4
    head = data[:mdat] + struct.pack(">I4s", 8, b"free")  # a whole, empty box where mdat was
    cut = tmp_path / "boundary.mp4"
    cut.write_bytes(head)
    assert structural_gap(str(cut)) == (True, None)  # the box walk alone sees nothing missing
    n, err = decode_outcome(cut)
    assert isinstance(err, TruncatedMedia) and "index points" in str(err), err


@pytest.mark.parametrize("ext,sr", [("mkv", 16000), ("flv", 22050)])
def test_cut_audio_is_caught_without_duration_checks(tmp_path: Path, ext: str, sr: int) -> None:
    path = tmp_path / f"a.{ext}"
    write_numbered(path, n=100, rate=25, size=(16, 16), audio=ramp_tone(sr, 4.0), sample_rate=sr)
    data = path.read_bytes()
    for frac in (0.3, 0.7):
        cut = tmp_path / f"cut{frac}.{ext}"
        cut.write_bytes(data[:int(len(data) * frac)])
        with deadline(30), pytest.raises(TruncatedMedia) as ei:
            for _ in iter_audio(cut):
                pass
        assert ei.value.stage == "audio decode" and "cut short" in str(ei.value)


def test_bytes_after_the_last_box_are_not_a_cut(tmp_path: Path) -> None:
    path = tmp_path / "padded.mp4"
    write_numbered(path, n=30, rate=30)
    with open(path, "ab") as f:
        f.write(b"\0" * 64 + b"\xff\xfe" * 32)  # camera padding / junk that is no box
    n, err = decode_outcome(path)
    assert err is None and n == probe(path).n_output_frames() == 25


@pytest.mark.parametrize("ext", ["wav", "avi"])
def test_riff_files_cut_are_caught(tmp_path: Path, ext: str) -> None:
    path = tmp_path / f"a.{ext}"
    if ext == "wav":
        write_audio(path, ramp_tone(16000, 2.0)[0], 16000)
    else:
        write_numbered(path, n=50, rate=25, size=(16, 16), audio=ramp_tone(16000, 2.0), sample_rate=16000)
    assert structural_gap(str(path)) == (True, None)
    assert list(iter_audio(path))  # intact: no error
    data = path.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    with deadline(30), pytest.raises(TruncatedMedia, match="cut short"):
        for _ in iter_audio(cut):
            pass
    known, gap = structural_gap(str(cut))
    assert known and gap is not None and "RIFF chunk" in gap
