"""Tests of train/models/netvlad.py: the NetVLAD formula and padding masking (tvr) vs the reference behaviour."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.models.netvlad import NetVLAD, batch_norm_rows

D, K = 5, 3


def _vlad(mask_padding: bool = True, seed: int = 0) -> NetVLAD:
    torch.manual_seed(seed)
    v = NetVLAD(D, K, mask_padding=mask_padding)
    with torch.no_grad():  # non-trivial BatchNorm state so eval mode is not the identity
        v.bn.running_mean.copy_(torch.randn(K) * 0.3)
        v.bn.running_var.copy_(torch.rand(K) + 0.5)
        v.bn.weight.copy_(torch.rand(K) + 0.5)
        v.bn.bias.copy_(torch.randn(K) * 0.1)
    return v


def hand_netvlad(v: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """Loop form of the reference NetVLAD on one (N, D) item (eval-mode BatchNorm)."""
    bn = v.bn
    logits = x @ v.assign
    logits = (logits - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    a = torch.softmax(logits, dim=1)  # (N, K)
    vlad = torch.zeros(D, K)
    for k in range(K):
        for i in range(x.shape[0]):
            vlad[:, k] += a[i, k] * (x[i] - v.centres[0, :, k])
        vlad[:, k] = vlad[:, k] / vlad[:, k].norm()  # intra-normalisation per cluster
    flat = torch.stack([vlad[d, k] for d in range(D) for k in range(K)])  # index d * K + k
    return flat / flat.norm()


def test_formula_eval_mode():
    v = _vlad().eval()
    x = torch.randn(2, 4, D)
    out = v(x)
    assert out.shape == (2, D * K) and v.out_dim == D * K
    for b in range(2):
        assert torch.allclose(out[b], hand_netvlad(v, x[b]), atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("train", [False, True])
def test_masked_descriptor_independent_of_padding(train):
    v = _vlad()
    v.train(train)
    x = torch.randn(3, 4, D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    x = x * mask[..., None]  # zero padding, as the store delivers it
    base = v(x, mask)
    # longer zero padding, and padded steps holding garbage: same descriptors
    longer = torch.cat([x, torch.zeros(3, 5, D)], 1)
    longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    garbage = torch.where(longer_mask[..., None], longer, torch.randn_like(longer) * 10)
    assert torch.allclose(v(longer, longer_mask), base, atol=1e-6)
    assert torch.allclose(v(garbage, longer_mask), base, atol=1e-6)
    if not train:  # eval mode: item 1 equals the item cropped to its valid steps
        assert torch.allclose(base[1], v(x[1:2, :2])[0], atol=1e-6)


def test_reference_option_lets_padding_change_the_descriptor():
    v = _vlad(mask_padding=False).eval()
    x = torch.randn(1, 2, D)
    padded = torch.cat([x, torch.zeros(1, 3, D)], 1)
    mask = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    ref = v(padded, mask)  # the mask is ignored: zero steps get soft assignments and add -a_ik c_k
    assert not torch.allclose(ref, v(x), atol=1e-4)
    assert torch.allclose(ref[0], hand_netvlad(v, padded[0]), atol=1e-6)
    masked = _vlad(mask_padding=True).eval()
    assert torch.allclose(masked(padded, mask), masked(x), atol=1e-6)


def test_rows_without_valid_step_give_zero_and_no_nan():
    v = _vlad().train()
    x = torch.randn(2, 3, D)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    out = v(x, mask)
    assert torch.isfinite(out).all() and out[1].abs().sum() == 0


def test_batch_norm_rows_single_row_uses_running_stats():
    bn = torch.nn.BatchNorm1d(3).train()
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
    x = torch.randn(1, 3)
    assert torch.allclose(batch_norm_rows(bn, x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                               bn.bias, training=False, eps=bn.eps))
    assert batch_norm_rows(bn, torch.zeros(0, 3)).shape == (0, 3)


def test_wrong_width_raises():
    with pytest.raises(ValueError, match="width 5"):
        _vlad()(torch.randn(1, 2, 4))
