"""Equation-level tests of train/models/tmass.py: radius init, priors, support text, loss, leak-free inference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.losses import symmetric_cross_entropy
from train.models import TMASSConfig, create_model
from train.models._api import ModelConfigError
from train.models import tmass_noise
from train.models.tmass import leaky_reference_similarity

D, NF = 16, 5


def _model(perturb: bool = True, **kw):
    torch.manual_seed(0)
    m = create_model("tmass", feature_dims={"clip": D, "clip_text": D}, num_frames=NF, **kw).eval()
    if perturb:  # off the identity init, so pooling depends on the text and R mixes the frame cosines
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _inputs(nt: int, nv: int, seed: int = 1, masked: bool = True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(nt, D, generator=g) * 2
    frames = torch.randn(nv, NF, D, generator=g) * 2
    mask = torch.rand(nv, NF, generator=g) > 0.3 if masked else torch.ones(nv, NF, dtype=torch.bool)
    return t, frames, mask


def brute_force(m, t, frames, keep, seed: int = 0, gt: list[int] | None = None, tkeys=None, vkeys=None) -> torch.Tensor:
    """Per (text, video) pair: pool, R and every trial vector materialised; max over trials of the cosine.

    With `gt`, the chosen trial is scored against pool(v | text gt[v]) instead: the reference's leaky score.
    """
    tkeys = torch.arange(t.shape[0]) if tkeys is None else tkeys
    vkeys = torch.arange(frames.shape[0]) if vkeys is None else vkeys
    eps = m.eval_noise(tkeys, vkeys, seed)  # (Nt, Nv, K, D): the noise of each (text, video) pair
    out = torch.empty(t.shape[0], frames.shape[0])
    with torch.no_grad():
        for i in range(t.shape[0]):
            for v in range(frames.shape[0]):
                p = m.pool(t[i : i + 1], frames[v : v + 1], keep[v : v + 1])[0, 0]  # pool(v | t_i)
                s = torch.stack([F.cosine_similarity(t[i], frames[v, f], dim=0) * keep[v, f] for f in range(NF)])
                r = torch.exp(m.radius.linear.weight @ s + m.radius.linear.bias)
                trials = t[i][None] + eps[i, v] * r[None]  # (K, D)
                cos = F.cosine_similarity(trials, p[None], dim=-1)
                if gt is None:
                    out[i, v] = cos.max()
                else:
                    p_gt = m.pool(t[gt[v] : gt[v] + 1], frames[v : v + 1], keep[v : v + 1])[0, 0]
                    out[i, v] = F.cosine_similarity(trials[cos.argmax()], p_gt, dim=0)
    return out


def test_defaults():
    cfg = TMASSConfig()
    assert (cfg.trials, cfg.prior, cfg.support_weight, cfg.dropout) == (20, "uniform01", 0.8, 0.3)
    assert cfg.logit_scale_init == pytest.approx(math.log(100)) and cfg.logit_scale_max == pytest.approx(math.log(100))
    m = _model(perturb=False)
    assert m.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        m.logit_scale.add_(1.0)
    m.clamp_logit_scale()
    assert m.logit_scale.item() == pytest.approx(math.log(100))
    with pytest.raises(ModelConfigError, match="prior"):
        _model(prior="laplace")
    with pytest.raises(ModelConfigError, match="trials"):
        _model(trials=0)


def test_radius_is_exp_cos_on_first_dims_and_one_elsewhere_at_init():
    m = _model(perturb=False)
    assert torch.equal(m.radius.linear.weight, torch.eye(D, NF)) and not m.radius.linear.bias.any()
    t, frames, mask = _inputs(3, 4, masked=False)
    cos = torch.einsum("td,vfd->vtf", F.normalize(t, dim=-1), F.normalize(frames, dim=-1))
    r = m.radius(m.frame_cosines(t, frames, mask))  # (Nv, Nt, D)
    assert torch.allclose(r[..., :NF], torch.exp(cos), atol=1e-6)
    assert torch.equal(r[..., NF:], torch.ones(4, 3, D - NF))
    # training uses the paired video of each text
    paired = m.paired_radius(t[:3], frames[:3], mask[:3])
    assert torch.allclose(paired, torch.stack([r[i, i] for i in range(3)]), atol=1e-6)


def test_priors():
    torch.manual_seed(0)
    u = _model(perturb=False).sample_prior((2000, D))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0 and float(u.mean()) == pytest.approx(0.5, abs=0.02)
    n = _model(perturb=False, prior="normal", prior_std=3e-3).sample_prior((2000, D))
    assert float(n.std()) == pytest.approx(3e-3, rel=0.05) and float(n.mean()) == pytest.approx(0.0, abs=2e-4)


def test_eval_noise_is_per_pair_and_a_function_of_seed_keys_and_trial():
    m = _model(perturb=False, trials=3)
    tk, vk = torch.tensor([11, -5, 2**40 + 3, 7]), torch.tensor([3, 2**62 - 1, -(2**63)])
    full = m.eval_noise(tk, vk, seed=5)
    assert full.shape == (4, 3, 3, D)
    assert torch.equal(m.eval_noise(tk[[2, 0]], vk[[1]], seed=5), full[[2, 0]][:, [1]])  # keyed, not positional
    assert not torch.equal(m.eval_noise(tk, vk, seed=6), full)
    # every (text, video, trial) has its own draw: no two of the 36 vectors coincide
    flat = full.reshape(-1, D)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 0.5
    assert 0.0 <= float(full.min()) and float(full.max()) < 1.0


def test_eval_noise_distribution_and_independence_across_videos():
    """uniform01: mean 1/2, variance 1/12, and no correlation between the draws of one text for two videos."""
    m = _model(perturb=False, trials=4)
    eps = m.eval_noise(torch.arange(40), torch.arange(50), seed=0)  # 40 x 50 x 4 x 16 = 128k values
    assert float(eps.mean()) == pytest.approx(0.5, abs=0.005) and float(eps.var()) == pytest.approx(1 / 12, rel=0.02)
    # histogram is flat: 10 bins of ~12.8k each
    counts = torch.histc(eps, bins=10, min=0.0, max=1.0)
    assert (counts - counts.mean()).abs().max() < 5 * counts.mean().sqrt()
    a, b = eps[:, :-1].reshape(-1) - 0.5, eps[:, 1:].reshape(-1) - 0.5  # same text, neighbouring videos
    assert abs(float((a * b).mean() / (a.square().mean()))) < 0.02
    c, d = eps[:-1].reshape(-1) - 0.5, eps[1:].reshape(-1) - 0.5  # same video, neighbouring texts
    assert abs(float((c * d).mean() / (c.square().mean()))) < 0.02
    n = _model(perturb=False, trials=4, prior="normal", prior_std=3e-3).eval_noise(torch.arange(40), torch.arange(50), 0)
    assert float(n.std()) == pytest.approx(3e-3, rel=0.02) and float(n.mean()) == pytest.approx(0.0, abs=3e-5)
    assert float(n.abs().max()) <= 4.5 * 3e-3


def test_fused_kernel_matches_the_torch_kernel():
    """The numba kernel (when installed) gives the torch reference's numbers, for both priors."""
    if tmass_noise.fused_kernel() is None:
        pytest.skip("numba not installed: only the torch kernel is used")
    g = torch.Generator().manual_seed(0)
    n, d = 300, 40
    states = torch.randint(0, 2**32, (n,), generator=g)
    u, w, r2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.rand(n, d, generator=g) + 0.5
    tp, tt, pn = torch.randn(n, generator=g), torch.rand(n, generator=g) * 4 + 1, torch.rand(n, generator=g) + 0.5
    for prior, std in (("uniform01", 1.0), ("normal", 0.5)):
        fused = tmass_noise.trial_max(states, u, w, r2, tp, tt, pn, 7, prior, std)
        ref = tmass_noise._trial_max_torch(states, u, w, r2, tp, tt, pn, 7, prior, std)
        assert torch.allclose(fused, ref, atol=2e-5), prior


def test_support_vector_formula():
    g = torch.Generator().manual_seed(0)
    t, r = torch.randn(3, D, generator=g), torch.rand(3, D, generator=g) + 0.5
    pooled = torch.randn(3, 4, D, generator=g)  # (videos, texts, D)
    got = _model(perturb=False).support_text(t, r, pooled)
    for i in range(3):
        vbar = sum(pooled[i, j] for j in range(4)) / 4
        direction = (vbar - t[i]) / torch.linalg.vector_norm(vbar - t[i])
        assert torch.allclose(got[i], t[i] + r[i] * direction, atol=1e-6)
    const = torch.full((3, D), 0.7)  # a constant radius puts t_sup on the sphere of radius 0.7 around t
    assert torch.allclose((_model(perturb=False).support_text(t, const, pooled) - t).norm(dim=1), torch.full((3,), 0.7))


@pytest.mark.parametrize("weight", [0.8, 0.0])
def test_loss_is_ls_plus_alpha_lsup(weight):
    m = _model(support_weight=weight)  # eval mode: no dropout, so the hand version sees the same pooling
    t, frames, mask = _inputs(4, 4)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    torch.manual_seed(11)
    loss, parts = m.loss(te, ve)
    keep = ve["frames_mask"]
    with torch.no_grad():
        pooled = m.pool(t, frames, keep)
        r = m.paired_radius(t, frames, keep)
        torch.manual_seed(11)
        t_s = t + torch.rand(4, D) * r  # uniform [0, 1) prior, the paired video's radius
        sim = torch.stack([torch.stack([F.cosine_similarity(t_s[i], pooled[j, i], dim=0) for j in range(4)])
                           for i in range(4)])
        l_s = symmetric_cross_entropy(sim, m.logit_scale)
        t_sup = m.support_text(t, r, pooled)
        sim_sup = torch.stack([torch.stack([F.cosine_similarity(t_sup[i], pooled[j, i], dim=0) for j in range(4)])
                               for i in range(4)])
        l_sup = symmetric_cross_entropy(sim_sup, m.logit_scale)
    assert parts["loss_s"] == pytest.approx(l_s.item(), rel=1e-5)
    assert loss.item() == pytest.approx((l_s + weight * l_sup).item(), rel=1e-5)
    assert ("loss_sup" in parts) == bool(weight)
    loss.backward()
    assert m.radius.linear.weight.grad.abs().max() > 0  # the radius is trained through the reparameterisation


def test_similarity_matches_brute_force_per_pair():
    m = _model(trials=6)
    t, frames, mask = _inputs(7, 5)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    sim = m.similarity(te, ve, seed=0)
    assert torch.allclose(sim, brute_force(m, t, frames, ve["frames_mask"], seed=0), atol=1e-5)


def test_leak_free_score_differs_from_the_reference_leaky_score():
    """THE LEAK TEST: the reference scores text t against pool(v | GT caption of v); tvr uses pool(v | t)."""
    m = _model(trials=8)
    t, frames, mask = _inputs(6, 6)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    keep = ve["frames_mask"]
    correct = brute_force(m, t, frames, keep)
    leaky = brute_force(m, t, frames, keep, gt=list(range(6)))
    tvr = m.similarity(te, ve)
    ref = leaky_reference_similarity(m, te, ve)
    assert torch.allclose(tvr, correct, atol=1e-5)  # tvr computes the leak-free score ...
    assert torch.allclose(ref, leaky, atol=1e-5)  # ... and the parity helper reproduces the reference's
    off = ~torch.eye(6, dtype=torch.bool)
    assert (tvr - ref)[off].abs().max() > 1e-2  # the two differ wherever the text is not the GT caption
    assert not torch.allclose(tvr, ref, atol=1e-3)
    assert torch.allclose(tvr.diagonal(), ref.diagonal(), atol=1e-5)  # and agree where it is
    # several captions per video: gt_text names one caption of each video
    t2 = torch.cat([t, t[:3] + 0.1])
    te2 = m.encode_text({"clip_text": t2})
    gt = torch.tensor([6, 7, 8, 3, 4, 5])
    ref2 = leaky_reference_similarity(m, te2, ve, gt)
    assert torch.allclose(ref2, brute_force(m, t2, frames, keep, gt=gt.tolist()), atol=1e-5)
    assert torch.allclose(m.similarity(te2, ve), brute_force(m, t2, frames, keep), atol=1e-5)


def test_chunked_similarity_agrees_and_ignores_the_global_rng():
    m = _model(trials=5)
    t, frames, mask = _inputs(265, 7)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    sim = m.similarity(te, ve)
    for chunk, pairs, block in ((1, 1024, 512), (7, 50, 3), (300, 100000, 1), (16, 16, 512)):
        m.config.eval_pairs_per_chunk, m.config.eval_video_block = pairs, block
        torch.rand(5)  # global RNG state must not matter
        assert torch.allclose(m.similarity(te, ve, chunk=chunk), sim, atol=1e-6), (chunk, pairs, block)
    assert not torch.allclose(m.similarity(te, ve, seed=1), sim)  # the seed does
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.similarity(te, ve, generator=g), m.similarity(te, ve, generator=torch.Generator().manual_seed(0)))


def test_scores_follow_the_ids_not_the_positions():
    """Noise keyed by caption/item ids: reordering or subsetting the evaluation set moves scores with their pairs."""
    m = _model(trials=6)
    t, frames, mask = _inputs(9, 6)
    tk, vk = torch.arange(100, 109) * 7919, torch.arange(6) * -104729
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    sim = m.similarity(te, ve, text_keys=tk, video_keys=vk)
    assert torch.allclose(sim, brute_force(m, t, frames, ve["frames_mask"], tkeys=tk, vkeys=vk), atol=1e-5)
    pt, pv = torch.tensor([4, 0, 8, 2]), torch.tensor([5, 1, 3])
    sub = m.similarity(m.encode_text({"clip_text": t[pt]}), m.encode_video({"clip": frames[pv], "clip_mask": mask[pv]}),
                       text_keys=tk[pt], video_keys=vk[pv])
    assert torch.allclose(sub, sim[pt][:, pv], atol=1e-6)


def test_score_is_the_best_trial():
    """s(t, v) is attained by one trial and no trial scores higher (the sample closest to pool(v|t) is used)."""
    m = _model(trials=10)
    t, frames, mask = _inputs(5, 4)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    sim = m.similarity(te, ve)
    eps = m.eval_noise(torch.arange(5), torch.arange(4), 0)  # (Nt, Nv, K, D)
    keep = ve["frames_mask"]
    with torch.no_grad():
        p = m.pool(t, frames, keep).transpose(0, 1)  # (Nt, Nv, D)
        r = m.radius(m.frame_cosines(t, frames, keep)).transpose(0, 1)
        singles = torch.stack([F.cosine_similarity(t[:, None] + eps[:, :, k] * r, p, dim=-1)
                               for k in range(10)])
    assert (sim >= singles - 1e-5).all()
    assert ((sim - singles).abs() < 1e-5).any(dim=0).all()
