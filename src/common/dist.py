"""Process group, device choice, threads per rank and seeding.

Works under torchrun (any number of processes and nodes) and as a plain single process.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without a group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def choose_device(preference: str, local_rank: int) -> torch.device:
    """CUDA, then MPS, then CPU for `auto`; an explicit choice must be available."""
    if preference == "auto":
        if torch.cuda.is_available():
            preference = "cuda"
        elif torch.backends.mps.is_available():
            preference = "mps"
        else:
            preference = "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda requested but no CUDA device is available (try --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                            "use --nproc_per_node equal to the GPU count")
        return torch.device("cuda", local_rank)
    if preference == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps requested but MPS is not available (try --device cpu)")
    return torch.device(preference)


def set_cpu_threads(requested: int, local_world_size: int) -> int:
    """Split the node's cores among its ranks so two ranks do not fight over the same cores."""
    if requested <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(requested)
    return requested


def init_distributed(device_preference: str = "auto", cpu_threads: int = 0) -> DistContext:
    """Join the torchrun process group when there is one: nccl on CUDA, gloo otherwise."""
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    device = choose_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 tensor cores for the fp32 matmuls left outside bf16 autocast (Ampere and newer).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_cpu_threads(cpu_threads, local_world_size)

    backend: str | None = None
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds the group to this GPU, avoids a lazy init hang
        dist.init_process_group(**kwargs)
    return DistContext(rank, local_rank, world_size, local_world_size, device, backend)


def destroy(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """The same seed on every rank: model init is identical everywhere (DDP also broadcasts it);
    per-rank randomness (dropout) comes from the data each rank sees."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= ctx.world_size
    return tensor


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def rank0_decides(decide: Callable[[], Any], ctx: DistContext) -> Any:
    """Run `decide` on rank 0 and hand its result to every rank.

    A UserError on rank 0 (nothing to resume, disk too small) is raised on every rank, so no
    rank is left waiting in a collective for a peer that has already given up.
    """
    outcome: tuple[Any, str | None] = (None, None)
    if ctx.is_main:
        try:
            outcome = (decide(), None)
        except UserError as err:
            outcome = (None, str(err))
    result, error = broadcast_object(outcome, ctx)
    if error is not None:
        raise UserError(error)
    return result
