"""Data parallelism for the adapter, in plain torch.distributed (gloo on the CPU, NCCL on the GPU).

The LyCORIS network is not a submodule of the transformer, so wrapping the transformer in DDP would
sync nothing: the adapter's gradients are all-reduced here instead, in one flat buffer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_of(count: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous share of a global batch of `count`; sizes differ by at most one."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


@torch.no_grad()
def allreduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks (each rank already scaled its loss by its share of the global batch).

    One all-reduce per optimizer step: a network-bound collective and a barrier for every rank.
    A rank whose share was empty contributes zeros.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for param, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if param.grad is None:
            param.grad = synced.clone()
        else:
            param.grad.copy_(synced)
