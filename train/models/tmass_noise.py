"""T-MASS evaluation noise drawn per (text, video, trial) from a counter-based generator, and the trial kernel.

eps(t, v, k)_d is a pure function of (seed, key(t), key(v), k, d). Keys are 64-bit hashes of the caption and item
ids (`train.data.id_keys`; row positions when none are given), so a pair's noise is the same in any chunking, any
evaluation set and any process, and, unlike noise drawn once per text, it is independent across the candidate
videos of a text (the reference redraws it per video), so v2t ranks are not all shifted by one shared draw.

Generator (all uint32): h(x) is the "lowbias32" finaliser (x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15;
x *= 0x735A2D97; x ^= x >> 15). State per text s_t = h(h(h(seed ^ C_t) ^ lo(key)) ^ hi(key)), per video s_v the
same with C_v, per pair s = h(s_t ^ h(s_v + C_p)), per trial s_k = h(s ^ (k + 1) * C_k), and element d is
x = h(s_k + d * 0x9E3779B9) (a SplitMix-style counter: a Weyl sequence through a bijective mixer). uniform01 takes
the top 24 bits, eps = (x >> 8) / 2^24 in [0, 1); normal maps the top 16 bits through the inverse normal CDF at the
bin centres (inverse-transform sampling; |eps| <= 4.3 std).

Kernel: per pair, with u = R * p, w = R * t and R^2 (D-vectors) and the scalars t.p, |t|^2, |p|,
    cos_k = (t.p + eps_k . u) / (sqrt(|t|^2 + 2 eps_k . w + eps_k^2 . R^2) |p|),  score = max_k cos_k.
With numba installed the noise is generated inside one fused loop (never stored; `_tmass_kernel`, imported on
first use); without it the same numbers come from torch ops on (pairs, trials, D) blocks, which is correct but much
slower (tests, small sets).
"""
from __future__ import annotations

from typing import Callable

import torch

M32 = 0xFFFFFFFF
C_TEXT, C_VIDEO, C_PAIR, C_TRIAL, GOLDEN = 0x68E31DA4, 0xB5297A4D, 0x1B56C4E9, 0x85EBCA6B, 0x9E3779B9
COS_EPS = 1e-8
PAIRS_PER_BLOCK = 64  # torch path on CPU: pairs whose (trials, D) noise is held at once (~2.6 MB at K=20, D=512)
PAIRS_PER_BLOCK_GPU = 2048  # on a GPU: ~84 MB of noise per block, few kernel launches
_NORMAL: torch.Tensor | None = None


def normal_table() -> torch.Tensor:
    """(65536,) float32 standard-normal quantiles at the centres of 2^16 equal-probability bins."""
    global _NORMAL
    if _NORMAL is None:
        p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
        _NORMAL = torch.special.ndtri(p).float()
    return _NORMAL


def mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64 (multipliers < 2^31, so products never overflow int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def key_states(keys: torch.Tensor, seed: int, salt: int) -> torch.Tensor:
    """(n,) int64 uint32 states of int64 id keys for one seed and side (salt C_TEXT or C_VIDEO)."""
    keys = keys.to(torch.int64)
    lo, hi = keys & M32, (keys >> 32) & M32
    s = mix(torch.full_like(keys, (int(seed) ^ salt) & M32))
    return mix(mix(s ^ lo) ^ hi)


def pair_states(text_states: torch.Tensor, video_states: torch.Tensor) -> torch.Tensor:
    """(Nt, Nv) int64 uint32 state of every (text, video) pair."""
    return mix(text_states[:, None] ^ mix((video_states[None, :] + C_PAIR) & M32))


def pair_noise(states: torch.Tensor, trials: int, dim: int, prior: str = "uniform01", std: float = 1.0) -> torch.Tensor:
    """(*states.shape, trials, dim) float32 noise of the given pair states (the reference for the fused kernel)."""
    k = torch.arange(1, trials + 1, dtype=torch.int64, device=states.device)
    sk = mix(states[..., None] ^ ((k * C_TRIAL) & M32))
    x = mix((sk[..., None] + torch.arange(dim, dtype=torch.int64, device=states.device) * GOLDEN) & M32)
    if prior == "uniform01":
        return (x >> 8).to(torch.float32) * 2.0**-24
    return normal_table().to(states.device)[x >> 16] * float(std)


def trial_max(states: torch.Tensor, u: torch.Tensor, w: torch.Tensor, r2: torch.Tensor, tp: torch.Tensor,
              tt: torch.Tensor, pn: torch.Tensor, trials: int, prior: str, std: float) -> torch.Tensor:
    """(P,) max over trials of cos(t + eps_k R, p) for P pairs: states (P,), u/w/r2 (P, D), tp/tt/pn (P,)."""
    fused = fused_kernel() if u.device.type == "cpu" else None
    if fused is not None:
        out = torch.empty(u.shape[0], dtype=torch.float32)
        table = normal_table().numpy() if prior == "normal" else _EMPTY
        fused(states.numpy().astype("uint32"), u.float().contiguous().numpy(), w.float().contiguous().numpy(),
              r2.float().contiguous().numpy(), tp.float().numpy(), tt.float().numpy(), pn.float().numpy(),
              int(trials), prior == "normal", float(std), table, out.numpy())
        return out.to(u.dtype)
    return _trial_max_torch(states, u, w, r2, tp, tt, pn, trials, prior, std)


def _trial_max_torch(states: torch.Tensor, u: torch.Tensor, w: torch.Tensor, r2: torch.Tensor, tp: torch.Tensor,
                     tt: torch.Tensor, pn: torch.Tensor, trials: int, prior: str, std: float) -> torch.Tensor:
    """torch version of the kernel, PAIRS_PER_BLOCK pairs at a time (noise (P, K, D) materialised per block)."""
    out = torch.empty(u.shape[0], dtype=u.dtype, device=u.device)
    block = PAIRS_PER_BLOCK if u.device.type == "cpu" else PAIRS_PER_BLOCK_GPU
    states = states.to(u.device)
    for p0 in range(0, u.shape[0], block):
        p1 = min(u.shape[0], p0 + block)
        eps = pair_noise(states[p0:p1], trials, u.shape[1], prior, std).to(u.dtype)  # (P, K, D)
        lin = torch.bmm(eps, torch.stack([u[p0:p1], w[p0:p1]], dim=2))  # (P, K, 2): eps.u, eps.w
        quad = torch.bmm(eps.square(), r2[p0:p1, :, None])[..., 0]  # eps^2 . R^2
        num = tp[p0:p1, None] + lin[..., 0]
        norm2 = (tt[p0:p1, None] + 2.0 * lin[..., 1] + quad).clamp(min=0.0)
        out[p0:p1] = (num / (norm2.sqrt().clamp(min=COS_EPS) * pn[p0:p1, None])).amax(dim=1)
    return out


_EMPTY = torch.zeros(1, dtype=torch.float32).numpy()
_KERNEL: list[Callable[..., None] | None] = []  # the numba kernel once looked up (None: numba not installed)


def fused_kernel() -> Callable[..., None] | None:
    """The numba trial kernel (imported and loaded from numba's cache on first use), or None without numba."""
    if not _KERNEL:
        try:  # optional accelerator; the torch path computes the same scores
            from train.models._tmass_kernel import fused
        except ImportError:  # pragma: no cover - depends on the environment
            fused = None
        _KERNEL.append(fused)
    return _KERNEL[0]


def kernel_name() -> str:
    """Which trial kernel runs on CPU: 'numba X.Y' or 'torch (numba not installed)'."""
    if fused_kernel() is None:
        return "torch (numba not installed)"
    from train.models._tmass_kernel import VERSION

    return f"numba {VERSION}"
