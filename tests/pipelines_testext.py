"""Cheap deterministic extractors for the pipeline tests, registered when this module is imported (--plugins).

Behaviour keyed on the item's file name, so tests can script failures:
- ``die_once`` in the name: the worker process exits (os._exit) on the first attempt only (a marker file next to the
  item remembers the first death);
- ``die_always``: the worker process exits on every attempt;
- ``boom``: `test_mean` raises inside add_frames (an extractor error; other features of the item still succeed).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from extract import CaptionExtractor, Extractor, ItemSession, register_extractor
from store.schema import FeatureRows, FeatureSpec, Status


def _identity(ex: Extractor) -> None:
    """Provenance for weightless extractors."""
    ex.weights_identity = {"random": True, "seed": ex.seed} if ex.random_init else {"file": "none", "sha256": "none"}
    ex.preset = "none"
    ex.variant = "test"


def _maybe_die(path: str) -> None:
    """Exit the worker process as scripted by the item's file name."""
    name = os.path.basename(path)
    if "die_always" in name:
        os._exit(17)
    if "die_once" in name:
        marker = Path(path + ".died")
        if not marker.exists():
            marker.write_text("died once\n")
            os._exit(17)


@register_extractor("test_mean")
class MeanColour(Extractor):
    """Mean RGB of each of the first `max_steps` frames (float32, exact on lossless input)."""

    needs_frames = True

    def __init__(self, *, delay: float = 0.0, max_steps: int = 64, **kw: Any) -> None:
        """`delay`: seconds slept per frame batch, to keep items in flight in kill tests."""
        super().__init__(**kw)
        self.delay = float(delay)
        self.spec = FeatureSpec(name="test_mean", dim=3, max_steps=int(max_steps), dtype="float32")
        _identity(self)

    def start(self, info: Any) -> ItemSession:
        """A session for one item."""
        return _ColourSession(self, str(getattr(info, "path", "")), lambda px: px.mean(axis=0), scripted=True)


class _ColourSession(ItemSession):
    """One colour statistic per frame (over its pixels, / 255) for the first max_steps frames."""

    def __init__(self, ex: MeanColour | MaxColour, path: str, stat: Callable[[np.ndarray], np.ndarray], *,
                 scripted: bool) -> None:
        """`scripted`: obey the file-name script (die_once, die_always, boom)."""
        self.ex, self.path, self.stat, self.scripted = ex, path, stat, scripted
        self.values: list[np.ndarray] = []
        self.times: list[float] = []

    def add_frames(self, batch: Any) -> None:
        """The statistic of every frame up to max_steps."""
        if self.scripted:
            _maybe_die(self.path)
            if "boom" in os.path.basename(self.path):
                raise RuntimeError("scripted test failure")
        if self.ex.delay:
            time.sleep(self.ex.delay)
        frames = np.asarray(batch.frames, dtype=np.float64)
        for f, t in zip(frames, np.asarray(batch.times)):
            if len(self.values) < self.ex.spec.max_steps:
                self.values.append(self.stat(f.reshape(-1, 3)) / 255.0)
                self.times.append(float(t))

    def finish(self) -> FeatureRows:
        """OK with one step per frame, or ABSENT when nothing was decoded."""
        if not self.values:
            return FeatureRows.absent(self.ex.spec, "no_video")
        return FeatureRows(status=Status.OK, values=np.stack(self.values).astype(np.float32),
                           times=np.asarray(self.times, dtype=np.float32))


@register_extractor("test_max")
class MaxColour(Extractor):
    """Max RGB of each of the first 64 frames: a second frame extractor fed by the same decode."""

    needs_frames = True

    def __init__(self, *, delay: float = 0.0, **kw: Any) -> None:
        """`delay`: seconds slept per frame batch (overlap tests)."""
        super().__init__(**kw)
        self.delay = float(delay)
        self.spec = FeatureSpec(name="test_max", dim=3, max_steps=64, dtype="float32")
        _identity(self)

    def start(self, info: Any) -> ItemSession:
        """A session for one item."""
        return _ColourSession(self, str(getattr(info, "path", "")), lambda px: px.max(axis=0), scripted=False)


@register_extractor("test_rms")
class AudioRms(Extractor):
    """RMS of each audio chunk (ABSENT no_audio for silent videos and images)."""

    needs_frames = False
    needs_audio = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = FeatureSpec(name="test_rms", dim=1, max_steps=64, dtype="float32", modality="audio")
        _identity(self)

    def start(self, info: Any) -> ItemSession:
        """A session for one item."""
        return _RmsSession(self)


class _RmsSession(ItemSession):
    """Accumulates chunk RMS values."""

    def __init__(self, ex: AudioRms) -> None:
        self.ex = ex
        self.values: list[float] = []
        self.n = 0

    def add_audio(self, samples: np.ndarray) -> None:
        """RMS of this chunk."""
        s = np.asarray(samples, dtype=np.float64)
        if s.size and len(self.values) < self.ex.spec.max_steps:
            self.values.append(float(np.sqrt(np.mean(s**2))))
        self.n += s.size

    def finish(self) -> FeatureRows:
        """OK with one step per chunk, or ABSENT no_audio."""
        if not self.values:
            return FeatureRows.absent(self.ex.spec, "no_audio")
        v = np.asarray(self.values, dtype=np.float32)[:, None]
        return FeatureRows(status=Status.OK, values=v, times=np.arange(len(v), dtype=np.float32))


@register_extractor("test_caption")
class CaptionStats(CaptionExtractor):
    """Caption length and a character checksum; chunks of 4 captions."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.spec = FeatureSpec(name="test_caption", dim=2, max_steps=1, dtype="float32", modality="text",
                                axis="caption", chunk_rows=4)
        _identity(self)

    def encode_captions(self, texts: Sequence[str]) -> list[FeatureRows]:
        """One row per caption."""
        rows = []
        for t in texts:
            v = np.array([[len(t), sum(map(ord, t)) % 997]], dtype=np.float32)
            rows.append(FeatureRows(status=Status.OK, values=v, times=np.zeros(1, dtype=np.float32)))
        return rows
