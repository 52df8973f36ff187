"""Tests of train/losses.py against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from train.losses import max_margin_ranking_loss, symmetric_cross_entropy

S2 = torch.tensor([[0.5, 0.4], [0.05, 0.3]])  # rows texts, columns videos; text i pairs with video i


def test_max_margin_hand_value():
    # t2v hinges [i, j] = max(0, .2 - s_ii + s_ij): [[.2, .1], [0 (-.05), .2]]
    # v2t hinges [i, j] = max(0, .2 - s_ii + s_ji): [[.2, 0 (-.25)], [.3, .2]]
    # L = (sum of all eight) / (2 n^2) = 1.2 / 8
    assert max_margin_ranking_loss(S2, 0.2).item() == pytest.approx(0.15, abs=1e-7)
    # without the j = i terms: (.1 + .3) / 8
    assert max_margin_ranking_loss(S2, 0.2, exclude_diagonal=True).item() == pytest.approx(0.05, abs=1e-7)


def test_max_margin_separated_batch_is_margin_over_n():
    # the reference's j = i terms add margin / n even when every negative is beaten by more than the margin
    sim = 2 * torch.eye(4) - 1
    assert max_margin_ranking_loss(sim, 0.2).item() == pytest.approx(0.05, abs=1e-7)
    assert max_margin_ranking_loss(sim, 0.2, exclude_diagonal=True).item() == 0.0


def test_max_margin_gradient_same_with_and_without_diagonal():
    a = S2.clone().requires_grad_(True)
    b = S2.clone().requires_grad_(True)
    max_margin_ranking_loss(a, 0.2).backward()
    max_margin_ranking_loss(b, 0.2, exclude_diagonal=True).backward()
    assert torch.allclose(a.grad, b.grad)
    # hand gradient (1/8 per active hinge): s_01 is in t2v[0, 1] and v2t[1, 0], both active; s_10 in none;
    # s_00 enters t2v[0, 1] negatively, s_11 enters v2t[1, 0] negatively (the j = i hinges are constant)
    expected = torch.tensor([[-1 / 8, 2 / 8], [0.0, -1 / 8]])
    assert torch.allclose(a.grad, expected)


def test_max_margin_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        max_margin_ranking_loss(torch.zeros(2, 3))


def test_symmetric_cross_entropy_hand_value():
    tau = math.log(10.0)  # scale exp(tau) = 10
    logits = 10 * S2
    rows = [-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(2)]
    cols = [-(logits[i, i] - torch.logsumexp(logits[:, i], 0)) for i in range(2)]
    expected = 0.5 * (sum(rows) / 2 + sum(cols) / 2)
    got = symmetric_cross_entropy(S2, torch.tensor(tau))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert symmetric_cross_entropy(S2, tau).item() == pytest.approx(expected.item(), rel=1e-6)
