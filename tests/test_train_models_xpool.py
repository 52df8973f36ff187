"""Tests of train/models/xpool.py: reference pooling, identity init, the pair-free evaluation algebra, chunking."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.models import create_model
from train.models._api import ModelConfigError
from train.models.xpool import XPoolHead

D, NF = 16, 5


def _perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Move every parameter off its (identity / LayerNorm) init so no layer is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _inputs(nt: int = 7, nv: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(nt, D, generator=g) * 3
    frames = torch.randn(nv, NF, D, generator=g) * 3
    mask = torch.rand(nv, NF, generator=g) > 0.3
    mask[0] = False  # a video without a valid frame: treated as all valid
    return t, frames, mask


def hand_pool(head: XPoolHead, t: torch.Tensor, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """pool(v|t) for one text (D,) and one video (F, D) from the module docstring equations (1 head)."""
    t_hat, v_hat = head.ln1(t), head.ln1(frames)
    q, k, u = head.q_proj(t_hat), head.k_proj(v_hat), head.v_proj(v_hat)
    logits = (k @ q) / math.sqrt(D)
    logits = logits.masked_fill(~keep, float("-inf"))
    alpha = torch.softmax(logits, 0)
    o = head.ln2(head.out_proj((alpha[:, None] * u).sum(0)))
    return head.ln3(o + head.linear_proj(o))


def test_identity_init_and_defaults():
    m = create_model("xpool", feature_dims={"clip": D, "clip_text": D}, num_frames=NF)
    for lin in (m.pool.q_proj, m.pool.k_proj, m.pool.v_proj, m.pool.out_proj, m.pool.linear_proj):
        assert torch.equal(lin.weight, torch.eye(D)) and torch.equal(lin.bias, torch.zeros(D))
    assert m.pool.dropout.p == 0.3 and m.pool.heads == 1
    assert m.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        m.logit_scale.fill_(7.0)
    m.clamp_logit_scale()
    assert m.logit_scale.item() == pytest.approx(math.log(100))
    groups = m.param_groups(1e-5)
    assert groups[1]["params"] == [m.logit_scale] and groups[1]["lr"] == 1e-6 and groups[0]["lr"] == 1e-5


def test_forward_matches_hand_equations():
    m = create_model("xpool", feature_dims={"clip": D, "clip_text": D}, num_frames=NF).eval()
    _perturb(m)
    t, frames, mask = _inputs()
    keep = m.encode_video({"clip": frames, "clip_mask": mask})["frames_mask"]
    assert keep[0].all() and torch.equal(keep[1:], mask[1:])
    with torch.no_grad():
        out = m.pool(t, frames, keep)  # (Nv, Nt, D)
        for v in range(frames.shape[0]):
            for i in range(t.shape[0]):
                assert torch.allclose(out[v, i], hand_pool(m.pool, t[i], frames[v], keep[v]), atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_pool_fast_equals_forward_in_eval_mode(heads):
    head = XPoolHead(D, heads, dropout=0.3).eval()
    _perturb(head, seed=heads)
    t, frames, mask = _inputs()
    keep = mask | ~mask.any(1, keepdim=True)
    with torch.no_grad():
        ref = head(t, frames, keep)
        cache = head.video_cache(frames, keep)
        q = head.text_queries(t)
        fast = head.pool_fast(q, cache)
        at = head.mix_weights(q, cache)
        assert torch.allclose(fast, ref, atol=1e-5)
        assert torch.allclose(head.pool_dot(at, cache, t), (ref * t[None]).sum(-1).t(), atol=1e-4)
        assert torch.allclose(head.pool_norm(at, cache), ref.norm(dim=-1).t(), atol=1e-4)
    head.train()  # dropout active: forward is stochastic, unlike the eval fast path
    torch.manual_seed(0)
    a = head(t, frames, keep)
    b = head(t, frames, keep)
    assert not torch.allclose(a, b)


def test_masked_frames_do_not_change_the_pooling():
    head = XPoolHead(D).eval()
    _perturb(head)
    t, frames, mask = _inputs()
    keep = mask | ~mask.any(1, keepdim=True)
    base = head(t, frames, keep)
    frames2 = torch.where(keep[..., None], frames, torch.randn_like(frames) * 100)
    assert torch.allclose(head(t, frames2, keep), base, atol=1e-5)


def test_similarity_is_cos_t_pool_and_chunk_independent():
    m = create_model("xpool", feature_dims={"clip": D, "clip_text": D}, num_frames=NF).eval()
    _perturb(m)
    t, frames, mask = _inputs(nt=11, nv=9)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    with torch.no_grad():
        brute = F.cosine_similarity(t[None], m.pool(t, frames, ve["frames_mask"]), dim=-1).t()
    sim = m.similarity(te, ve)
    assert sim.shape == (11, 9) and torch.allclose(sim, brute, atol=1e-5)
    for chunk, pairs, block in ((1, 1024, 512), (3, 7, 512), (256, 5, 2), (4, 1, 1), (1, 1024, 4)):
        m.config.eval_pairs_per_chunk, m.config.eval_video_block = pairs, block
        assert torch.allclose(m.similarity(te, ve, chunk=chunk), sim, atol=1e-6), (chunk, pairs, block)


def test_loss_and_build_errors():
    m = create_model("xpool", feature_dims={"clip": D, "clip_text": D}, num_frames=NF)
    t, frames, mask = _inputs(nt=4, nv=4)
    loss, parts = m.loss(m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask}))
    assert torch.isfinite(loss) and parts["loss_xpool"] == pytest.approx(loss.item())
    with pytest.raises(ModelConfigError, match="clip_text"):
        create_model("xpool", feature_dims={"clip": D})
    with pytest.raises(ModelConfigError, match="dim"):
        create_model("xpool", feature_dims={"clip": D, "clip_text": D + 1})
    with pytest.raises(ModelConfigError, match="divisible"):
        create_model("xpool", feature_dims={"clip": D, "clip_text": D}, num_heads=3)
    with pytest.raises(ValueError, match="num_frames"):
        m.encode_video({"clip": torch.zeros(2, NF + 1, D)})


@pytest.mark.parametrize("heads", [1, 2])
def test_pool_train_equals_forward_with_dropout_and_gradients(heads):
    """The training fast path (no per-pair D x D product) is forward(), same dropout draws, same gradients."""
    head = XPoolHead(D, heads, dropout=0.3)
    _perturb(head, seed=3 + heads)
    t, frames, mask = _inputs()
    keep = mask | ~mask.any(1, keepdim=True)
    for train in (False, True):
        head.train(train)
        grads = []
        for fn in (head.forward, head.pool_train):
            head.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            out = fn(t, frames, keep)
            (out * torch.linspace(-1, 1, D)).sum().backward()
            grads.append((out.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}))
        (ref, g_ref), (fast, g_fast) = grads
        assert torch.allclose(fast, ref, atol=1e-5)
        for n in g_ref:
            assert torch.allclose(g_fast[n], g_ref[n], atol=1e-4, rtol=1e-4), n


def test_xpool_loss_is_symmetric_ce_of_cos_t_forward_pool_in_train_mode():
    m = create_model("xpool", feature_dims={"clip": D, "clip_text": D}, num_frames=NF)
    _perturb(m)
    t, frames, mask = _inputs(nt=5, nv=5)
    te, ve = m.encode_text({"clip_text": t}), m.encode_video({"clip": frames, "clip_mask": mask})
    torch.manual_seed(2)
    loss, _ = m.loss(te, ve)
    torch.manual_seed(2)
    pooled = m.pool(t, frames, ve["frames_mask"])  # same dropout draws
    sim = F.cosine_similarity(t[None], pooled, dim=-1).t()
    from train.losses import symmetric_cross_entropy

    assert loss.item() == pytest.approx(symmetric_cross_entropy(sim, m.logit_scale).item(), rel=1e-5)


def test_bits_dropout_is_a_dropout_of_rate_p():
    """Kept fraction 1 - p (statistically), kept values x / (1 - p), gradient through the same mask, eval identity."""
    from train.models.xpool import BitsDropout

    drop = BitsDropout(0.3)
    x = torch.randn(64, 33, 17, requires_grad=True)  # odd element count: half of a 64-bit draw is left over
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - 0.7) < 4 * math.sqrt(0.21 / n)
    assert torch.allclose(y[kept], x[kept] / 0.7)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.7)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the global generator drives it (reproducible runs)
    per_row = kept.flatten(1).float().mean(1)  # no structure: rows keep about the same fraction
    assert per_row.std().item() < 0.05
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(BitsDropout(1.0)(x), torch.zeros_like(x)) and torch.equal(BitsDropout(0.0)(x), x)
