"""A simulated accelerator for CPU benchmarks (a tvr plugin): a model that needs every 25 fps frame and spends a
fixed wall time per batch outside the GIL (time.sleep), like a GPU kernel the host waits for.

Options (extractor_options: {sim_accel: {...}}): `batch` frames per model call, `batch_seconds` per call.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from extract._api import Extractor, ItemSession
from extract._registry import register_extractor
from store.schema import FeatureRows, FeatureSpec, Status


@register_extractor("sim_accel")
class SimAccelerator(Extractor):
    """One value per model batch (its mean pixel); every frame of the item is consumed."""

    needs_frames = True

    def __init__(self, *, batch: int = 32, batch_seconds: float = 0.05, max_steps: int = 512, **kw: Any) -> None:
        super().__init__(**kw)
        self.batch, self.batch_seconds = int(batch), float(batch_seconds)
        self.spec = FeatureSpec(name="sim_accel", dim=1, max_steps=int(max_steps), dtype="float32")
        self.weights_identity = {"file": "none (simulated accelerator)", "sha256": ""}
        self.preset, self.variant = "none", "sim"
        self.options = {"batch": self.batch, "batch_seconds": self.batch_seconds}

    def start(self, info: Any) -> ItemSession:
        """A session that batches frames and 'runs' each full batch."""
        return _SimSession(self)


class _SimSession(ItemSession):
    """Holds up to one batch of frame means; each full batch costs `batch_seconds` of wall time."""

    def __init__(self, ex: SimAccelerator) -> None:
        self.ex = ex
        self.pending: list[float] = []
        self.values: list[float] = []

    def add_frames(self, batch: Any) -> None:
        """Queue the frames; run every full batch."""
        self.pending.extend(float(f.mean()) for f in np.asarray(batch.frames)[:, ::8, ::8])
        while len(self.pending) >= self.ex.batch:
            self._run(self.ex.batch)

    def _run(self, n: int) -> None:
        time.sleep(self.ex.batch_seconds)  # the accelerator works; the GIL is free for decoding meanwhile
        if len(self.values) < self.ex.spec.max_steps:
            self.values.append(float(np.mean(self.pending[:n])))
        del self.pending[:n]

    def finish(self) -> FeatureRows:
        """One value per batch (the last, partial batch costs a full batch, as on a GPU)."""
        if self.pending:
            self._run(len(self.pending))
        if not self.values:
            return FeatureRows.absent(self.ex.spec, "no_video")
        v = np.asarray(self.values, dtype=np.float32)[:, None]
        return FeatureRows(status=Status.OK, values=v, times=np.arange(len(v), dtype=np.float32))
