"""T-MASS (Wang et al., CVPR 2024): X-Pool pooling plus a stochastic text embedding with a similarity-aware radius.

Equations (reference modules/stochastic_module.py and trainer_stochastic.py; see docs/reference brief §3):
    s_f = cos(t, v_f), f = 1..F (raw features; masked frames give 0)
    R = exp(W_r s + b_r)      (W_r: F -> D, identity-initialised, so at init R_k = exp(s_k) for k < F, 1 elsewhere)
    t_s = t + eps * R          (eps ~ U[0, 1)^D by default, or N(0, std^2))
    t_sup = t + R * (vbar - t) / ||vbar - t||,  vbar_i = mean_j pool(v_i | t_j)
    L = L_s + alpha * L_sup    (symmetric CE over exp(tau) * cos(., pool(v_j | t_i)))
In training R uses the text's paired video, as in the reference. At inference
    s(t, v) = max_k cos(t_s^k(t | v), pool(v | t)),  k = 1..trials,
with R from the candidate video. The reference scored the chosen sample against pool(v | ground-truth caption of v),
which leaks the answer; `leaky_reference_similarity` reproduces that only for parity tests.

Evaluation noise: eps_k(t, v) is drawn per (text, video, trial) from a counter-based generator keyed by the seed,
the caption id, the item id and the trial (`tmass_noise`), as the reference redraws it per video; so scores do not
depend on chunk sizes, on the evaluation set or on the global RNG, and candidate videos do not share one draw.
cos(t + eps_k * R, p) = (t.p + eps_k.(R*p)) / (sqrt(|t|^2 + 2 eps_k.(R*t) + eps_k^2.R^2) |p|): t.p and |p| come
from X-Pool's (HF+2)-term forms; the trials are one fused loop per pair (`tmass_noise.trial_max`: the noise is made
in registers, never stored) and no (texts x videos x trials x D) tensor is ever built. Per pair the D-sized work is
R (Linear(F -> D) + exp), pool(v|t) as an (HF+2)-term sum, and the K trial dot products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from store.schema import FeatureSpec
from train.losses import symmetric_cross_entropy
from train.models._api import Emb, ModelConfigError, feature_dims_from, register_model, resolve_config
from train.models.tmass_noise import C_TEXT, C_VIDEO, key_states, pair_noise, pair_states, trial_max
from train.models.xpool import COS_EPS, XPoolBase, XPoolConfig, _identity_, frames_count, pair_cosines

PRIORS = ("uniform01", "normal")


@dataclass
class TMASSConfig(XPoolConfig):
    """T-MASS hyper-parameters: X-Pool's plus the stochastic text; defaults from the reference / brief."""

    trials: int = 20  # stochastic samples per (text, video) at inference
    prior: str = "uniform01"  # eps distribution: "uniform01" (reference default, mean 0.5) or "normal"
    prior_std: float = 1.0  # std of the normal prior (LSMDC command: 3e-3)
    support_weight: float = 0.8  # alpha for L_sup (reference code default 0.0; README MSR-VTT 0.8)
    eval_seed: int = 0  # seed of the evaluation noise when similarity() gets none


class SimilarityRadius(nn.Module):
    """R = exp(Linear(F -> D)(s)), identity-initialised (eye_ on the (D, F) weight, zero bias)."""

    def __init__(self, num_frames: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_frames, dim)
        _identity_(self.linear)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """(..., F) frame cosines -> (..., D) radius."""
        return torch.exp(self.linear(s))


class TMASS(XPoolBase):
    """T-MASS: stochastic text embeddings around CLIP text features, scored against X-Pool pooled frames."""

    config: TMASSConfig

    def __init__(self, config: TMASSConfig, feature_dims: Mapping[str, int], num_frames: int) -> None:
        super().__init__(config, feature_dims, num_frames)
        if config.prior not in PRIORS:
            raise ModelConfigError(f"T-MASS: prior must be one of {PRIORS}, got {config.prior!r}")
        if config.trials < 1:
            raise ModelConfigError(f"T-MASS: trials must be >= 1, got {config.trials}")
        self.radius = SimilarityRadius(self.num_frames, self.dim)

    # ---- pieces -------------------------------------------------------------------------------------------
    def frame_cosines(self, text: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(Nv, Nt, F) cos(t, v_f); masked frames give 0."""
        s = torch.einsum("td,vfd->vtf", F.normalize(text, dim=-1), F.normalize(frames, dim=-1))
        return s * keep[:, None, :].to(s.dtype)

    def sample_prior(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """eps of `shape` from the configured prior."""
        if self.config.prior == "uniform01":
            return torch.rand(shape, generator=generator, device=device)
        return torch.randn(shape, generator=generator, device=device) * self.config.prior_std

    def eval_noise(self, text_keys: torch.Tensor, video_keys: torch.Tensor, seed: int) -> torch.Tensor:
        """(Nt, Nv, trials, D) evaluation noise of every (text, video) pair: a pure function of (seed, keys, trial)."""
        states = pair_states(key_states(torch.as_tensor(text_keys), seed, C_TEXT),
                             key_states(torch.as_tensor(video_keys), seed, C_VIDEO))
        return pair_noise(states, self.config.trials, self.dim, self.config.prior, self.config.prior_std)

    # ---- training -----------------------------------------------------------------------------------------
    def paired_radius(self, t: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B, D) R of text i from the frames of its paired video i (training, as in the reference)."""
        s = F.cosine_similarity(t[:, None, :], frames, dim=-1) * keep.to(t.dtype)  # (B, F)
        return self.radius(s)

    @staticmethod
    def support_text(t: torch.Tensor, r: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """t_sup,i = t_i + R_i * (vbar_i - t_i) / |vbar_i - t_i| with vbar_i = mean_j pool(v_i | t_j); pooled (Bv, Bt, D)."""
        vbar = pooled.mean(dim=1)
        return t + r * F.normalize(vbar - t, dim=-1)

    def loss(self, text_emb: Emb, video_emb: Emb) -> tuple[torch.Tensor, dict[str, float]]:
        """L_s + alpha * L_sup for a batch of paired (text i, video i); eps from the global torch RNG."""
        t, frames, keep = text_emb["t"], video_emb["frames"], video_emb["frames_mask"]
        pooled = self.pool.pool_train(t, frames, keep)  # (Bv, Bt, D)
        r = self.paired_radius(t, frames, keep)  # (B, D)
        t_s = t + self.sample_prior(tuple(t.shape), device=t.device).to(t.dtype) * r
        sim = pair_cosines(t_s, pooled)  # [i, j] = cos(t_s,i, pool(v_j | t_i))
        loss_s = symmetric_cross_entropy(sim, self.logit_scale)
        parts = {"loss_s": float(loss_s.detach())}
        loss = loss_s
        if self.config.support_weight:
            t_sup = self.support_text(t, r, pooled)
            sim_sup = pair_cosines(t_sup, pooled)
            loss_sup = symmetric_cross_entropy(sim_sup, self.logit_scale)
            loss = loss + self.config.support_weight * loss_sup
            parts["loss_sup"] = float(loss_sup.detach())
        parts["logit_scale"] = float(self.logit_scale.detach().exp())
        return loss, parts

    # ---- inference ----------------------------------------------------------------------------------------
    def similarity(self, text_emb: Emb, video_emb: Emb, *, chunk: int = 256, seed: int | None = None,
                   generator: torch.Generator | None = None, text_keys: torch.Tensor | None = None,
                   video_keys: torch.Tensor | None = None) -> torch.Tensor:
        """(Nt, Nv) max_k cos(t_s^k(t|v), pool(v|t)), chunked over texts and videos (eval-mode pooling).

        Args:
            chunk: at most this many texts per chunk (pairs per chunk: config.eval_pairs_per_chunk).
            seed: noise seed (default config.eval_seed); `generator`, when given, draws the seed instead.
            text_keys, video_keys: int64 keys of the caption / item ids (`train.data.id_keys`) that key the
                per-pair noise; default: the row positions 0..N-1.
        """
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        seed = self.config.eval_seed if seed is None else int(seed)
        t, frames = text_emb["t"], video_emb["frames"]
        nt, nv = t.shape[0], frames.shape[0]
        tkeys = torch.arange(nt) if text_keys is None else torch.as_tensor(text_keys, dtype=torch.int64)
        vkeys = torch.arange(nv) if video_keys is None else torch.as_tensor(video_keys, dtype=torch.int64)
        if tkeys.shape != (nt,) or vkeys.shape != (nv,):
            raise ValueError(f"T-MASS similarity: keys {tuple(tkeys.shape)}/{tuple(vkeys.shape)} for {nt} texts, {nv} videos")
        ts, vs = key_states(tkeys, seed, C_TEXT), key_states(vkeys, seed, C_VIDEO)
        tc, vc = self._chunks(nt, chunk)
        out = t.new_empty(nt, nv)
        with torch.no_grad():
            q = self.pool.text_queries(t)
            tn = F.normalize(t, dim=-1)
            tt = t.square().sum(-1)
            lin = self.radius.linear
            w_r = lin.weight.t().contiguous()  # (F, D): log R = s @ w_r + b_r
            for b0, b1, cache in self.video_blocks(video_emb):
                vn = F.normalize(frames[b0:b1], dim=-1)
                for v0 in range(b0, b1, vc):
                    v1 = min(b1, v0 + vc)
                    part = {k: x[v0 - b0 : v1 - b0] for k, x in cache.items()}
                    part["vn_t"] = vn[v0 - b0 : v1 - b0].flatten(0, 1).t().contiguous()  # (D, Vc*F)
                    for t0 in range(0, nt, tc):
                        t1 = min(nt, t0 + tc)
                        states = pair_states(ts[t0:t1], vs[v0:v1])
                        out[t0:t1, v0:v1] = self._score_chunk(
                            t[t0:t1], tn[t0:t1], q[t0:t1], tt[t0:t1], states, part, w_r, lin.bias
                        )
        return out

    def _score_chunk(self, t: torch.Tensor, tn: torch.Tensor, q: torch.Tensor, tt: torch.Tensor, states: torch.Tensor,
                     part: Mapping[str, torch.Tensor], w_r: torch.Tensor, b_r: torch.Tensor) -> torch.Tensor:
        """(Tc, Vc) scores of one chunk; the trials run in `trial_max`, never as a (Tc, Vc, K, D) tensor."""
        at = self.pool.mix_weights(q, part)  # (Tc, Vc, HF+2): pool(v|t) = at @ zt
        tp = self.pool.pool_dot(at, part, t)  # t . p
        pn = self.pool.pool_norm(at, part).clamp(min=COS_EPS)  # |p|
        tc, vc = at.shape[:2]
        s = (tn @ part["vn_t"]).view(tc, vc, -1) * part["keep"].to(t.dtype)  # (Tc, Vc, F) frame cosines
        r = torch.addmm(b_r, s.view(tc * vc, -1), w_r).view(tc, vc, -1).exp_()  # radius R (Tc, Vc, D)
        u = torch.mul(r, self.pool.pool_values(at, part).transpose(0, 1))  # R * p (Tc, Vc, D)
        w = r * t[:, None, :]  # R * t
        d = r.shape[-1]
        cfg = self.config
        best = trial_max(states.reshape(-1), u.reshape(-1, d), w.reshape(-1, d), r.square_().reshape(-1, d),
                         tp.reshape(-1), tt[:, None].expand(tc, vc).reshape(-1), pn.reshape(-1),
                         cfg.trials, cfg.prior, cfg.prior_std)
        return best.view(tc, vc)


def leaky_reference_similarity(model: TMASS, text_emb: Emb, video_emb: Emb, gt_text: torch.Tensor | None = None,
                               *, seed: int | None = None) -> torch.Tensor:
    """Reference (leaky) T-MASS evaluation, ONLY for parity tests: NOT a valid retrieval score.

    For each video a the trial k* = argmax_k cos(t_s^k(t|a), pool(a|t)) is chosen (as in `similarity`), but the
    score is cos(t_s^{k*}(t|a), pool(a | t_gt(a))) with t_gt(a) = `gt_text[a]`, a ground-truth caption of a
    (default: text a, the reference's square 1-caption-per-video protocol). Same noise as `similarity`.
    """
    seed = model.config.eval_seed if seed is None else int(seed)
    t, frames, keep = text_emb["t"], video_emb["frames"], video_emb["frames_mask"]
    nt, nv = t.shape[0], frames.shape[0]
    gt = torch.arange(nv) if gt_text is None else gt_text.long()
    out = t.new_empty(nt, nv)
    with torch.no_grad():
        for a in range(nv):
            eps = model.eval_noise(torch.arange(nt), torch.tensor([a]), seed)[:, 0].to(t.device, t.dtype)  # (Nt, K, D)
            pooled = model.pool(t, frames[a : a + 1], keep[a : a + 1])[0]  # (Nt, D): pool(a | t)
            r = model.radius(model.frame_cosines(t, frames[a : a + 1], keep[a : a + 1])[0])  # (Nt, D)
            samples = t[:, None, :] + eps * r[:, None, :]  # (Nt, K, D)
            best = F.cosine_similarity(samples, pooled[:, None, :], dim=-1).argmax(dim=1)
            chosen = samples[torch.arange(nt), best]
            out[:, a] = F.cosine_similarity(chosen, pooled[gt[a]][None], dim=-1)
    return out


@register_model("tmass", config=TMASSConfig)
def tmass(
    *,
    config: TMASSConfig | Mapping[str, Any] | None = None,
    feature_dims: Mapping[str, int] | None = None,
    specs: Mapping[str, FeatureSpec | int] | None = None,
    **overrides: Any,
) -> TMASS:
    """Build T-MASS.

    Args:
        config: a TMASSConfig (or mapping of its fields); defaults when None.
        feature_dims: {store feature: width D}; needs the frames and text features (same D).
        specs: {store feature: FeatureSpec}; alternative source of widths and of num_frames (max_steps).
        **overrides: TMASSConfig fields overriding `config`.
    """
    cfg = resolve_config(TMASSConfig, config, overrides)
    return TMASS(cfg, feature_dims_from(feature_dims, specs), frames_count(cfg, specs))
