"""Data-parallel training with torch.distributed (launched by torchrun).

`init_from_env` joins the process group when torchrun's environment variables are set (NCCL for
CUDA devices, gloo on CPU). Every rank holds every SAE; each reads its own share of the data
(batch_size / world_size rows per step), gradients are averaged after backward, dead-latent
firing is OR-ed across ranks, and only rank 0 writes checkpoints and run folders or prints.
With mean-over-samples losses the averaged gradient equals the full-batch gradient, so N ranks
train the same SAEs one process would on the concatenated batches (up to float rounding).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from saelab.errors import ConfigError


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    return rank(), world_size()


def init_from_env(device: str) -> str:
    """Join torchrun's process group if launched by it; returns the device this rank should use."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.device(device).index is None:
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if is_cuda else "gloo")
    return device


def split_batch(batch_size: int) -> int:
    """This rank's share of a global batch."""
    w = world_size()
    if batch_size % w:
        raise ConfigError("batch_size", batch_size, f"must be divisible by the number of processes ({w})")
    return batch_size // w


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average every gradient. A parameter that got no gradient on some rank (sparse
    paths) gets zeros there, and keeps None only if no rank produced one, as in one process."""
    import torch.distributed as dist

    params = list(params)
    w = dist.get_world_size()
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads = []
    for p, flag in zip(params, has_grad.tolist()):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    if not grads:
        return
    # One flat all-reduce instead of one per tensor (latency dominates for small SAEs).
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= w
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a boolean tensor over ranks (a latent fired on any rank's rows)."""
    import torch.distributed as dist

    as_int = mask.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def mean_over_ranks(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's initial weights everywhere (they already agree when seeded alike; this makes sure)."""
    import torch.distributed as dist

    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def gather_objects(obj: object) -> list[object]:
    import torch.distributed as dist

    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
