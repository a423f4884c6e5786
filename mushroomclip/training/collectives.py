"""The processes of a multi-process run: cross-rank gathers for the contrastive losses, and a check of the launch.

``clip`` and ``multi_positive`` contrast every image with every text, so under DDP each rank must see the
batch of all ranks (as open_clip's ``ClipLoss`` does); ``class_text`` compares with the class prompts,
the same on every rank, and needs no gather.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from accelerate.utils import parse_flag_from_env
from accelerate.utils.environment import get_cpu_distributed_information

logger = logging.getLogger(__name__)


class _GatherBatch(torch.autograd.Function):
    """All ranks' rows in rank order; the backward pass returns this rank's rows' gradient summed over ranks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
        sizes = [int(size) for size in sizes]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))  # all_gather needs equal shapes
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.size = sum(sizes[: dist.get_rank()]), len(local)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's rows
        return grad[ctx.start : ctx.start + ctx.size]


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (B, ...) of every rank, concatenated in rank order; this rank's rows keep their gradient.

    Every rank computes the same loss on the whole batch and the backward pass sums the gradients of a
    rank's rows over all of them, so once DDP averages over the W ranks, the gradients are those of one
    process on the concatenated batch. Without a process group (one process) it returns ``tensor``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _GatherBatch.apply(tensor)


def accelerate_started_one_cpu_process() -> bool:
    """Whether ``accelerate launch --cpu --num_processes N`` (N > 1, no MPI) started this process alone.

    Its single-process launcher then sets ``MASTER_ADDR``/``MASTER_PORT`` for the N processes but starts one,
    which has none of the world-size variables that accelerate reads in every rank of a real launch.
    """
    return (
        parse_flag_from_env("ACCELERATE_USE_CPU")
        and "MASTER_ADDR" in os.environ
        and "MASTER_PORT" in os.environ
        and get_cpu_distributed_information().world_size == 1
    )


def warn_if_accelerate_started_one_cpu_process() -> None:
    """One warning line when several CPU processes were asked of accelerate but this one trains alone."""
    if accelerate_started_one_cpu_process():
        logger.warning(
            "accelerate launch --cpu starts several processes only through MPI (--mpirun_hostfile); "
            "this one trains alone. For N CPU processes use: torchrun --standalone --nproc_per_node N train.py --config ..."
        )
