"""Phone rotation: iter_frames applies the display matrix as ffmpeg's autorotate does; probe reports it.

The reference is FFmpeg's own transpose / hflip / vflip filters (PyAV's av.filter.Graph) on the same decoded
frames, chosen the way the ffmpeg command line chooses them for each matrix.
"""
from __future__ import annotations

from pathlib import Path

import av
import av.filter
import numpy as np
import pytest

from extract.decode import probe, read_frames
from tests._media import source_frame

H, W = 16, 24


def write_rotated(path: Path, degrees: int, hflip: bool = False, n: int = 10) -> None:
    """Lossless 25 fps video whose display matrix rotates `degrees` counter-clockwise (then mirrors)."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264rgb", rate=25)
        vs.width, vs.height, vs.pix_fmt, vs.options = W, H, "rgb24", {"crf": "0"}
        vs.set_display_rotation(degrees, hflip=hflip)
        for i in range(n):
            img = source_frame(i, H, W)
            img[0, 0, 2], img[-1, 0, 2] = 255, 0  # corners that tell every orientation apart
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(vs.encode(frame))
        c.mux(vs.encode())


def ffmpeg_filtered(path: Path, chain: list[tuple[str, str | None]]) -> np.ndarray:
    """Every decoded frame through FFmpeg's own filters, as RGB (n, h, w, 3)."""
    out = []
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        graph = av.filter.Graph()
        last = graph.add_buffer(template=vs)
        for name, arg in chain:
            node = graph.add(name, arg) if arg is not None else graph.add(name)
            last.link_to(node)
            last = node
        sink = graph.add("buffersink")
        last.link_to(sink)
        graph.configure()
        for frame in c.decode(vs):
            graph.push(frame)
            out.append(graph.pull().to_ndarray(format="rgb24"))
    return np.stack(out)


# PyAV's angle is counter-clockwise; ffmpeg turns clockwise by -angle: 90 -> transpose=cclock, -90 -> clock,
# 180 -> hflip + vflip, 90 then mirrored -> transpose=clock_flip (matrix[3] < 0; fftools autorotate).
CASES = [(90, False, [("transpose", "cclock")], 270), (-90, False, [("transpose", "clock")], 90),
         (180, False, [("hflip", None), ("vflip", None)], 180), (90, True, [("transpose", "clock_flip")], 90)]


@pytest.mark.parametrize("degrees,hflip,chain,cw", CASES, ids=["ccw90", "cw90", "180", "ccw90-mirrored"])
@pytest.mark.parametrize("ext", ["mp4", "mov"])
def test_rotation_matches_ffmpeg_autorotate(tmp_path: Path, ext: str, degrees: int, hflip: bool,
                                             chain: list[tuple[str, str | None]], cw: int) -> None:
    path = tmp_path / f"phone.{ext}"
    write_rotated(path, degrees, hflip)
    want = ffmpeg_filtered(path, chain)
    fb = read_frames(path)
    np.testing.assert_array_equal(fb.frames, want)
    info = probe(path)
    assert info.rotation == cw
    assert (info.height, info.width) == want.shape[1:3]


def test_rotated_resize_uses_the_upright_size(tmp_path: Path) -> None:
    path = tmp_path / "phone.mp4"
    write_rotated(path, 90)
    fb = read_frames(path, height=12)  # upright: 24 tall x 16 wide -> 12 x 8
    assert fb.frames.shape == (10, 12, 8, 3)
    red = fb.frames[..., 0].astype(int)
    np.testing.assert_array_equal(np.median(red.reshape(10, -1), axis=1), np.arange(10))


def test_unrotated_video_reports_zero(tmp_path: Path) -> None:
    path = tmp_path / "flat.mp4"
    write_rotated(path, 0)
    assert probe(path).rotation == 0
    np.testing.assert_array_equal(read_frames(path).frames, ffmpeg_filtered(path, []))


@pytest.mark.parametrize("orientation,chain,cw", [(6, [("transpose", "clock")], 90),
                                                  (3, [("hflip", None), ("vflip", None)], 180),
                                                  (8, [("transpose", "cclock")], 270)])
def test_jpeg_exif_orientation_is_applied(tmp_path: Path, orientation: int, chain: list[tuple[str, str | None]],
                                          cw: int) -> None:
    from PIL import Image

    img = source_frame(0, H, W)
    img[0, 0], img[-1, 0] = (255, 0, 0), (0, 255, 0)
    pil = Image.fromarray(img)
    exif = pil.getexif()
    exif[0x0112] = orientation  # EXIF Orientation, as phone cameras write it
    path = tmp_path / "photo.jpg"
    pil.save(path, exif=exif.tobytes(), quality=100, subsampling=0)  # 4:4:4: turning commutes with colour
    want = ffmpeg_filtered(path, chain)
    np.testing.assert_array_equal(read_frames(path).frames, want)
    info = probe(path)
    assert info.kind == "image" and info.rotation == cw
    assert (info.height, info.width) == want.shape[1:3]
