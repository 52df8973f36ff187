"""Mixture of Embedding Experts (Miech, Laptev, Sivic 2018) on store features.

Follows the reference (antoine77340/Mixture-of-Embedding-Experts model.py / loupe.py / loss.py) with these
deliberate differences, each documented at its field:
- padded words / steps are masked out of NetVLAD (`netvlad_mask_padding=True`; False = reference behaviour);
- appearance, motion and face streams are (B, T, D) sequences in the store and are max-pooled over their valid
  steps in-model (the reference read vectors pooled offline);
- a missing modality (`f_avail` False, or no valid step) never reaches its video GEU: the GEU runs only on the
  available rows, so missing rows neither change scores nor enter BatchNorm statistics, and get no gradient;
- the mixture-weight columns follow `modalities` order (the reference used its video-dict insertion order).
Scores: s_ij = sum_m lambda_im a_jm <e^t_m(i), e^v_m(j)> / sum_m lambda_im a_jm (paper eq. 6), lambda = softmax of
a linear map of the text NetVLAD descriptor, a_jm the availability of modality m in video j.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from store.schema import FeatureSpec
from train.losses import max_margin_ranking_loss
from train.models._api import (
    Emb,
    FeatureNeeds,
    ModelConfigError,
    RetrievalModel,
    feature_dims_from,
    register_model,
    resolve_config,
)
from train.models._linear import linear
from train.models.netvlad import NetVLAD, batch_norm_rows

AGGREGATIONS = ("max", "mean", "netvlad")


@dataclass
class MEEConfig:
    """MEE hyper-parameters; defaults from the reference train.py / paper."""

    # modality -> store feature group; modalities whose feature the store lacks are dropped at build time
    modalities: dict[str, str] = field(
        default_factory=lambda: {"appearance": "resnet152", "motion": "i3d_flow", "audio": "vggish", "face": "dlib_face"}
    )
    # modality -> temporal aggregation: "max" (over valid steps), "mean" or "netvlad"; unlisted modalities use "max"
    aggregation: dict[str, str] = field(default_factory=lambda: {"audio": "netvlad"})
    text_feature: str = "glove"  # store group of the word vectors (the batch key is always "words")
    text_clusters: int = 32  # NetVLAD clusters for the words (reference: 32)
    audio_clusters: int = 16  # NetVLAD clusters for any "netvlad" video modality (reference: 16, hard-coded)
    embed_dims: dict[str, int] = field(default_factory=dict)  # modality -> GEU output dim; default = raw feature dim
    netvlad_mask_padding: bool = True  # False = reference: zero padding gets soft assignments
    margin: float = 0.2  # max-margin delta (reference train.py default)
    exclude_diagonal: bool = False  # drop the j = i hinge terms (reference keeps them: +margin/n)
    # Optimiser, lr schedule, batch size and epochs are TrainConfig keys (train/config.py MODEL_DEFAULTS and
    # RECIPES: Adam, lr 1e-4, x0.95 per epoch, batch 128, 50 epochs; MSR-VTT recipe lr 4e-4 batch 64).

    def features(self) -> FeatureNeeds:
        """Words of `text_feature`; any non-empty subset of the `modalities` features, "max"/"mean" ones pooled when read."""
        aggs: dict[str, set[str]] = {}
        for m, f in self.modalities.items():
            aggs.setdefault(f, set()).add(self.aggregation.get(m, "max"))
        pooled = tuple((f, a.pop()) for f, a in aggs.items() if a in ({"max"}, {"mean"}))
        return FeatureNeeds(video=tuple(self.modalities.values()), text=self.text_feature, text_key="words",
                            text_sequence=True, video_optional=True, pooled=pooled)


class GatedEmbeddingUnit(nn.Module):
    """GEU: y = W1 x + b1;  out = L2norm(y * sigmoid(BN(W2 y + b2))) (paper eqs. 1-3, BN as in the reference)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(out_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim) unit vectors."""
        y = linear(x, self.fc.weight, self.fc.bias)
        z = linear(y, self.gate.weight, self.gate.bias)
        return F.normalize(y * torch.sigmoid(batch_norm_rows(self.bn, z)), dim=1)


def masked_pool(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Max or mean over the valid steps of (B, T, D); rows without a valid step give zeros."""
    valid = mask.bool()[..., None]
    if how == "max":
        out = x.masked_fill(~valid, float("-inf")).amax(dim=1)
        return torch.where(valid.any(dim=1), out, torch.zeros_like(out))
    count = valid.sum(dim=1).clamp(min=1)
    return (x * valid).sum(dim=1) / count


class MEE(RetrievalModel):
    """Mixture of Embedding Experts: text NetVLAD + per-modality GEUs + text-predicted, availability-renormalised weights."""

    text_features: tuple[str, ...]
    video_features: tuple[str, ...]

    def __init__(self, config: MEEConfig, feature_dims: Mapping[str, int]) -> None:
        super().__init__()
        self.config = config
        mods = {m: f for m, f in config.modalities.items() if f in feature_dims}
        if not mods:
            raise ModelConfigError(
                f"MEE: none of the configured video features {sorted(config.modalities.values())} is in the store "
                f"(have {sorted(feature_dims)}); extract one or set model_config.modalities"
            )
        if config.text_feature not in feature_dims:
            raise ModelConfigError(
                f"MEE: text feature {config.text_feature!r} not in the store features {sorted(feature_dims)}; "
                "set model_config.text_feature"
            )
        self.modalities = tuple(mods)
        self.feature_of = dict(mods)
        self.video_features = tuple(mods.values())
        self.text_features = (config.text_feature,)
        self.agg = {m: config.aggregation.get(m, "max") for m in self.modalities}
        bad = {m: a for m, a in self.agg.items() if a not in AGGREGATIONS}
        if bad:
            raise ModelConfigError(f"MEE: unknown aggregation {bad}; choose from {AGGREGATIONS}")
        wdim = int(feature_dims[config.text_feature])
        self.text_vlad = NetVLAD(wdim, config.text_clusters, mask_padding=config.netvlad_mask_padding)
        self.video_vlad = nn.ModuleDict()
        self.video_geu = nn.ModuleDict()
        self.text_geu = nn.ModuleDict()
        for m, f in mods.items():
            d = int(feature_dims[f])
            out = int(config.embed_dims.get(m, d))
            if self.agg[m] == "netvlad":
                self.video_vlad[m] = NetVLAD(d, config.audio_clusters, mask_padding=config.netvlad_mask_padding)
                d = self.video_vlad[m].out_dim
            self.video_geu[m] = GatedEmbeddingUnit(d, out)
            self.text_geu[m] = GatedEmbeddingUnit(self.text_vlad.out_dim, out)
        self.moe = nn.Linear(self.text_vlad.out_dim, len(self.modalities))

    # ---- encoders -----------------------------------------------------------------------------------------
    def encode_text(self, text: Mapping[str, torch.Tensor]) -> Emb:
        """{"t_<m>": (B, D_m) unit vectors, "moe": (B, M) mixture weights (softmax, before renormalisation)}."""
        words = text["words"].float()
        mask = text.get("words_mask")
        h = self.text_vlad(words, None if mask is None else mask.bool())
        out: Emb = {f"t_{m}": self.text_geu[m](h) for m in self.modalities}
        out["moe"] = torch.softmax(linear(h, self.moe.weight, self.moe.bias), dim=1)
        return out

    def encode_video(self, video: Mapping[str, torch.Tensor]) -> Emb:
        """{"v_<m>": (B, D_m) unit vectors (zeros where missing), "avail": (B, M) float 0/1}."""
        out: Emb = {}
        avail = []
        for m in self.modalities:
            f = self.feature_of[m]
            x = video[f].float()
            b = x.shape[0]
            mask = video.get(f"{f}_mask")
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
            ok = video.get(f"{f}_avail")
            ok = torch.ones(b, dtype=torch.bool, device=x.device) if ok is None else ok.bool()
            ok = ok & mask.any(dim=1)  # an "available" row without a single valid step is treated as missing
            idx = ok.nonzero().squeeze(1)
            full = len(idx) == b  # every row available: no gather, no scatter
            # only available rows: missing rows never reach the GEU or its BatchNorm
            xs, ms = (x, mask) if full else (x[idx], mask[idx])
            if self.agg[m] == "netvlad":
                pooled = self.video_vlad[m](xs, ms)
            else:
                pooled = masked_pool(xs, ms, self.agg[m])
            if full:
                emb = self.video_geu[m](pooled)
            else:
                emb = torch.zeros(b, self.video_geu[m].fc.out_features, dtype=x.dtype, device=x.device)
                emb = emb.index_copy(0, idx, self.video_geu[m](pooled)) if len(idx) else emb
            out[f"v_{m}"] = emb
            avail.append(ok)
        out["avail"] = torch.stack(avail, dim=1).to(torch.float32)
        return out

    # ---- scores and loss ----------------------------------------------------------------------------------
    def mixture_weights(self, text_emb: Emb, video_emb: Emb) -> torch.Tensor:
        """(Nt, Nv, M) weights lambda_im a_jm / sum_m' lambda_im' a_jm' (zero rows for videos with nothing available)."""
        w = text_emb["moe"][:, None, :] * video_emb["avail"][None, :, :]
        den = w.sum(dim=2, keepdim=True)
        return torch.where(den > 0, w / den.clamp(min=torch.finfo(w.dtype).tiny), torch.zeros_like(w))

    def _scores(self, text_emb: Emb, video_emb: Emb) -> torch.Tensor:
        """Full (Nt, Nv) score matrix without materialising (Nt, Nv, M) (eq. 6)."""
        lam, av = text_emb["moe"], video_emb["avail"]
        num = torch.zeros(lam.shape[0], av.shape[0], dtype=lam.dtype, device=lam.device)
        for k, m in enumerate(self.modalities):
            # v_m is zero where missing, so the a_jm factor is implicit in the dot product
            num = num + lam[:, k : k + 1] * (text_emb[f"t_{m}"] @ video_emb[f"v_{m}"].t())
        den = lam @ av.t()
        return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))

    def similarity(self, text_emb: Emb, video_emb: Emb, *, chunk: int = 256) -> torch.Tensor:
        """(Nt, Nv) MEE scores, `chunk` texts at a time; videos with no available modality score 0."""
        nt = text_emb["moe"].shape[0]
        parts = []
        for s in range(0, nt, max(1, int(chunk))):
            part = {k: v[s : s + chunk] for k, v in text_emb.items()}
            parts.append(self._scores(part, video_emb))
        return torch.cat(parts, 0) if parts else text_emb["moe"].new_zeros(0, video_emb["avail"].shape[0])

    def loss(self, text_emb: Emb, video_emb: Emb) -> tuple[torch.Tensor, dict[str, float]]:
        """Bidirectional max-margin ranking loss (eq. 7, reference normalisation) over the batch."""
        sim = self._scores(text_emb, video_emb)
        loss = max_margin_ranking_loss(sim, self.config.margin, exclude_diagonal=self.config.exclude_diagonal)
        return loss, {"rank_loss": float(loss.detach())}


@register_model("mee", config=MEEConfig)
def mee(
    *,
    config: MEEConfig | Mapping[str, Any] | None = None,
    feature_dims: Mapping[str, int] | None = None,
    specs: Mapping[str, FeatureSpec | int] | None = None,
    **overrides: Any,
) -> MEE:
    """Build MEE.

    Args:
        config: an MEEConfig (or mapping of its fields); defaults when None.
        feature_dims: {store feature: width D}; needs the text feature and at least one video feature.
        specs: {store feature: FeatureSpec}; alternative source of the widths (explicit `feature_dims` win).
        **overrides: MEEConfig fields overriding `config`.
    """
    cfg = resolve_config(MEEConfig, config, overrides)
    return MEE(cfg, feature_dims_from(feature_dims, specs))
