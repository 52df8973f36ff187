"""The extractor interface: weights specs, the Extractor ABC, streaming item sessions and reusable bases.

One decode of an item feeds every extractor through `ItemSession`s (``Extractor.start(info)``). Frame-level
extractors derive from `FrameStepExtractor`, which picks the step frames out of the 25 fps stream (see
`extract.sampling`) and runs its model on batches of them. Caption-level extractors derive from `CaptionExtractor`.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Sequence, TypeVar

import numpy as np

from extract import _weights
from extract._weights import WeightsError, WeightsNotFound, WeightsSpec, load_state_dict, weights_identity
from extract.sampling import DECODE_FPS, StepPolicy, frame_indices, frame_times, item_step_times
from store.common import RANDOM_IF_MISSING, tvr_version  # re-exported (__all__): extract's public names
from store.schema import FeatureRows, FeatureSpec, Status

if TYPE_CHECKING:  # decode.py imports PyAV; only needed at run time by extract_path
    import torch

    from extract.decode import FrameBatch, MediaInfo
    from extract.engine import BatchPool

__all__ = [
    "CaptionExtractor",
    "Extractor",
    "FrameStepExtractor",
    "FrameStepSession",
    "ItemSession",
    "PooledSession",
    "RANDOM_IF_MISSING",
    "RandomWeightsWarning",
    "StepPolicy",
    "WeightsSpec",
    "seeded",
    "to_store_dtype",
    "tvr_version",
]


PRECISIONS = ("fp32", "fp16", "bf16")  # --precision values
# Default frames per model batch of a frame-step model. An accelerator wants big batches; on the CPU per-frame time
# grows past ~8 as activations leave the cache (ResNet-152, 2 cores: 101 ms/frame at 8, 141 at 32; CLIP flat), and
# cross-item batching would otherwise fill every CPU batch to 32 (benchmarks/bench_pipeline.py).
FRAME_BATCH = {"cpu": 8, "accelerator": 32}
RandomInit = bool | Literal["missing"]
T = TypeVar("T")
log = logging.getLogger("tvr.extract")


class RandomWeightsWarning(UserWarning):
    """An extractor fell back to seeded random weights because its weights file was not found."""


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def to_store_dtype(values: np.ndarray, spec: FeatureSpec, who: str) -> np.ndarray:
    """Cast float32 features to the spec's dtype; non-finite or out-of-range values are an error, not inf."""
    if not np.isfinite(values).all():
        raise ValueError(f"{who}: the model produced NaN/inf features; check the weights file and the input")
    if spec.dtype == "float16" and values.size and float(np.abs(values).max()) > float(np.finfo(np.float16).max):
        raise ValueError(
            f"{who}: features up to {float(np.abs(values).max()):.3g} overflow float16 (max 65504); "
            "the weights do not fit this feature's float16 storage"
        )
    return values.astype(spec.dtype)


class ItemSession(abc.ABC):
    """Receives one item's decoded stream, in order, and returns its feature row at the end."""

    def add_frames(self, batch: FrameBatch) -> None:
        """Consume a batch of 25 fps RGB frames (default: ignored, for extractors that need no frames)."""

    def add_audio(self, samples: np.ndarray) -> None:
        """Consume the next chunk of 16 kHz mono float32 audio (default: ignored)."""

    @abc.abstractmethod
    def finish(self) -> FeatureRows:
        """The row for the item: OK, or ABSENT with a reason."""

    def close(self) -> None:
        """The item's run ends without `finish` (it failed elsewhere): release shared state (default: nothing)."""

    @property
    def waiting(self) -> bool:
        """Whether model inputs of this item wait in a pool shared with other items (default: no pool)."""
        return False


class PooledSession(ItemSession):
    """An ItemSession whose model inputs wait in its extractor's shared `extract.engine.BatchPool` (cross-item
    batches): it queues keyed inputs, receives one output per key, and raises its own inputs' model error."""

    def join(self, pool: BatchPool) -> None:
        """Use `pool` (call once, from the subclass's constructor)."""
        self._pool = pool
        self._queued: set[int] = set()  # keys waiting in the pool
        self._outputs: dict[int, np.ndarray] = {}  # key -> model output row
        self._error: BaseException | None = None  # the model failed on this item's own inputs

    def queue(self, keys: Sequence[int], inputs: Sequence[Any]) -> None:
        """Hand inputs to the pool (it runs every full batch, possibly with other items' inputs)."""
        self._queued.update(int(k) for k in keys)
        self._pool.add(self, keys, inputs)
        self.raise_error()

    @property
    def waiting(self) -> bool:
        """Whether inputs of this item wait for a batch in the pool (its model error is raised by `finish`)."""
        return self._error is None and self._pool.holds(self)

    def deliver(self, key: int, row: np.ndarray) -> None:
        """BatchPool: the model output for the input queued under `key`."""
        self._outputs[key] = row
        self._queued.discard(key)

    def fail(self, error: BaseException) -> None:
        """BatchPool: the model failed on this item's inputs (raised by the session's next call)."""
        self._error = self._error or error

    def close(self) -> None:
        """Drop this item's inputs still waiting in the shared pool."""
        self._pool.discard(self)

    def drain(self) -> dict[int, np.ndarray]:
        """Run what this item still has queued (one batch with whatever other items queued); its outputs."""
        if self._queued:
            self._pool.settle(self)
        self.raise_error()
        return self._outputs

    def raise_error(self) -> None:
        """Raise the model's error on this item's inputs, if any (its queued inputs are dropped)."""
        if self._error is not None:
            self._pool.discard(self)
            raise self._error


class Extractor(abc.ABC):
    """A feature extractor: a FeatureSpec, weights, and per-item streaming sessions.

    ``random_init``: False (real weights, resolved by extract._weights; missing ones are an error), True (seeded
    random weights, for tests and benchmarks) or "missing" (real weights where they resolve, else seeded random
    with a warning and ``"reason"`` in the weights identity; see `resolve`).
    """

    name: ClassVar[str]
    needs_frames: ClassVar[bool] = True
    needs_audio: ClassVar[bool] = False
    has_weights: ClassVar[bool] = True  # False: no model (raw frames); one fixed weights identity
    random_variant: ClassVar[bool] = True  # False: only real files exist (dlib, word vectors); random_init ignored
    supports_bf16: ClassVar[bool] = False  # FrameStepExtractor: bf16 autocast in infer
    in_default_features: ClassVar[bool] = True  # False: extracted only when asked for by name (raw frames)
    spec: FeatureSpec  # instance attribute (depends on options)

    def __init__(
        self,
        *,
        weights_path: str | os.PathLike[str] | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
        random_init: RandomInit = False,
        seed: int = 0,
        device: str = "auto",
        half: bool = False,
        precision: str | None = None,
        allow_download: bool = False,
        **options: Any,
    ) -> None:
        """Store the options every extractor shares; subclasses consume their own options before calling this."""
        from extract._device import pick_device, use_half

        if options:
            raise TypeError(f"extractor {self.name!r}: unknown options {sorted(options)}")
        if isinstance(random_init, str) and random_init != RANDOM_IF_MISSING:
            raise ValueError(f"extractor {self.name!r}: random_init must be True, False or {RANDOM_IF_MISSING!r}, "
                             f"got {random_init!r}")
        self.weights_path = weights_path
        self.weights_dir = weights_dir
        self.random_if_missing = random_init == RANDOM_IF_MISSING  # resolve() decides real or random, once
        self.random_init = not self.random_if_missing and bool(random_init)
        self.seed = int(seed)
        self.device = pick_device(device)
        # model batches run on a thread of their own while this thread prepares the next (extract.engine.BatchPool)
        # on an accelerator, which computes while the host works; a CPU model already uses the host's cores
        self.overlaps_host = self.device.type != "cpu"
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"extractor {self.name!r}: precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {precision!r}")
        if precision == "bf16" and not self.supports_bf16:
            raise ValueError(f"extractor {self.name!r} cannot run in bf16 (only frame-step extractors autocast); "
                             "use --precision fp16 or fp32")
        self.half = use_half(half or precision == "fp16", self.device)
        # what actually runs: fp16 only on CUDA (use_half), bf16 as autocast (FrameStepExtractor.infer)
        self.precision = "fp16" if self.half else ("bf16" if precision == "bf16" else "fp32")
        self.allow_download = bool(allow_download)
        self.weights: WeightsSpec | None = None  # the spec in use (real or random-initialised architecture)
        # {"file", "sha256"[, "unpinned": True]} or {"random": True, "seed": s[, "reason"]}; unpinned: an explicitly
        # given file that is not the spec's pinned one (extract._weights.accept_explicit)
        self.weights_identity: dict[str, Any] = {}
        self.random_reason = ""  # set when random_init="missing" fell back to random weights
        self.preset: str = ""
        self.variant: str = ""
        self.options: dict[str, Any] = {}  # extractor-specific options recorded in provenance
        self._found: dict[str, Any] = {}  # resolve_with key -> what its lookup found (each file resolved once)
        self._loaded_real = False  # a model holds real weights: a later fallback could no longer make all random

    # -- weights -------------------------------------------------------------------------------------------------
    def resolve(self, spec: WeightsSpec, hub: str | None = None, *,
                path: str | os.PathLike[str] | None = None) -> Path | None:
        """The file for `spec` (explicit `path`, else this extractor's weights dir, hub cache, package, download),
        or None for seeded random weights; every extractor finds every weights file through here."""
        key = f"{spec.name}|{spec.filename}|{hub}|{path}"
        return self.resolve_with(key, lambda: _weights.resolve_weights(
            spec, path=path, weights_dir=self.weights_dir, hub=hub, allow_download=self.allow_download))

    def resolve_with(self, key: str, find: Callable[[], T]) -> T | None:
        """Run the lookup `find` (extract._weights underneath) once per `key`; None = seeded random weights.

        ``random_init=True`` skips it; ``"missing"`` turns its `WeightsNotFound` into the random fallback of the
        WHOLE extractor (one weights identity per store group), so an extractor holding several files resolves all
        of them before it loads any.
        """
        if self.random_init and self.random_variant:
            return None
        if key not in self._found:
            try:
                self._found[key] = find()
            except WeightsNotFound as missing:
                if not self.random_if_missing:
                    raise
                self._fall_back_to_random(missing)
                return None
        return self._found[key]

    def _fall_back_to_random(self, missing: WeightsNotFound) -> None:
        """``random_init="missing"`` and a file is not found: seeded random weights from now on, loudly."""
        if not self.random_variant:
            raise WeightsError(f"{self.name}: {missing} -- and {self.name} cannot run with random weights (it has "
                               "no random variant; its real files are required)") from missing
        if self._loaded_real:  # a programming error in the extractor, not a user error
            raise RuntimeError(f"{self.name}: {missing.spec.filename} was resolved after real weights were loaded; "
                               "resolve every weights file before loading any")
        self.random_init, self.random_if_missing = True, False
        self.random_reason = f"weights not found: {missing.spec.filename}"
        msg = (f"extractor {self.name!r}: USING SEEDED RANDOM WEIGHTS (seed {self.seed}) because its weights were not "
               f"found; its features are NOT meaningful and the store records weights={self.random_identity()}. "
               f"{missing}")
        warnings.warn(msg, RandomWeightsWarning, stacklevel=4)
        log.warning(msg)

    def random_identity(self) -> dict[str, Any]:
        """The weights identity of seeded random weights (with the fallback's reason, when there was one)."""
        reason = {"reason": self.random_reason} if self.random_reason else {}
        return {"random": True, "seed": self.seed, **reason}

    def build_model(
        self,
        make: Callable[[], torch.nn.Module],
        spec: WeightsSpec,
        *,
        hub: str | None = None,
        load: Callable[[torch.nn.Module, Path], None] | None = None,
    ) -> torch.nn.Module:
        """Construct `make()` under the seed, load verified weights unless random_init, move to device, eval mode.

        `load(model, path)` defaults to a strict `load_state_dict` of `torch.load(path, weights_only=True)`.
        """
        self.weights = spec
        self.preset = spec.preset
        self.variant = spec.name
        path = self.resolve(spec, hub, path=self.weights_path)  # fail fast before the (slow) construction
        with seeded(self.seed):
            model = make()
        if path is None:
            self.weights_identity = self.random_identity()
        else:
            if load is None:
                model.load_state_dict(load_state_dict(path), strict=True)
            else:
                load(model, path)
            self.weights_identity = weights_identity(path, spec)
            self._loaded_real = True
        model.eval().requires_grad_(False)
        model.to(self.device)
        if self.half:
            model.half()
        if self.device.type == "cuda":  # NHWC convolutions are faster on tensor cores; no-op for other layers
            import torch

            model.to(memory_format=torch.channels_last)
        return model

    # -- identity ------------------------------------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        """What produced the values: weights identity, preset, variant, options, tvr version."""
        out: dict[str, Any] = {
            "extractor": self.name,
            "weights": dict(self.weights_identity),
            "preset": self.preset,
            "variant": self.variant,
            "options": dict(self.options),
            "tvr_version": tvr_version(),
        }
        if self.weights is not None:
            out["weights_url"] = self.weights.url
        out["precision"] = self.precision
        # precision changes values, so reruns compare it; fp32 stays out so groups stored without the option match
        if self.precision != "fp32":
            out["options"]["precision"] = self.precision
        return out

    # -- streaming -----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self, info: MediaInfo) -> ItemSession:
        """A session for one item described by `info` (from extract.decode.probe)."""

    def frames_needed(self, info: MediaInfo) -> np.ndarray | None:
        """Output frame indices (DECODE_FPS grid) a session for `info` reads; None: every frame (the default)."""
        return None

    def extract_path(self, path: str | os.PathLike[str]) -> FeatureRows:
        """Convenience: decode `path` once and stream it through one session (the pipeline's engine,
        extract.engine); a decode or extractor failure raises its exception."""
        from extract.engine import DecodeOptions, run_item

        outcome = run_item({self.name: self}, path, [self.name], DecodeOptions(batch_size=32))
        return outcome.row_or_raise(self.name)


class FrameStepExtractor(Extractor):
    """Base for "pick the frames at the step times, preprocess, run the model in batches" extractors.

    Subclasses set `self.policy` (StepPolicy), `self.batch_size` and `self.spec`, and implement `preprocess`
    (uint8 (B,H,W,3) RGB -> float tensor on self.device) and `forward` (tensor -> (B, D)).
    """

    policy: StepPolicy
    batch_size: int = FRAME_BATCH["accelerator"]
    supports_bf16: ClassVar[bool] = True

    def model_batch(self, batch_size: int | None) -> int:
        """Frames per forward: `batch_size` (> 0), or FRAME_BATCH's default for this extractor's device."""
        if batch_size is None:
            return FRAME_BATCH["cpu" if self.device.type == "cpu" else "accelerator"]
        if batch_size <= 0:
            raise ValueError(f"{self.name}: batch_size must be > 0, got {batch_size}")
        return int(batch_size)

    @abc.abstractmethod
    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB frames -> model input on self.device (deterministic, no augmentation)."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model input batch -> (B, D) features (called under torch.inference_mode)."""

    def step_times(self, info: MediaInfo) -> np.ndarray:
        """Step times for an item: [0] for images, else the policy over the probed duration."""
        return item_step_times(self.name, self.policy, info)

    def run_batch(self, frames: np.ndarray) -> np.ndarray:
        """Preprocess + forward one batch of uint8 frames; float32 (B, D) numpy on CPU."""
        return self.infer(self.prepare(frames))

    def prepare(self, frames: np.ndarray) -> torch.Tensor:
        """`preprocess` without autograd, cast to fp16 when the model runs in fp16."""
        import torch

        with torch.inference_mode():
            x = self.preprocess(frames)
            x = x.half() if self.half else x
            if x.dim() == 4 and x.is_cuda:  # matches the channels_last model (build_model)
                x = x.contiguous(memory_format=torch.channels_last)
            return x

    def infer(self, x: torch.Tensor) -> np.ndarray:
        """`forward` without autograd; float32 (B, D) numpy on CPU."""
        import torch

        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    return self.forward(x).float().cpu().numpy()
            return self.forward(x).float().cpu().numpy()

    def start(self, info: MediaInfo) -> ItemSession:
        """A session that keeps only the step frames and batches them through the model."""
        return FrameStepSession(self, self.step_times(info))

    def frames_needed(self, info: MediaInfo) -> np.ndarray | None:
        """The step frames (the session also reads the stream's last frame, which the decoder always yields)."""
        return np.unique(frame_indices(self.step_times(info)))


class FrameStepSession(PooledSession):
    """Picks the step frames out of the 25 fps stream, preprocesses them on arrival, runs the model in batches.

    Step k (a 25 fps frame index) uses the first decoded frame with index >= k (exactly k on a gapless stream);
    steps past the last decoded frame use the last frame. Stored times are those of the frames actually used.
    """

    def __init__(self, extractor: FrameStepExtractor, times: np.ndarray) -> None:
        """Plan the wanted frame indices for `times`."""
        from extract.engine import batch_pool

        self.ex = extractor
        self.want = frame_indices(times)  # ascending, may repeat (short items with many steps)
        self._uniq = np.unique(self.want)
        self._next = 0  # position in _uniq of the next unsatisfied step frame
        self._used: dict[int, int] = {}  # wanted index -> decoded index used
        self.join(batch_pool(extractor))  # shared with the extractor's other live sessions (cross-item batches)
        self._last: tuple[int, np.ndarray] | None = None  # last decoded frame, for steps past the end

    def add_frames(self, batch: FrameBatch) -> None:
        """Preprocess the step frames of `batch` (as one batch); queue them for the model (full batches run)."""
        index = np.asarray(batch.index)
        if index.size == 0:
            return
        pick: list[int] = []
        for i, k in enumerate(index.tolist()):
            hit = False
            while self._next < len(self._uniq) and self._uniq[self._next] <= k:
                self._used[int(self._uniq[self._next])] = k
                self._next += 1
                hit = True
            if hit:
                pick.append(i)
        self._last = (int(index[-1]), np.array(batch.frames[-1], copy=True))
        if pick:
            x = self.ex.prepare(np.stack([np.asarray(batch.frames[i]) for i in pick]))
            self.queue([int(index[i]) for i in pick], x.unbind(0))
        self.raise_error()

    def finish(self) -> FeatureRows:
        """OK row with one value per step; ABSENT ("no_video") when no frame was decoded."""
        if self._last is None:
            return FeatureRows.absent(self.ex.spec, "no_video", f"{self.ex.name}: no video frames were decoded")
        last_k, last_frame = self._last
        if self._next < len(self._uniq):  # steps past the decoded end: the last frame
            for k in self._uniq[self._next :]:
                self._used[int(k)] = last_k
            self._next = len(self._uniq)
            if last_k not in self._outputs and last_k not in self._queued:
                self.queue([last_k], self.ex.prepare(last_frame[None]).unbind(0))
        feats = self.drain()  # one batch with whatever other items have queued
        used = np.array([self._used[int(k)] for k in self.want], dtype=np.int64)
        values = to_store_dtype(np.stack([feats[int(k)] for k in used]), self.ex.spec, self.ex.name)
        return FeatureRows(status=Status.OK, values=values, times=frame_times(used))


class CaptionExtractor(Extractor):
    """Base for caption-axis features: `encode_captions(texts)` instead of item sessions."""

    needs_frames: ClassVar[bool] = False

    @abc.abstractmethod
    def encode_captions(self, texts: Sequence[str]) -> list[FeatureRows]:
        """One FeatureRows per caption, in order."""

    def start(self, info: MediaInfo) -> ItemSession:
        """Caption features have no item sessions."""
        raise TypeError(f"{self.name} is a caption feature (axis='caption'); call encode_captions(texts)")

    def extract_path(self, path: str | os.PathLike[str]) -> FeatureRows:
        """Caption features have no media input."""
        raise TypeError(f"{self.name} is a caption feature (axis='caption'); call encode_captions(texts)")
