"""Optical flow for I3D: torchvision RAFT with its own weights specs, replicate padding to /8 and exact unpadding.

Input frames are float RGB in [0, 255] (B, 3, H, W), any H, W. They are scaled to [-1, 1] (torchvision's
`OpticalFlow` preset, the same as the original RAFT's 2x/255-1), replicate-padded to multiples of 8 with the
padding centred (the original RAFT `InputPadder`, "sintel" mode), and the flow comes back with that padding
REMOVED, so it is pixel-aligned with the input frames. The reference tool (video_features) skips the unpad and
crops padded flow, which shifts its crop by up to 3 px; we do not reproduce that.

`scale_flow` is the I3D flow input recipe: clamp to +-20 px, then f/20 -> [-1, 1]; `quantize_uint8=True` gives the
reference's round(128 + 255/40 f) then 2q/255 - 1 instead. Note round-half-even makes +20 px quantise to 256, so
that option can return 1.0078 (= 2*256/255 - 1), exactly as the reference does.

Defaults are the reference tool's (video_features): raft_large with the paper's Sintel weights (`raft-sintel.pth`,
ported by torchvision as `C_T_SKHT_V1`) and 20 flow updates. That is the expensive choice: on 2 CPU cores one
256x341 pair takes 1.6 s (raft_small with 12 updates: 0.3 s; see extract.i3d), so CPU users who only need
approximate motion features can pick `raft_small.*` and fewer updates; the choice is recorded in provenance.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import raft_large, raft_small

from extract import _weights
from extract._api import seeded
from extract._weights import WeightsSpec, weights_identity
from extract.transforms import register_preset

FLOW_BOUND = 20.0  # px; the DeepMind I3D flow recipe clips to [-20, 20]
PAD_MULTIPLE = 8  # RAFT's feature maps are 1/8 of the input
MIN_SIDE = 128  # torchvision RAFT's 4-level correlation pyramid needs 1/8-size maps of >= 16 px


def _spec(arch: str, tag: str, digest_prefix: str, note: str) -> WeightsSpec:
    """A torchvision RAFT weights file; the 8 hex digits in its name are the sha256 prefix torch.hub checks."""
    filename = f"{arch}_{tag}-{digest_prefix}.pth"
    return WeightsSpec(
        name=f"{arch}.{tag}",
        filename=filename,
        sha256=digest_prefix,  # prefix only (full digest unpublished): checked with startswith, as torch.hub does
        url=f"https://download.pytorch.org/models/{filename}",
        preset="raft_flow",
        meta={"arch": arch, "sha256_prefix": digest_prefix, "torchvision_enum": tag, "note": note},
    )


RAFT_WEIGHTS: dict[str, WeightsSpec] = {
    s.name: s
    for s in (
        _spec("raft_large", "C_T_SKHT_V2", "ff5fadd5", "torchvision's DEFAULT: retrained, Chairs+Things, Sintel mix"),
        _spec("raft_large", "C_T_SKHT_V1", "0b8c9e55", "ported from the paper, Sintel (raft-sintel.pth)"),
        _spec("raft_large", "C_T_SKHT_K_V2", "b5c70766", "Sintel then KITTI fine-tuned"),
        _spec("raft_large", "C_T_SKHT_K_V1", "4a6a5039", "ported, Sintel then KITTI (raft-kitti.pth)"),
        _spec("raft_large", "C_T_V2", "1bb1363a", "Chairs+Things only"),
        _spec("raft_large", "C_T_V1", "22a6c225", "ported, Chairs+Things only (raft-things.pth)"),
        _spec("raft_small", "C_T_V2", "01064c6d", "small model, Chairs+Things"),
        _spec("raft_small", "C_T_V1", "ad48884c", "small model, ported, Chairs+Things"),
    )
}
# The reference tool's checkpoint: raft-sintel.pth from the RAFT paper, which torchvision ships ported as C_T_SKHT_V1
# (same parameters). torchvision's own DEFAULT (C_T_SKHT_V2, retrained, slightly lower EPE) is one option away.
DEFAULT_RAFT = "raft_large.C_T_SKHT_V1"
DEFAULT_FLOW_UPDATES = 20  # the reference's iters=20 (torchvision's own default is 12)
register_preset(
    "raft_flow",
    "RGB frames in [0,255] -> 2x/255-1, replicate-pad to /8 (centred), torchvision RAFT, unpad; flow in px",
)
_ARCHS = {"raft_large": raft_large, "raft_small": raft_small}


class FlowError(ValueError):
    """Bad RAFT weights or input; the message names the file or shape, the stage and the fix."""


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad (B, C, H, W) so H and W divide by `multiple`, centred -> (padded, (top, bottom, left, right))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    pads = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
    if ph == 0 and pw == 0:
        return x, pads
    return F.pad(x, (pads[2], pads[3], pads[0], pads[1]), mode="replicate"), pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of `pad_to_multiple` on the last two axes."""
    top, bottom, left, right = pads
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Central size x size window of the last two axes; the start is floor((H - size) / 2), as the reference."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise FlowError(f"center_crop: input {h}x{w} is smaller than the {size}x{size} crop")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def scale_flow(flow: torch.Tensor, *, bound: float = FLOW_BOUND, quantize_uint8: bool = False) -> torch.Tensor:
    """Clamp flow (px) to +-bound and map to [-1, 1]; `quantize_uint8` mimics the reference's uint8 round trip."""
    flow = flow.clamp(-bound, bound)
    if not quantize_uint8:
        return flow / bound
    q = torch.round(128.0 + 255.0 / (2.0 * bound) * flow)  # torch.round is round-half-even, as the reference
    return 2.0 * q / 255.0 - 1.0


def _state_dict(obj: Any, source: str) -> Mapping[str, torch.Tensor]:
    """Accept a bare state dict or {"state_dict"/"model": ...}; strip a DataParallel `module.` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise FlowError(f"{source}: stage 'load RAFT weights': not a state dict ({type(obj).__name__})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


class RaftFlow:
    """torchvision RAFT (large or small) that maps frame pairs in [0, 255] to unpadded flow in pixels."""

    def __init__(
        self,
        weights: str = DEFAULT_RAFT,
        *,
        weights_path: str | Path | None = None,
        weights_dir: str | Path | None = None,
        allow_download: bool = False,
        random_init: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_flow_updates: int = DEFAULT_FLOW_UPDATES,
        batch_size: int = 8,
        resolve: Callable[[WeightsSpec], Path | None] | None = None,
    ) -> None:
        """weights: a RAFT_WEIGHTS name (resolved like every tvr weights file, torch hub cache included);
        resolve: an owning extractor's `Extractor.resolve` (its None: random weights), instead of the path,
        dir, download and random_init arguments."""
        if weights not in RAFT_WEIGHTS:
            raise FlowError(f"unknown RAFT weights {weights!r}; choose one of {sorted(RAFT_WEIGHTS)}")
        if num_flow_updates < 1 or batch_size < 1:
            raise FlowError(f"num_flow_updates and batch_size must be >= 1, got {num_flow_updates}, {batch_size}")
        self.spec = RAFT_WEIGHTS[weights]
        self.arch = str(self.spec.meta["arch"])
        self.num_flow_updates, self.batch_size = num_flow_updates, batch_size
        self.device = torch.device(device)
        find = resolve
        if find is None and not random_init:  # standalone: extract._weights' order with this class's own arguments
            find = functools.partial(_weights.resolve_weights, path=weights_path, weights_dir=weights_dir,
                                     hub="torch", allow_download=allow_download)
        path = None if find is None else find(self.spec)  # verified before the construction, to fail fast
        with seeded(seed):
            model = _ARCHS[self.arch](weights=None)
        if path is None:
            self.identity: dict[str, Any] = {"random": True, "seed": seed}
        else:
            self._load(model, Path(path))
            self.identity = weights_identity(Path(path), self.spec)
        self.model = model.eval().requires_grad_(False).to(self.device)

    def _load(self, model: torch.nn.Module, path: Path) -> None:
        """Load a torchvision RAFT state dict strictly, with a clear error on a foreign file."""
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
            raise FlowError(f"{path}: stage 'load RAFT weights': torch.load failed ({exc})") from exc
        try:
            result = model.load_state_dict(_state_dict(obj, str(path)), strict=False)
        except RuntimeError as exc:  # shape mismatches: e.g. raft_small weights for raft_large
            raise FlowError(
                f"{path}: stage 'load RAFT weights': tensor shapes do not fit torchvision {self.arch} ({exc}); "
                "choose the RAFT weights name matching your file"
            ) from exc
        if result.missing_keys or result.unexpected_keys:
            raise FlowError(
                f"{path}: stage 'load RAFT weights': not a torchvision {self.arch} state dict "
                f"({len(result.missing_keys)} missing, e.g. {result.missing_keys[:4]}; "
                f"{len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:4]}); "
                f"pass {self.spec.filename} (or choose the RAFT weights name matching your file)"
            )

    def provenance(self) -> dict[str, Any]:
        """What produced the flow: weights identity (or seed), variant, iterations, padding policy."""
        return {
            "weights": dict(self.identity),
            "variant": self.spec.name,
            "url": self.spec.url,
            "num_flow_updates": self.num_flow_updates,
            "padding": "replicate to /8, centred, removed before cropping",
        }

    @torch.inference_mode()
    def __call__(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float frames in [0, 255] -> (B, 2, H, W) flow first->second in px (x, y), unpadded."""
        if first.shape != second.shape or first.ndim != 4 or first.shape[1] != 3:
            raise FlowError(
                "RAFT needs two (B, 3, H, W) batches of equal shape, "
                f"got {tuple(first.shape)} and {tuple(second.shape)}"
            )
        if min(first.shape[-2:]) < MIN_SIDE:
            raise FlowError(f"RAFT needs frames of at least {MIN_SIDE} px per side, got {tuple(first.shape[-2:])}")
        out = []
        for start in range(0, first.shape[0], self.batch_size):
            a = first[start : start + self.batch_size].to(self.device, torch.float32)
            b = second[start : start + self.batch_size].to(self.device, torch.float32)
            a, pads = pad_to_multiple(a * (2.0 / 255.0) - 1.0)
            b, _ = pad_to_multiple(b * (2.0 / 255.0) - 1.0)
            flow = self.model(a, b, num_flow_updates=self.num_flow_updates)[-1]
            out.append(unpad(flow, pads))
        return torch.cat(out)
