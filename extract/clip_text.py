"""CLIP text features per caption: unnormalised `encode_text`, float32, same model and weights as `clip` frames.

Tokenisation is open_clip's own tokenizer for the model (the CLIP BPE vocabulary ships inside the package, so this
works offline; context length 77, longer captions truncated). Empty captions are ABSENT ("empty_text").
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from extract._api import CaptionExtractor
from extract._registry import register_extractor
from extract.clip_frames import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_clip
from store.schema import FeatureRows, FeatureSpec, Status


@register_extractor("clip_text")
class ClipText(CaptionExtractor):
    """One unnormalised CLIP text embedding per caption."""

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        pretrained: str = DEFAULT_PRETRAINED,
        quick_gelu: bool | None = None,
        batch_size: int = 256,
        chunk_rows: int = 256,
        **common: Any,
    ) -> None:
        """model/pretrained as for `clip`; batch_size: captions per forward; chunk_rows: store chunking."""
        import open_clip

        super().__init__(**common)
        if batch_size <= 0:
            raise ValueError(f"clip_text: batch_size must be > 0, got {batch_size}")
        self.batch_size = batch_size
        self.model = load_clip(self, model, pretrained, quick_gelu)
        self.tokenizer = open_clip.get_tokenizer(model)
        dim = int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") and \
            self.model.text_projection is not None else int(self.model.visual.output_dim)
        self.spec = FeatureSpec(name="clip_text", dim=dim, max_steps=1, dtype="float32", modality="text",
                                axis="caption", chunk_rows=chunk_rows)
        self.preset = "open_clip_tokenizer"
        assert self.weights is not None
        tag = str(self.weights.meta.get("pretrained", pretrained))  # the tag a file was identified as, or "file"
        self.options = {"model": model, "pretrained": tag, "quick_gelu": self.quick_gelu, "half": self.half,
                        "normalized": False,
                        "context_length": int(self.tokenizer.context_length)}

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unnormalised text embeddings, batched."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=False).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.spec.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)

    def encode_captions(self, texts: Sequence[str]) -> list[FeatureRows]:
        """One row per caption: values (1, D) at time 0, or ABSENT "empty_text" for blank captions."""
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        feats = self.encode_texts([texts[i] for i in keep])
        rows: list[FeatureRows] = [
            FeatureRows.absent(self.spec, "empty_text", "caption text is empty") for _ in range(len(texts))
        ]
        for j, i in enumerate(keep):
            rows[i] = FeatureRows(status=Status.OK, values=feats[j : j + 1], times=np.zeros(1, dtype=np.float32))
        return rows
