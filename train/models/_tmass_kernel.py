"""numba build of the T-MASS trial kernel (see `tmass_noise`); imported on first use, never at package import.

Importing numba and loading this kernel from numba's on-disk cache costs ~0.5 s of CPU (numba's registries, scipy's
BLAS probe), which MEE / X-Pool runs and a T-MASS run's training steps never need. `cache=True` keeps the compiled
code next to this file (`__pycache__`) or, where that is read-only, in numba's per-user cache (NUMBA_CACHE_DIR).
"""
from __future__ import annotations

import numba

from train.models.tmass_noise import C_TRIAL, COS_EPS, GOLDEN

if numba.config.THREADING_LAYER == "default":
    # OpenMP workers of numba and of torch spin-wait against each other between the many short kernel calls of
    # a chunked evaluation (seconds lost on 2 cores); numba's own work queue does not spin
    numba.config.THREADING_LAYER = "workqueue"

VERSION = numba.__version__


@numba.njit(inline="always")
def _h(x):  # lowbias32 in uint32 arithmetic (wraps mod 2^32)
    x = numba.uint32(x ^ (x >> numba.uint32(16)))
    x = numba.uint32(x * numba.uint32(0x21F0AAAD))
    x = numba.uint32(x ^ (x >> numba.uint32(15)))
    x = numba.uint32(x * numba.uint32(0x735A2D97))
    return numba.uint32(x ^ (x >> numba.uint32(15)))


@numba.njit(parallel=True, fastmath={"reassoc", "contract", "nsz", "arcp"}, cache=True)
def fused(states, u, w, r2, tp, tt, pn, trials, normal, std, table, out):  # pragma: no cover - compiled
    """out[i] = max over trials k of cos(t + eps_k R, p) for pair i, the noise made in registers."""
    n, dim = u.shape
    for i in numba.prange(n):
        best = -3.0e38
        for k in range(trials):
            sk = _h(numba.uint32(states[i] ^ numba.uint32((k + 1) * C_TRIAL)))
            a1 = numba.float32(0.0)
            a2 = numba.float32(0.0)
            a3 = numba.float32(0.0)
            for d in range(dim):
                x = _h(numba.uint32(sk + numba.uint32(d) * numba.uint32(GOLDEN)))
                if normal:
                    e = table[x >> numba.uint32(16)] * numba.float32(std)
                else:
                    e = numba.float32(x >> numba.uint32(8)) * numba.float32(2.0**-24)
                a1 += e * u[i, d]
                a2 += e * w[i, d]
                a3 += e * e * r2[i, d]
            norm2 = max(tt[i] + numba.float32(2.0) * a2 + a3, numba.float32(0.0))
            c = (tp[i] + a1) / (max(numba.float32(norm2**0.5), numba.float32(COS_EPS)) * pn[i])
            best = max(best, c)
        out[i] = best
