"""Data-parallel plumbing for fine-tuning: torch.distributed launched by `torchrun` (env:// rendezvous).

`torchrun --nproc-per-node N -m train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with
WORLD_SIZE unset or 1 everything here is a no-op. Backend: nccl on CUDA, gloo on CPU. Embeddings are gathered
across ranks WITH gradients (`gather`: all_gather forward, all_reduce-sum backward), so every rank computes the loss over
the whole global batch; the gather's backward sums the copies' gradients back to their owner rank, and DDP's
gradient average over ranks then gives exactly the single-process gradient of a batch N*b (tests/
test_train_distributed.py checks losses and weights against one process).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, metrics and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1


def env_info() -> DistInfo:
    """Rank / world size / local rank from torchrun's environment (1 process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU); no-op for one process."""
    info = env_info()
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        return info
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return info


def shutdown() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Gather(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient of this rank's slice (all_reduce SUM)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(b, ...) on each rank -> (world * b, ...) in rank order (equal b on every rank)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.b = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Every rank's loss used this slice: its gradient is the sum over ranks."""
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


def gather(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, rank order, keeping the autograd graph (identity for 1 process)."""
    if not info.enabled:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(info.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)
    return _Gather.apply(x)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
