"""T-MASS and X-Pool with their CLIP backbone fine-tuned end to end (the papers' training), on frames and tokens.

The heads are the frozen-feature models unchanged (`train.models.tmass.TMASS`, `train.models.xpool.XPoolModel`):
only the encoders differ. encode_text runs open_clip's text tower on token ids, encode_video its image tower on
every frame (unnormalised `encode_text` / `encode_image`, as the reference's `get_text_features` /
`get_image_features`), so loss(), the chunked leak-free similarity() and the evaluation noise are the heads' own.

Parameter groups (reference trainer): every CLIP parameter at `clip_lr` (1e-6), the head at `lr` (noclip_lr), the
head's logit scale at its `logit_scale_lr` (1e-6: the reference's logit scale is CLIP's, in the CLIP group).
CLIP's own `logit_scale` is frozen and unused: the head's is the one in the loss, clamped at ln 100 every step.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from train.models._api import Emb
from train.models.tmass import TMASS, TMASSConfig
from train.models.xpool import XPoolConfig, XPoolModel, frame_mask

FRAMES, TEXT = "frames", "text"  # names the heads' configs give the (encoder-made) frame and text embeddings


class _ClipEncoders:
    """Mixin: CLIP towers as encoders in front of an X-Pool / T-MASS head."""

    clip: nn.Module
    clip_lr: float

    def attach(self, clip: nn.Module, clip_lr: float, grad_checkpointing: bool) -> None:
        """Own `clip`; freeze its unused logit scale; optional activation checkpointing."""
        self.clip = clip
        self.clip_lr = float(clip_lr)
        if hasattr(clip, "logit_scale"):
            clip.logit_scale.requires_grad_(False)  # the head's logit scale is used (and clamped) instead
        if grad_checkpointing:
            clip.set_grad_checkpointing(True)

    def encode_text(self, text: Mapping[str, torch.Tensor]) -> Emb:
        """{"t": (B, D)} unnormalised CLIP text features of `text["tokens"]` (B, L) int64."""
        return {"t": self.clip.encode_text(text["tokens"], normalize=False).float()}

    def encode_video(self, video: Mapping[str, torch.Tensor]) -> Emb:
        """{"frames": (B, F, D), "frames_mask": (B, F)} from normalised pixels `video["pixels"]` (B, F, 3, H, W)."""
        x = video["pixels"]
        b, f = x.shape[:2]
        e = self.clip.encode_image(x.flatten(0, 1), normalize=False).float().view(b, f, -1)
        return {"frames": e, "frames_mask": frame_mask(e, video.get("frames_mask"))}

    def forward(self, text: Mapping[str, torch.Tensor], video: Mapping[str, torch.Tensor]) -> tuple[Emb, Emb]:
        """Both encoders (the DDP entry point); the loss runs on the gathered embeddings."""
        return self.encode_text(text), self.encode_video(video)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """CLIP at clip_lr, head at lr, the head's logit scale at its logit_scale_lr (reference groups)."""
        clip_ids = {id(p) for p in self.clip.parameters()}
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]  # type: ignore[attr-defined]
        clip = [p for _, p in named if id(p) in clip_ids]
        scale = [p for n, p in named if n == "logit_scale"]
        head = [p for n, p in named if id(p) not in clip_ids and n != "logit_scale"]
        return [{"params": head, "lr": lr, "name": "head"}, {"params": clip, "lr": self.clip_lr, "name": "clip"},
                {"params": scale, "lr": self.config.logit_scale_lr, "name": "logit_scale"}]  # type: ignore[attr-defined]


class ClipTMASS(_ClipEncoders, TMASS):
    """T-MASS with a fine-tuned CLIP."""


class ClipXPool(_ClipEncoders, XPoolModel):
    """X-Pool with a fine-tuned CLIP."""


HEADS: dict[str, tuple[type, type]] = {"tmass": (ClipTMASS, TMASSConfig), "xpool": (ClipXPool, XPoolConfig)}


def build(head: str, clip: nn.Module, head_config: Mapping[str, Any], *, num_frames: int, clip_lr: float,
          grad_checkpointing: bool = False) -> nn.Module:
    """The fine-tuning model: `head` ("tmass" | "xpool") over `clip`, embed dim from CLIP's text projection."""
    from train.models._api import ModelConfigError, resolve_config

    if head not in HEADS:
        raise ModelConfigError(f"fine-tuning supports {sorted(HEADS)}, not {head!r}")
    cls, cfg_cls = HEADS[head]
    cfg = resolve_config(cfg_cls, dict(head_config), {"frames_feature": FRAMES, "text_feature": TEXT,
                                                       "num_frames": num_frames})
    dim = int(clip.text_projection.shape[1]) if isinstance(clip.text_projection, torch.Tensor) \
        else int(clip.text_projection.out_features)
    model = cls(cfg, {FRAMES: dim, TEXT: dim}, num_frames)
    model.attach(clip, clip_lr, grad_checkpointing)
    return model
