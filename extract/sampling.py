"""Step-time policies: which instants of an item a frame-level extractor looks at.

Two policies (T-MASS / MEE conventions):

- rate: one step every ``1/fps`` seconds starting at t=0 (``t_j = j/fps`` for ``t_j < duration``); when that gives
  more than ``max_steps`` steps, ``max_steps`` steps are spread uniformly over the whole item instead, each at the
  middle of its segment (``t_i = (i + 0.5) * duration / max_steps``).
- count: exactly ``count`` uniformly spaced steps at the middle of equal segments (T-MASS's "uniform" sampling).

Step times map onto the 25 fps decode grid as ``k = floor(t * 25 + 1e-6)``, clipped to the decoded frames; the
stored time of a step is the time of the frame actually used (``k / 25``). Images (duration 0) have one step at 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # decode.py imports PyAV
    from extract.decode import MediaInfo

DECODE_FPS = 25.0  # every extractor sees frames on this grid (extract.decode.iter_frames default)
_EPS = 1e-6  # absorbs float error so t = k/25 maps back to k


@dataclass(frozen=True)
class StepPolicy:
    """When a frame-level extractor takes a step: a rate capped at `max_steps`, or a fixed `count`."""

    fps: float | None = None  # one step every 1/fps s ...
    max_steps: int = 64  # ... at most this many; beyond, steps spread uniformly over the item
    count: int | None = None  # or exactly this many uniformly spaced steps (CLIP: 12)

    def __post_init__(self) -> None:
        if (self.fps is None) == (self.count is None):
            raise ValueError(f"StepPolicy needs exactly one of fps or count, got fps={self.fps}, count={self.count}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ValueError(f"StepPolicy fps must be a finite number > 0, got {self.fps}")
        if self.count is not None and self.count <= 0:
            raise ValueError(f"StepPolicy count must be > 0, got {self.count}")
        if self.max_steps <= 0:
            raise ValueError(f"StepPolicy max_steps must be > 0, got {self.max_steps}")
        if self.count is not None:  # a count policy has exactly `count` steps on disk
            object.__setattr__(self, "max_steps", self.count)

    @property
    def steps(self) -> int:
        """The step-axis length on disk (T) this policy needs."""
        return self.count if self.count is not None else self.max_steps

    def times(self, duration: float) -> np.ndarray:
        """Step times in seconds (float64, ascending); images (duration 0) -> [0.0]."""
        if math.isnan(duration) or duration < 0:
            raise ValueError(f"step times need a known duration >= 0, got {duration}")
        if duration == 0:
            return np.zeros(1, dtype=np.float64)
        if self.count is not None:
            return uniform_times(duration, self.count)
        assert self.fps is not None
        n = max(1, math.ceil(duration * self.fps - _EPS))  # t_j = j/fps < duration
        if n > self.max_steps:
            return uniform_times(duration, self.max_steps)
        return np.arange(n, dtype=np.float64) / self.fps

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-able form for provenance."""
        return {"fps": self.fps, "max_steps": self.max_steps, "count": self.count}


def uniform_times(duration: float, n: int) -> np.ndarray:
    """`n` times at the middles of `n` equal segments of [0, duration)."""
    return (np.arange(n, dtype=np.float64) + 0.5) * (duration / n)


def frame_indices(times: np.ndarray, fps: float = DECODE_FPS, n_frames: int | None = None) -> np.ndarray:
    """Decode-grid frame index of each time: floor(t*fps + 1e-6), clipped to [0, n_frames-1] when known."""
    k = np.floor(np.asarray(times, dtype=np.float64) * fps + _EPS).astype(np.int64)
    k = np.maximum(k, 0)
    if n_frames is not None:
        if n_frames <= 0:
            raise ValueError("frame_indices: n_frames must be > 0")
        k = np.minimum(k, n_frames - 1)
    return k


def frame_times(indices: np.ndarray, fps: float = DECODE_FPS) -> np.ndarray:
    """Time in seconds of decode-grid frames (float32, as stored)."""
    return (np.asarray(indices, dtype=np.float64) / fps).astype(np.float32)


def item_step_times(who: str, policy: StepPolicy, info: MediaInfo) -> np.ndarray:
    """Step times for one item: [0] for images, else `policy` over the probed duration (an error names `who`)."""
    if info.kind == "image":
        return np.zeros(1, dtype=np.float64)
    duration = float(info.duration)
    if not np.isfinite(duration):
        raise ValueError(
            f"{who}: item {info.path} has no known duration (probe gave {duration}); "
            "step times need it - re-mux the file so its container records a duration"
        )
    return policy.times(duration)
