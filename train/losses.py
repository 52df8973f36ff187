"""Training losses: MEE's bidirectional max-margin ranking loss and the symmetric (InfoNCE) cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def max_margin_ranking_loss(sim: torch.Tensor, margin: float = 0.2, *, exclude_diagonal: bool = False) -> torch.Tensor:
    """Bidirectional max-margin ranking loss on a square (n, n) score matrix, text i paired with video i.

    Reference form (MEE loss.py, paper eq. 7), rows are texts:
        L = 1/(2 n^2) * sum_{i,j} [ max(0, margin - s_ii + s_ij) + max(0, margin - s_ii + s_ji) ]
    The first term ranks videos for text i (t2v), the second texts for video i (v2t). The j = i terms are kept as
    in the reference, so L contains the constant margin / n. With `exclude_diagonal=True` the j = i terms are
    dropped under the same 1/(2 n^2) normaliser, i.e. L - margin / n (identical gradients). The paper's eq. 7
    writes 1/B * sum_i sum_{j != i}, a constant factor 2n larger, which Adam's updates are invariant to.
    """
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"max_margin_ranking_loss: need a square (n, n) score matrix, got {tuple(sim.shape)}")
    n = sim.shape[0]
    pos = sim.diagonal()
    t2v = F.relu(margin - pos[:, None] + sim)  # [i, j]: text i against video j
    v2t = F.relu(margin - pos[:, None] + sim.t())  # [i, j]: video i against text j
    terms = t2v + v2t
    if exclude_diagonal:
        terms = terms.masked_fill(torch.eye(n, dtype=torch.bool, device=sim.device), 0.0)
    return terms.sum() / (2 * n * n)


def symmetric_cross_entropy(sim: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """0.5 * [CE over rows + CE over columns] of exp(logit_scale) * sim with targets on the diagonal (CLIP loss)."""
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"symmetric_cross_entropy: need a square (n, n) score matrix, got {tuple(sim.shape)}")
    scale = logit_scale.exp() if isinstance(logit_scale, torch.Tensor) else torch.tensor(float(logit_scale)).exp()
    logits = scale * sim
    target = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
