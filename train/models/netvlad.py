"""NetVLAD aggregation (MEE's loupe.py form) with optional masking of padded steps, and a masked BatchNorm helper."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def batch_norm_rows(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """Apply `bn` to (N, C) rows; with fewer than 2 rows in train mode use the running statistics (BN cannot)."""
    if x.shape[0] == 0:
        return x
    training = bn.training and x.shape[0] > 1
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
        training=training, momentum=bn.momentum if bn.momentum is not None else 0.0, eps=bn.eps,
    )


class NetVLAD(nn.Module):
    """NetVLAD over (B, N, D) with K clusters -> (B, D*K), intra- then globally L2-normalised.

    a_ik = softmax_k(BN(x_i . W)_k);  V[d, k] = sum_i a_ik x_id - (sum_i a_ik) c_dk;  flattened index d*K + k.
    With `mask_padding` (tvr default) steps with mask False get no assignment and stay out of the BatchNorm
    statistics, so padding never changes the descriptor. `mask_padding=False` reproduces the reference, where a
    zero padded step still receives a soft assignment and contributes -a_ik c_k.
    """

    def __init__(self, dim: int, clusters: int, *, mask_padding: bool = True) -> None:
        super().__init__()
        self.dim, self.clusters, self.mask_padding = dim, clusters, mask_padding
        self.assign = nn.Parameter(torch.randn(dim, clusters) / math.sqrt(dim))  # assignment weights, no bias
        self.centres = nn.Parameter(torch.randn(1, dim, clusters) / math.sqrt(dim))
        self.bn = nn.BatchNorm1d(clusters)

    @property
    def out_dim(self) -> int:
        """Descriptor width D*K."""
        return self.dim * self.clusters

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) features and optional (B, N) bool mask -> (B, D*K) descriptors."""
        b, n, d = x.shape
        if d != self.dim:
            raise ValueError(f"NetVLAD: expected feature width {self.dim}, got {d}")
        flat = x.reshape(b * n, d)
        if self.mask_padding and mask is not None:
            keep = mask.reshape(b * n).bool()
            logits = torch.zeros(b * n, self.clusters, dtype=x.dtype, device=x.device)
            logits_valid = batch_norm_rows(self.bn, flat[keep] @ self.assign)
            a = torch.zeros_like(logits)
            a[keep] = torch.softmax(logits_valid, dim=1)
        else:
            a = torch.softmax(batch_norm_rows(self.bn, flat @ self.assign), dim=1)
        a = a.view(b, n, self.clusters)
        vlad = torch.einsum("bnk,bnd->bdk", a, x) - a.sum(dim=1)[:, None, :] * self.centres
        vlad = F.normalize(vlad, dim=1)  # intra-normalisation over D for each cluster
        return F.normalize(vlad.reshape(b, d * self.clusters), dim=1)
