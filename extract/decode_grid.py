"""Output-grid rules for `extract.decode.iter_frames`: which source frame each fps-resampled output frame shows.

Two rules, both exact (timestamps are Fractions, never floats):

- "nearest" (default): FFmpeg's `fps` filter with its defaults (round=near, eof_action=round), as the `ffmpeg`
  command line applies it (timestamps shifted by the container's start time, no -copyts). Every source frame
  gets the grid slot r = round(t * fps) (halves away from zero); the first source frame opens the grid at its
  slot n0; output slot n shows the last decoded frame with r <= n, i.e. the latest frame with t < (n + 0.5)/fps;
  the stream ends at slot round(t_end * fps), t_end = start + duration of the last decoded frame.
- "floor" (the previous default): output k shows the latest source frame with t - t_first <= k/fps; the stream ends at
  the last frame's end.

Both yield at least one frame for a video with a decodable frame (FFmpeg's filter yields none when the whole
stream is shorter than half an output frame; a feature row needs a frame).
"""
from __future__ import annotations

import math
from fractions import Fraction

FRAME_RULES = ("nearest", "floor")


def check_rule(frame_rule: str) -> str:
    """`frame_rule` itself, or a ValueError naming the accepted values."""
    if frame_rule not in FRAME_RULES:
        raise ValueError(f"frame_rule must be one of {FRAME_RULES}, got {frame_rule!r} (\"nearest\" = FFmpeg's "
                         "fps filter, \"floor\" = latest frame at or before k/fps)")
    return frame_rule


def round_half_away(x: Fraction) -> int:
    """Nearest integer, halves away from zero (FFmpeg's AV_ROUND_NEAR_INF)."""
    n = math.floor(abs(x) + Fraction(1, 2))
    return n if x >= 0 else -n


class FrameGrid:
    """Streaming slot assignment: `push(t)` per decoded source frame, `finish(t_end)` at the end.

    Each call returns how many output frames the previously pushed frame (the one held until now) fills;
    `finish` returns how many the last frame fills. `emitted` counts output frames so far (= next index k).
    """

    def __init__(self, frame_rule: str, fps: Fraction) -> None:
        self.rule, self.fps = check_rule(frame_rule), Fraction(fps)
        self.emitted = 0
        self._next: int | None = None  # nearest: the next grid slot to fill
        self._first: Fraction | None = None  # floor: timestamp of the first frame
        self._max: Fraction | None = None  # floor: latest timestamp seen (earlier ones never move the grid back)

    def push(self, t: Fraction) -> int:
        """A new source frame at `t` s: the held frame's output count before this one takes over."""
        if self.rule == "nearest":
            r = round_half_away(t * self.fps)
            if self._next is None:
                self._next = r
                return 0
            n = max(0, r - self._next)
            self._next += n
            return self._emit(n)
        if self._first is None:
            self._first, self._max = t, t
            return 0
        assert self._max is not None
        self._max = max(self._max, t)
        return self._emit(max(0, math.ceil((t - self._first) * self.fps) - self.emitted))

    def finish(self, t_end: Fraction) -> int:
        """The last frame ends at `t_end` s (its start + duration): its output count (>= 1 if nothing came out)."""
        if self.rule == "nearest":
            assert self._next is not None, "finish() before push()"
            n = max(0, round_half_away(t_end * self.fps) - self._next)
        else:
            assert self._first is not None, "finish() before push()"
            n = max(0, math.ceil((t_end - self._first) * self.fps) - self.emitted)
        if self.emitted + n == 0:
            n = 1
        return self._emit(n)

    def _emit(self, n: int) -> int:
        self.emitted += n
        return n


def count_output_frames(frame_rule: str, fps: Fraction, first: Fraction, last: Fraction, end: Fraction) -> int:
    """What FrameGrid emits for frames from `first` to `last` (monotonic timestamps) ending at `end` s."""
    grid = FrameGrid(frame_rule, fps)
    grid.push(first)
    if last != first:
        grid.push(last)
    grid.finish(end)
    return grid.emitted


def display_transform(matrix: tuple[int, ...] | None) -> tuple[int, bool, bool]:
    """(clockwise rotation in degrees, hflip, vflip) that shows a frame upright, as ffmpeg's autorotate does.

    `matrix` is FFmpeg's 3x3 display matrix (9 int32, 16.16 fixed point). Rotation is applied first, then the
    flips; angles off a multiple of 90 degrees are rounded to the nearest one (ffmpeg would rotate by the exact
    angle with black corners). Mirrors fftools' get_rotation + the transpose/hflip/vflip choice.
    """
    if matrix is None or len(matrix) < 9:
        return 0, False, False
    m = [float(v) / 65536 for v in matrix[:9]]
    s0, s1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if s0 == 0 or s1 == 0:
        return 0, False, False
    ccw = -math.degrees(math.atan2(m[1] / s1, m[0] / s0))  # av_display_rotation_get
    theta = round(-ccw) % 360  # fftools get_rotation: clockwise degrees
    quarter = int(round(theta / 90)) % 4 * 90
    if quarter == 90:  # transpose=cclock_flip when matrix[3] > 0, else clock
        return (270, False, True) if matrix[3] > 0 else (90, False, False)
    if quarter == 270:  # transpose=clock_flip when matrix[3] < 0, else cclock
        return (90, False, True) if matrix[3] < 0 else (270, False, False)
    if quarter == 180:  # hflip when matrix[0] < 0, vflip when matrix[4] < 0; both = a half turn
        h, v = matrix[0] < 0, matrix[4] < 0
        return (180, not v, not h) if (h or v) else (0, False, False)
    return 0, False, matrix[4] < 0
