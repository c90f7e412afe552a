"""torch.distributed plumbing: process groups under torchrun, reductions, rank-0-only output.

A single process is a world of size one: every helper here is then a no-op, so the trainer has
one code path.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from autohdr.diagnosis.ranks import SINGLE, DistContext, gather_objects  # noqa: F401  (re-exported)


def launched_by_torchrun(environ=os.environ) -> bool:
    """True when torchrun (or another launcher) set ``WORLD_SIZE`` > 1."""
    return int(environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), or stay single."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``values`` over ranks (returns a new tensor; identity for one process)."""
    if not ctx.enabled:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if not ctx.enabled:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank, in place.

    DDP with ``broadcast_buffers=True`` does this at the start of each training forward; doing it
    once more before validation makes every rank evaluate the model rank 0 saves.
    """
    if not ctx.enabled:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
