"""Tests of train/metrics.py against a brute-force ranking (ties, several captions per video, both directions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.metrics import multiple_choice_accuracy, retrieval_metrics, t2v_ranks, v2t_ranks


def brute_t2v(sim: np.ndarray, gt: np.ndarray) -> list[int]:
    """Sort the videos of each caption by score, a tie placing the ground truth after the others (pessimistic)."""
    ranks = []
    for q in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda v: (-sim[q, v], v == gt[q]))
        ranks.append(order.index(gt[q]) + 1)
    return ranks


def brute_v2t(sim: np.ndarray, gt: np.ndarray) -> list[int]:
    """Per video with captions: position of its first ground-truth caption in the pessimistic caption order."""
    ranks = []
    for v in sorted(set(gt.tolist())):
        order = sorted(range(sim.shape[0]), key=lambda c: (-sim[c, v], gt[c] == v))
        ranks.append(next(i for i, c in enumerate(order) if gt[c] == v) + 1)
    return ranks


def summary(ranks: list[int]) -> dict[str, float]:
    r = np.asarray(ranks, dtype=float)
    out = {f"R@{k}": 100.0 * float(np.mean(r <= k)) for k in (1, 5, 10, 50)}
    out.update(MdR=float(np.median(r)), MnR=float(r.mean()))
    return out


def _case(seed: int, n_videos: int, levels: int):
    """Random integer scores (many ties), 1-4 captions per video, some videos without captions."""
    rng = np.random.default_rng(seed)
    per = rng.integers(0, 5, n_videos)  # 0 captions for some videos: not v2t queries
    per[0] = max(per[0], 1)
    gt = np.repeat(np.arange(n_videos), per)
    rng.shuffle(gt)
    sim = rng.integers(0, levels, (len(gt), n_videos)).astype(np.float32)
    return sim, gt


@pytest.mark.parametrize("seed, n_videos, levels", [(0, 7, 3), (1, 60, 4), (2, 60, 1000), (3, 12, 1)])
def test_metrics_match_brute_force(seed, n_videos, levels):
    sim, gt = _case(seed, n_videos, levels)
    s, q = torch.from_numpy(sim), torch.from_numpy(gt)
    assert t2v_ranks(s, q).tolist() == brute_t2v(sim, gt)
    assert v2t_ranks(s, q).tolist() == brute_v2t(sim, gt)
    m = retrieval_metrics(s, q)
    for direction, ranks in (("t2v", brute_t2v(sim, gt)), ("v2t", brute_v2t(sim, gt))):
        expected = summary(ranks)
        assert m[direction].keys() == expected.keys()
        for k, v in expected.items():
            assert m[direction][k] == pytest.approx(v, abs=1e-9), (direction, k)
    # block size does not change anything
    assert retrieval_metrics(s, q, chunk=1) == m
    assert retrieval_metrics(s, q, chunk=5) == m


def test_constant_scores_get_the_worst_rank():
    sim = torch.zeros(4, 4)
    m = retrieval_metrics(sim, torch.arange(4))
    assert m["t2v"]["R@1"] == 0.0 and m["t2v"]["MdR"] == 4.0  # not R@1 = 100 as "first index wins" would give
    assert m["v2t"]["MnR"] == 4.0


def test_perfect_scores_and_percent_units():
    sim = torch.eye(5) + 0.01 * torch.arange(5.0)  # distinct off-diagonal values, diagonal best
    m = retrieval_metrics(sim, torch.arange(5))
    assert m["t2v"]["R@1"] == 100.0 and m["v2t"]["R@1"] == 100.0 and m["t2v"]["MdR"] == 1.0


def test_v2t_uses_the_best_ranked_caption():
    # video 0 has captions 0 and 1; caption 1 ranks first for video 0, caption 0 last
    sim = torch.tensor([[0.0, 0.5], [0.9, 0.1], [0.5, 0.8]])
    assert v2t_ranks(sim, torch.tensor([0, 0, 1])).tolist() == [1, 1]
    assert t2v_ranks(sim, torch.tensor([0, 0, 1])).tolist() == [2, 1, 1]


def test_bad_inputs():
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="entries"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0]))
    with pytest.raises(ValueError, match="0..1"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))


def test_multiple_choice_accuracy():
    scores = torch.tensor([
        [0.1, 0.9, 0.2, 0.0, 0.3],  # answer 1: correct
        [0.5, 0.5, 0.1, 0.0, 0.0],  # answer 0 tied with option 1: a tie counts as wrong
        [0.0, 0.1, 0.2, 0.3, 0.4],  # answer 2: wrong
        [0.0, 0.1, 0.2, 0.3, 0.4],  # answer 4: correct
    ])
    assert multiple_choice_accuracy(scores, torch.tensor([1, 0, 2, 4])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.random((50, 5)))
    a = torch.from_numpy(rng.integers(0, 5, 50))
    brute = np.mean([int(np.argmax(s[i].numpy()) == a[i]) for i in range(50)])  # continuous scores: no ties
    assert multiple_choice_accuracy(s, a) == pytest.approx(brute)
    with pytest.raises(ValueError):
        multiple_choice_accuracy(torch.zeros(3, 5), torch.zeros(2, dtype=torch.long))
