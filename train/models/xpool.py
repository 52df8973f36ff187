"""X-Pool text-conditioned frame pooling (reference modules/transformer.py, shared by X-Pool and T-MASS) and the `xpool` model.

pool(v|t) for text t (D,) and frames V (F, D) of one video, H heads of width D/H (reference: H = 1):
    t^ = LN1(t), V^ = LN1(V)                  (one LayerNorm for text and frames)
    q = Wq t^ + bq;  k_f = Wk V^_f + bk;  u_f = Wv V^_f + bv
    alpha_f = softmax_f(q . k_f / sqrt(D/H))   (per head; frames with mask False are excluded)
    o = LN2(Wo sum_f alpha_f u_f + bo)
    pool(v|t) = LN3(o + Dropout(Wl o + bl))
Every Linear is initialised to the identity with zero bias, as in the reference.

Evaluation never builds pool for all pairs through the D x D maps. Because alpha sums to one per head, Wo sum_f alpha_f
u_f + bo = sum_f alpha_f w_f with per-video w_f; the LN2 statistics are a quadratic form of alpha with the (F x F)
Gram matrix of the centred w_f; and (with dropout off) o + Wl o + bl is affine in the centred, LN2-normalised x, so
sigma * pre-LN3 = sum_f alpha_f z_f + sigma * c with per-video z_f = (I + Wl) diag(g2) (w_f - mean w_f). Folding LN3
in, pool(v|t) = sum_j at_j zt_j with per-video rows zt = [centred z * g3; b3] and per-pair weights at (HF+2 of them).
So t . pool(v|t) and |pool(v|t)| are (HF+2)-term forms (X-Pool scores need no per-pair D-vector at all), and where
T-MASS needs pool itself it is one (HF+2)-term weighted sum; every D x D product is done once per video or text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from store.schema import FeatureSpec
from train.losses import symmetric_cross_entropy
from train.models._api import (
    Emb,
    FeatureNeeds,
    ModelConfigError,
    RetrievalModel,
    feature_dims_from,
    register_model,
    resolve_config,
)

LN100 = math.log(100.0)
COS_EPS = 1e-8  # norm floor of cosines, as F.cosine_similarity's eps


@dataclass
class XPoolConfig:
    """X-Pool hyper-parameters; defaults from the reference config/all_config.py and README."""

    frames_feature: str = "clip"  # store group of per-frame CLIP image features (unnormalised)
    text_feature: str = "clip_text"  # store group (and batch key) of CLIP text features (unnormalised)
    num_frames: int = 0  # F; 0 = the frames feature's max_steps from the store spec (reference: 12)
    num_heads: int = 1  # attention heads (reference: 1)
    dropout: float = 0.3  # dropout on the residual linear (transformer_dropout)
    logit_scale_init: float = LN100  # tau init (CLIP's pretrained ln 100)
    logit_scale_max: float = LN100  # tau clamped to <= this after every step
    eval_pairs_per_chunk: int = 4096  # (text, video) pairs per eval chunk: ~24 MB of temporaries at D=512
    eval_video_block: int = 512  # videos whose pooling cache (~ (3F + 2) * D floats each) is held at once
    logit_scale_lr: float = 1e-6  # the reference trains tau in the CLIP group (clip_lr); see param_groups()
    # Optimiser, schedule, batch size and epochs are TrainConfig keys (train/config.py MODEL_DEFAULTS: AdamW with
    # weight decay 0.2 and eps 1e-6, cosine schedule with 10% warm-up, clipping 1.0, batch 32, 5 epochs, lr 1e-5).

    def features(self) -> FeatureNeeds:
        """Frames of `frames_feature` and one `text_feature` vector per caption, both required."""
        return FeatureNeeds(video=(self.frames_feature,), text=self.text_feature, text_key=self.text_feature,
                            text_sequence=False)


def _identity_(linear: nn.Linear) -> None:
    """Reference init: weight = eye (rectangular for non-square), bias = 0."""
    nn.init.eye_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class BitsDropout(nn.Dropout):
    """nn.Dropout whose keep mask compares 32 random bits per element with p * 2^32.

    Same distribution (each element kept with probability 1 - p, to within 2^-32, and scaled by 1 / (1 - p)),
    drawn from the same global torch generator, but torch's CPU bernoulli_ behind nn.Dropout draws each element
    through a double-precision Bernoulli sampler: 12 ms for X-Pool's (32, 32, 512) training tensor, a quarter of
    the step. Raw 64-bit draws split into two 32-bit halves take a fifth of that.
    """

    def keep_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Mask of x's shape and dtype: 1 / (1 - p) where kept, 0 where dropped (training, 0 < p < 1)."""
        n = x.numel()
        bits = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        bits = bits.view(torch.int32)[:n].view(x.shape)  # uniform over [-2^31, 2^31)
        keep = bits >= round(self.p * 2**32) - 2**31
        return torch.where(keep, 1.0 / (1.0 - self.p), 0.0).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * keep_scale(x) in training (zeros for p = 1), x itself in eval mode or for p = 0."""
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return torch.zeros_like(x)
        return x * self.keep_scale(x)


def frame_mask(frames: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(Nv, F) bool mask; rows with no valid frame are treated as all valid (their values are zeros)."""
    if mask is None:
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    mask = mask.bool()
    return mask | ~mask.any(dim=1, keepdim=True)


class XPoolHead(nn.Module):
    """Text-conditioned attention pooling of frame features (module docstring has the equations)."""

    def __init__(self, dim: int, num_heads: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelConfigError(f"X-Pool: embed dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.heads = dim, num_heads
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.linear_proj = nn.Linear(dim, dim)
        self.dropout = BitsDropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear_proj):
            _identity_(lin)

    def forward(self, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reference-form pooling for all pairs: text (Nt, D), frames (Nv, F, D) -> (Nv, Nt, D)."""
        nv, nf, d = frames.shape
        h, dh = self.heads, d // self.heads
        q = self.q_proj(self.ln1(text)).view(-1, h, dh)  # (Nt, H, dh)
        vf = self.ln1(frames)
        k = self.k_proj(vf).view(nv, nf, h, dh)
        u = self.v_proj(vf).view(nv, nf, h, dh)
        logits = torch.einsum("thc,vfhc->vthf", q, k) / math.sqrt(dh)
        logits = logits.masked_fill(~frame_mask(frames, mask)[:, None, None, :], float("-inf"))
        alpha = torch.softmax(logits, dim=-1)
        agg = torch.einsum("vthf,vfhc->vthc", alpha, u).reshape(nv, -1, d)
        o = self.ln2(self.out_proj(agg))
        return self.ln3(o + self.dropout(self.linear_proj(o)))

    def pool_train(self, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """forward() for all pairs, dropout included, with no D x D product per pair or per frame key: (Nv, Nt, D).

        q . k_f = (Wk^T q) . V^_f + q . bk, so the keys need one D x D product per text, not per frame.
        Wo agg + bo = sum_j a_j w_j with per-video rows w (Nv, HF, D), so its centred value is xc = a @ wc
        (wc = w - mean w) and LN2's variance is the quadratic form a^T (wc wc^T / D) a: rstd comes from (HF x HF)
        Gram matrices before any D-vector per pair exists. With a1 = [rstd * a, 1] (each head's a sums to one),
        LN2's output is o = a1 @ [wc g2; b2] and Wl o + bl = a1 @ [wc g2 Wl^T; Wl b2 + bl]: two (HF+1)-term
        weighted sums per pair, then o + dropout(y) and LN3 (the only elementwise passes over (Nv, Nt, D)).
        Dropout is drawn on the same (Nv, Nt, D) tensor as in forward(), so both use the same random numbers.
        """
        nv, nf, d = frames.shape
        h, dh = self.heads, d // self.heads
        q = self.q_proj(self.ln1(text)).view(-1, h, dh) / math.sqrt(dh)  # (Nt, H, dh)
        vf = self.ln1(frames)
        qk = torch.einsum("thc,hcd->thd", q, self.k_proj.weight.view(h, dh, d))  # Wk^T q per head: (Nt, H, D)
        logits = torch.einsum("thd,vfd->vthf", qk, vf) + (q * self.k_proj.bias.view(h, dh)).sum(-1)[None, :, :, None]
        logits = logits.masked_fill(~frame_mask(frames, mask)[:, None, None, :], float("-inf"))
        a = torch.softmax(logits, dim=-1).flatten(2)  # (Nv, Nt, HF); each head's weights sum to one
        u = self.v_proj(vf).view(nv, nf, h, dh)
        # w[v, h*F + f] = Wo[:, head h] u_f[head h] + bo / H: per video, not per pair
        w = torch.einsum("dhc,vfhc->vhfd", self.out_proj.weight.view(d, h, dh), u).reshape(nv, h * nf, d)
        w = w + self.out_proj.bias / h
        wc = w - w.mean(dim=2, keepdim=True)
        var = (torch.bmm(a, wc @ wc.transpose(1, 2)) * a).sum(-1) / d  # LN2 variance per pair: (Nv, Nt)
        rstd = torch.rsqrt(var.clamp(min=0.0) + self.ln2.eps)
        a1 = torch.cat([a * rstd[..., None], a.new_ones(nv, a.shape[1], 1)], 2)
        wg = wc * self.ln2.weight
        o = torch.bmm(a1, torch.cat([wg, self.ln2.bias.expand(nv, 1, d)], 1))  # LN2 output
        c = self.linear_proj(self.ln2.bias).expand(nv, 1, d)
        y = torch.bmm(a1, torch.cat([torch.matmul(wg, self.linear_proj.weight.t()), c], 1))  # = linear_proj(o)
        if self.dropout.training and 0.0 < self.dropout.p < 1.0:  # o + dropout(y) in one pass
            return self.ln3(torch.addcmul(o, y, self.dropout.keep_scale(y)))
        return self.ln3(o + self.dropout(y))

    # ---- evaluation fast path (dropout must be off) ------------------------------------------------------
    def text_queries(self, text: torch.Tensor) -> torch.Tensor:
        """(Nt, H, dh) scaled attention queries q / sqrt(dh)."""
        dh = self.dim // self.heads
        return self.q_proj(self.ln1(text)).view(text.shape[0], self.heads, dh) / math.sqrt(dh)

    def video_cache(self, frames: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-video tensors of the pair-free algebra: keys, Gram matrices and the mixing rows zt (Nv, HF+2, D)."""
        nv, nf, d = frames.shape
        h, dh = self.heads, d // self.heads
        vf = self.ln1(frames)
        k = self.k_proj(vf).view(nv, nf, h, dh)
        u = self.v_proj(vf).view(nv, nf, h, dh)
        wo = self.out_proj.weight.view(d, h, dh)
        # w[v, h*F + f] = Wo[:, head h] u_f[head h] + bo / H, so sum over heads and frames of alpha * w = Wo agg + bo
        w = torch.einsum("dhc,vfhc->vhfd", wo, u).reshape(nv, h * nf, d) + self.out_proj.bias / h
        wc = w - w.mean(dim=2, keepdim=True)  # centring removes mean(x), which LN2 subtracts anyway
        gram_w = wc @ wc.transpose(1, 2) / d  # var(x) = alpha^T gram_w alpha
        m = (torch.eye(d, device=w.device, dtype=w.dtype) + self.linear_proj.weight) * self.ln2.weight  # (I+Wl) diag(g2)
        c = self.ln2.bias + self.linear_proj(self.ln2.bias)  # (I+Wl) b2 + bl
        z = torch.cat([wc @ m.t(), c.expand(nv, 1, d)], dim=1)  # (Nv, HF+1, D); last row weighted by sigma
        zc = z - z.mean(dim=2, keepdim=True)
        gram_z = zc @ zc.transpose(1, 2) / d
        # pool(v|t) = sum_j at_j zt_j with zt = [zc * g3; b3] and at = [scale * a1, 1] (see mix_weights)
        zt = torch.cat([zc * self.ln3.weight, self.ln3.bias.expand(nv, 1, d)], dim=1)
        return {"k": k, "keep": frame_mask(frames, mask), "gram_w": gram_w, "gram_z": gram_z, "zt": zt,
                "gram_t": zt @ zt.transpose(1, 2)}

    def attention(self, q: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(Nt, Nv, H*F) attention weights of every (text, video) pair of a chunk."""
        logits = torch.einsum("thc,vfhc->tvhf", q, cache["k"])
        logits = logits.masked_fill(~cache["keep"][None, :, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).flatten(2)

    def mix_weights(self, q: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(Nt, Nv, HF+2) weights `at` with pool(v|t) = at[t, v] @ cache["zt"][v] (eval mode)."""
        a = self.attention(q, cache)
        var_x = torch.einsum("tvj,vjk,tvk->tv", a, cache["gram_w"], a).clamp(min=0.0)
        sigma = torch.sqrt(var_x + self.ln2.eps)  # LN2 denominator
        a1 = torch.cat([a, sigma[..., None]], dim=-1)  # sigma * pre-LN3 = a1 @ zc
        var_y = torch.einsum("tvj,vjk,tvk->tv", a1, cache["gram_z"], a1).clamp(min=0.0)
        scale = torch.rsqrt(var_y + self.ln3.eps * sigma.square())  # LN3 of (a1 @ zc) / sigma
        return torch.cat([a1 * scale[..., None], torch.ones_like(scale)[..., None]], dim=-1)

    @staticmethod
    def pool_dot(at: torch.Tensor, cache: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(Nt, Nv) x_t . pool(v|t) for x (Nt, D), without building pool (one (HF+2)-term dot per pair)."""
        return (at * torch.matmul(cache["zt"], x.t()).permute(2, 0, 1)).sum(-1)

    @staticmethod
    def pool_norm(at: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(Nt, Nv) |pool(v|t)| from the (HF+2)^2 Gram matrix of zt."""
        return torch.einsum("tvj,vjk,tvk->tv", at, cache["gram_t"], at).clamp(min=0.0).sqrt()

    @staticmethod
    def pool_values(at: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(Nv, Nt, D) pool(v|t) from mixing weights (one (HF+2)-term weighted sum of D-vectors per pair)."""
        return torch.bmm(at.transpose(0, 1), cache["zt"])

    def pool_fast(self, q: torch.Tensor, cache: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Eval-mode pool(v|t) for a chunk: (Nv, Nt, D), equal to forward() without any per-pair D x D product."""
        return self.pool_values(self.mix_weights(q, cache), cache)


def pair_cosines(x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(Nt, Nv) cos(x_t, pooled[v, t]) from texts x (Nt, D) and pooled vectors (Nv, Nt, D); norms floored at COS_EPS.

    Dots of the unit texts divided by the pooled norms: no normalised (Nv, Nt, D) copy, forward or backward.
    """
    dots = (pooled * unit(x)).sum(-1)  # (Nv, Nt)
    return (dots / pooled.norm(dim=-1).clamp(min=COS_EPS)).t()


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last axis (norm floored at COS_EPS, as F.cosine_similarity)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=COS_EPS)


def cosine_to_frames(text: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(Nt, Nv, F) cos(t, v_f) on raw features; masked frames give 0."""
    tn = F.normalize(text, dim=-1)
    vn = F.normalize(frames, dim=-1)
    s = torch.einsum("td,vfd->tvf", tn, vn)
    return s * keep[None].to(s.dtype)


class XPoolBase(RetrievalModel):
    """Shared parts of X-Pool and T-MASS: CLIP feature inputs, pooling head, logit scale."""

    def __init__(self, config: XPoolConfig, feature_dims: Mapping[str, int], num_frames: int) -> None:
        super().__init__()
        for f in (config.frames_feature, config.text_feature):
            if f not in feature_dims:
                raise ModelConfigError(
                    f"{type(self).__name__}: feature {f!r} not in the store features {sorted(feature_dims)}; "
                    "extract it (tvr-extract --features clip,clip_text) or set model_config.frames_feature/text_feature"
                )
        d, dt = int(feature_dims[config.frames_feature]), int(feature_dims[config.text_feature])
        if d != dt:
            raise ModelConfigError(f"{type(self).__name__}: frame dim {d} != text dim {dt}; both must be the CLIP embed dim")
        self.config, self.dim, self.num_frames = config, d, int(num_frames)
        self.video_features = (config.frames_feature,)
        self.text_features = (config.text_feature,)
        self.pool = XPoolHead(d, config.num_heads, config.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    def encode_text(self, text: Mapping[str, torch.Tensor]) -> Emb:
        """{"t": (B, D)} raw CLIP text features (everything else depends on the video too)."""
        return {"t": text[self.config.text_feature].float()}

    def encode_video(self, video: Mapping[str, torch.Tensor]) -> Emb:
        """{"frames": (B, F, D), "frames_mask": (B, F)} raw CLIP frame features."""
        f = self.config.frames_feature
        frames = video[f].float()
        if self.num_frames and frames.shape[1] != self.num_frames:
            raise ValueError(
                f"{type(self).__name__}: feature {f!r} has {frames.shape[1]} steps per video but the model was built "
                f"for {self.num_frames}; rebuild with model_config.num_frames={frames.shape[1]} or re-extract"
            )
        mask = video.get(f"{f}_mask")
        return {"frames": frames, "frames_mask": frame_mask(frames, mask)}

    def clamp_logit_scale(self) -> None:
        """Clamp tau to <= logit_scale_max (reference: after every optimiser step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=self.config.logit_scale_max)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Two groups: the logit scale at config.logit_scale_lr (reference CLIP group), the rest at `lr`."""
        rest = [p for n, p in self.named_parameters() if n != "logit_scale" and p.requires_grad]
        return [{"params": rest, "lr": lr}, {"params": [self.logit_scale], "lr": self.config.logit_scale_lr}]

    def _chunks(self, nt: int, chunk: int) -> tuple[int, int]:
        """(texts, videos) per evaluation chunk: at most `chunk` texts and about eval_pairs_per_chunk pairs."""
        pairs = max(1, int(self.config.eval_pairs_per_chunk))
        tc = max(1, min(int(chunk), nt, math.isqrt(pairs)))
        return tc, max(1, pairs // tc)

    def video_blocks(self, video_emb: Emb) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """(v0, v1, pooling cache) for blocks of eval_video_block videos (bounds the cache memory)."""
        frames, mask = video_emb["frames"], video_emb["frames_mask"]
        step = max(1, int(self.config.eval_video_block))
        for v0 in range(0, frames.shape[0], step):
            v1 = min(frames.shape[0], v0 + step)
            yield v0, v1, self.pool.video_cache(frames[v0:v1], mask[v0:v1])


class XPoolModel(XPoolBase):
    """X-Pool: s(t, v) = cos(t, pool(v|t)); loss = symmetric cross-entropy over exp(tau) * S."""

    def loss(self, text_emb: Emb, video_emb: Emb) -> tuple[torch.Tensor, dict[str, float]]:
        """Symmetric CE on S[i, j] = cos(t_i, pool(v_j | t_i))."""
        t = text_emb["t"]
        pooled = self.pool.pool_train(t, video_emb["frames"], video_emb["frames_mask"])  # (Bv, Bt, D)
        sim = pair_cosines(t, pooled)
        loss = symmetric_cross_entropy(sim, self.logit_scale)
        return loss, {"loss_xpool": float(loss.detach()), "logit_scale": float(self.logit_scale.detach().exp())}

    def similarity(self, text_emb: Emb, video_emb: Emb, *, chunk: int = 256) -> torch.Tensor:
        """(Nt, Nv) cos(t, pool(v|t)) in (text, video) chunks (eval mode: dropout off); no D-vector per pair."""
        t = text_emb["t"]
        nt, nv = t.shape[0], video_emb["frames"].shape[0]
        tc, vc = self._chunks(nt, chunk)
        out = t.new_empty(nt, nv)
        with torch.no_grad():
            q = self.pool.text_queries(t)
            tnorm = t.norm(dim=-1).clamp(min=COS_EPS)
            for b0, b1, cache in self.video_blocks(video_emb):
                for v0 in range(b0, b1, vc):
                    v1 = min(b1, v0 + vc)
                    part = {k: x[v0 - b0 : v1 - b0] for k, x in cache.items()}
                    for t0 in range(0, nt, tc):
                        at = self.pool.mix_weights(q[t0 : t0 + tc], part)
                        dots = self.pool.pool_dot(at, part, t[t0 : t0 + tc])
                        norms = self.pool.pool_norm(at, part).clamp(min=COS_EPS) * tnorm[t0 : t0 + tc, None]
                        out[t0 : t0 + tc, v0:v1] = dots / norms
        return out


def frames_count(config: XPoolConfig, specs: Mapping[str, FeatureSpec | int] | None) -> int:
    """F from the config, else from the frames feature's store spec (max_steps), else 12 (reference)."""
    if config.num_frames:
        return int(config.num_frames)
    spec = (specs or {}).get(config.frames_feature)
    return spec.max_steps if isinstance(spec, FeatureSpec) else 12  # a bare width says nothing of the steps


@register_model("xpool", config=XPoolConfig)
def xpool(
    *,
    config: XPoolConfig | Mapping[str, Any] | None = None,
    feature_dims: Mapping[str, int] | None = None,
    specs: Mapping[str, FeatureSpec | int] | None = None,
    **overrides: Any,
) -> XPoolModel:
    """Build X-Pool.

    Args:
        config: an XPoolConfig (or mapping of its fields); defaults when None.
        feature_dims: {store feature: width D}; needs the frames and text features (same D).
        specs: {store feature: FeatureSpec}; alternative source of widths and of num_frames (max_steps).
        **overrides: XPoolConfig fields overriding `config`.
    """
    cfg = resolve_config(XPoolConfig, config, overrides)
    return XPoolModel(cfg, feature_dims_from(feature_dims, specs), frames_count(cfg, specs))
