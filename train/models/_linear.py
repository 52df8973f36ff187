"""`linear(x, weight, bias)`: F.linear, with its three CPU float32 GEMMs run by oneDNN instead of MKL.

Why: torch runs float32 `addmm`/`mm` on CPU through MKL, which takes its AVX2 kernels on non-Intel x86 CPUs;
oneDNN picks its kernels from the CPU's ISA flags (AVX-512 on AMD Zen 4/5) and ran MEE's GEMMs 2-3x faster
on the 2-core benchmark machine. Same float32 math and accumulation (no reduced precision); results differ
from MKL's only by summation order (tests/test_train_models_linear.py checks values and gradients).
Anything else (CUDA, float64/16, inputs of other than 2 dims, a torch built without oneDNN) uses F.linear.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# oneDNN inner product: y = x @ w.T + b on dense tensors (any strides); the op Inductor lowers CPU linears to
_POINTWISE_NONE = ("none", [], "")


@functools.cache
def onednn_available() -> bool:
    """True when this torch has the oneDNN dense linear op on CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


def _inner(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, I) @ w (O, I).T + b by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, *_POINTWISE_NONE)


class _OneDnnLinear(torch.autograd.Function):
    """F.linear whose forward, input gradient and weight gradient are all oneDNN inner products."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """(N, I) x (O, I) weight -> (N, O)."""
        ctx.save_for_backward(x, weight)
        return _inner(x, weight, bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Only the gradients autograd asks for (e.g. none for a GEU's input features)."""
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = _inner(grad, weight.t()) if need_x else None  # (N, O) @ (O, I); the transposed view is not copied
        gw = _inner(grad.t(), x.t()) if need_w else None  # (O, N) @ (N, I)
        gb = grad.sum(0) if need_b else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-d x; oneDNN GEMMs for CPU float32 when available."""
    fast = (x.ndim == 2 and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and x.shape[0] > 0 and onednn_available())
    return _OneDnnLinear.apply(x, weight, bias) if fast else F.linear(x, weight, bias)
