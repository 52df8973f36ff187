"""Frame output for `extract.decode.iter_frames`: upright RGB conversion, resizing and bounded batches."""
from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import av
import av.error
from av.video.reformatter import VideoReformatter
import numpy as np

from extract.decode_grid import display_transform


@dataclass
class FrameBatch:
    """Consecutive output frames: RGB uint8 (B, H, W, 3), their times k/fps (B,) and indices k (B,)."""

    frames: np.ndarray
    times: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def display_matrix(frame: Any) -> tuple[int, ...] | None:
    """The frame's DISPLAYMATRIX side data as 9 int32, or None."""
    try:
        sd = frame.side_data.get("DISPLAYMATRIX")
    except (AttributeError, KeyError, ValueError):
        # PyAV cannot list side data of a type it does not know (FFmpeg 8 attaches EXIF to JPEGs): rebuild the
        # rotation from frame.rotation, which reads the matrix directly (mirroring is lost on this path)
        return _rotation_matrix(getattr(frame, "rotation", 0) or 0)
    if sd is None:
        return None
    raw = bytes(sd)
    return tuple(int(v) for v in np.frombuffer(raw[:36], dtype="<i4")) if len(raw) >= 36 else None


def _rotation_matrix(ccw_degrees: float) -> tuple[int, ...] | None:
    """A pure rotation display matrix (16.16 fixed point) for a counter-clockwise angle; None for 0."""
    if not ccw_degrees:
        return None
    r = math.radians(-ccw_degrees)
    c, s = round(math.cos(r) * 65536), round(math.sin(r) * 65536)
    return (c, s, 0, -s, c, 0, 0, 0, 1 << 30)


def out_size(w: int, h: int, height: int | None, short_side: int | None) -> tuple[int, int]:
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
        self.turn = (0, False, False)  # (clockwise degrees, hflip, vflip) applied after conversion

    def __call__(self, frame: Any, size: tuple[int, int] | None) -> np.ndarray:
        """Upright RGB at `size` (width, height as displayed; None = source size)."""
        rot, hflip, vflip = self.turn
        if size is not None and rot in (90, 270):
            size = (size[1], size[0])  # scale in the coded orientation, then turn
        rgb = self._rgb(frame, size)
        if rot:
            rgb = np.rot90(rgb, k={90: -1, 180: 2, 270: 1}[rot])
        if hflip:
            rgb = rgb[:, ::-1]
        if vflip:
            rgb = rgb[::-1]
        return np.ascontiguousarray(rgb) if (rot or hflip or vflip) else rgb

    def _rgb(self, frame: Any, size: tuple[int, int] | None) -> np.ndarray:
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


class Held:
    """The source frame shown by the next output frames, converted to RGB once, and the output batches.

    `keep`: the output indices to convert and yield (None: all). Skipped indices cost no colour conversion or
    resize; the last output frame is always yielded (`emit_last`), since samplers use it for steps past the end.
    """

    def __init__(self, batch_size: int, fps: float, height: int | None, short_side: int | None,
                 keep: Collection[int] | None = None) -> None:
        self.batcher = _Batcher(batch_size, fps)
        self.to_rgb = _ToRGB()
        self.height, self.short_side = height, short_side
        self.keep = None if keep is None else frozenset(int(k) for k in keep)
        self.frame: Any = None
        self.rgb: np.ndarray | None = None
        self.size: tuple[int, int] | None = None
        self.k = 0  # next output index
        self.skipped: Any = None  # the source frame of the last output index when it was skipped
        self.converted = 0  # frames colour-converted (each held source frame at most once)

    def hold(self, frame: Any) -> None:
        if self.frame is None:  # the first frame fixes orientation and output size
            self.to_rgb.turn = display_transform(display_matrix(frame))
            w, h = frame.width, frame.height
            if self.to_rgb.turn[0] in (90, 270):
                w, h = h, w
            self.size = out_size(w, h, self.height, self.short_side)
        self.frame, self.rgb = frame, None

    def emit(self, n: int) -> Iterator[FrameBatch]:
        """`n` output frames showing the held frame (those not in `keep` are counted, not converted)."""
        for _ in range(n):
            k, self.k = self.k, self.k + 1
            if self.keep is not None and k not in self.keep:
                self.skipped = self.frame
                continue
            self.skipped = None
            b = self.batcher.add(k, self._rgb())
            if b is not None:
                yield b

    def emit_last(self) -> Iterator[FrameBatch]:
        """The last output frame when `keep` skipped it (call once, after the last `emit`)."""
        if self.skipped is not None:
            frame, self.skipped = self.skipped, None
            rgb = self._rgb() if frame is self.frame else self.to_rgb(frame, self.size)
            if frame is not self.frame:
                self.converted += 1
            b = self.batcher.add(self.k - 1, rgb)
            if b is not None:
                yield b

    def _rgb(self) -> np.ndarray:
        """The held frame as RGB, converted once."""
        if self.rgb is None:
            self.rgb = self.to_rgb(self.frame, self.size)
            self.converted += 1
        return self.rgb
