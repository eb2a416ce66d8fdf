"""Process groups, device choice, threads per rank, seeds, and the collectives the trainer uses.

Works under torchrun (any number of processes and nodes) and as a plain single process.

Two process groups, two kinds of timeout (the idea of torchtitan's two-phase timeouts):

* the default group (nccl on CUDA, gloo otherwise) carries the training collectives. Its timeout
  is generous until the first step is done (start-up compiles, loads, allocates), then
  `tighten_timeout()` sets `--collective_timeout_s`: a rank that stops answering ends the run
  instead of leaving every other rank waiting for ever;
* the control group (always gloo, CPU tensors) carries decisions and the waits of the phases in
  which rank 0 works alone while the others wait (a checkpoint write on a slow file system, a
  text sample, charts). Its timeout is long, so a big model on slow storage never trips it.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.errors import RunFailed, UserError

log = logging.getLogger(__name__)

# Start-up (rendezvous, compile, first step) may take long on a big model; afterwards
# --collective_timeout_s applies. Phases where rank 0 works alone use the control group.
STARTUP_TIMEOUT_MIN_S = 600.0
CONTROL_TIMEOUT_MIN_S = 3600.0


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without a group
    control: Any = None  # the gloo group for decisions and rank-0-alone phases (None without a group)
    timeout_s: float = 0.0  # --collective_timeout_s, applied by tighten_timeout()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def choose_device(preference: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """CUDA, then MPS, then CPU for `auto`; an explicit choice must be available.

    A launcher that gives each process one GPU through CUDA_VISIBLE_DEVICES (`srun
    --gpus-per-task=1`) leaves one visible device whatever LOCAL_RANK is: that device is used.
    Several processes of one torchrun on a node that shows one GPU would all land on it: refused.
    """
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
        count = torch.cuda.device_count()
        if count == 1 and local_world_size > 1:
            raise UserError(f"{local_world_size} processes on this node share its one visible GPU; use "
                            "--nproc_per_node 1, or give each process its own GPU (CUDA_VISIBLE_DEVICES)")
        if count == 1:
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU: only {count} visible; "
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


def enable_tf32() -> None:
    """TF32 tensor cores for the fp32 matmuls and convolutions left outside bf16 autocast (Ampere
    and newer). Through the `fp32_precision` settings of torch >= 2.9: the `allow_tf32` flags they
    replace are deprecated, and once anything (inductor, a library) uses the new settings, torch
    refuses to read a state set with both. Older torch has only the flags."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _set_nccl_debug_defaults(log_dir: str | None) -> None:
    """NCCL's flight recorder: on a collective timeout each rank dumps its last collectives, which
    names the rank that stalled and the operation (the user's own settings win)."""
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        dump = os.path.join(os.path.abspath(log_dir), "flight_recorder_rank_")
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", dump)


def init_distributed(device_preference: str = "auto", cpu_threads: int = 0, timeout_s: float = 300.0,
                     log_dir: str | None = None) -> DistContext:
    """Join the torchrun process group when there is one: nccl on CUDA, gloo otherwise, plus the
    gloo control group."""
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    device = choose_device(device_preference, local_rank, local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        enable_tf32()
    set_cpu_threads(cpu_threads, local_world_size)

    backend: str | None = None
    control = None
    if world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            _set_nccl_debug_defaults(log_dir)
        startup = datetime.timedelta(seconds=max(STARTUP_TIMEOUT_MIN_S, 10 * timeout_s))
        kwargs: dict[str, Any] = {"backend": backend, "timeout": startup, "store": _restart_safe_store(startup),
                                  "rank": rank, "world_size": world_size}
        if kwargs["store"] is None:
            del kwargs["store"], kwargs["rank"], kwargs["world_size"]  # env:// as usual
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds the group to this GPU, avoids a lazy init hang
        dist.init_process_group(**kwargs)
        control = dist.new_group(backend="gloo", timeout=control_timeout(timeout_s))
    return DistContext(rank, local_rank, world_size, local_world_size, device, backend, control, timeout_s)


def control_timeout(timeout_s: float) -> datetime.timedelta:
    """Timeout of groups whose collectives wait for one rank's long work (a checkpoint write)."""
    return datetime.timedelta(seconds=max(CONTROL_TIMEOUT_MIN_S, 12 * timeout_s))


def _restart_safe_store(timeout: datetime.timedelta) -> Any:
    """The torchrun agent's store, with keys of their own for this restart attempt, or None.

    torchrun (2.13) keeps one TCPStore server for every rendezvous round and its workers use it
    without a per-round prefix, so after an elastic restart (`--max-restarts`) a new worker can
    read the address a dead worker of the previous attempt published there and fail to connect
    ("Connection refused"), or connect to a stale peer. A prefix per attempt keeps rounds apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), _env_int("WORLD_SIZE", 1),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/llm-pretrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def tighten_timeout(ctx: DistContext) -> None:
    """After the first step: a training collective that waits longer than --collective_timeout_s
    for another rank fails (and the run ends) instead of waiting for ever."""
    if ctx.distributed:
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=ctx.timeout_s))


# How long the last gloo worker threads get the GIL before the groups go (see destroy).
GLOO_SETTLE_S = 0.05


def destroy(ctx: DistContext) -> None:
    """Destroy every process group (the default one, the control group, a checkpointer's).

    gloo finishes each collective's bookkeeping on a worker thread of its own after the caller has
    the result: it frees the collective's tensors, and freeing a tensor Python made takes the GIL.
    A thread that asks for the GIL while the interpreter is finalizing is ended by Python from
    inside a C++ destructor, and the process aborts ("terminate called without an active
    exception"; a bare script that exits right after a DCP save did so in 2 of 20 runs here, 1 of
    20 even with destroy_process_group()). Every collective here is waited for, so by now such a
    thread needs the GIL for microseconds: the sleep hands it over first, then the groups go.
    """
    if ctx.distributed and dist.is_initialized():
        time.sleep(GLOO_SETTLE_S)
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and every device) generators from one seed: the model's
    initialisation is the same on every rank. Training randomness (dropout) comes from
    `seed_step`, per rank and per step."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's generators for optimizer step `step` on `rank`.

    Dropout masks then depend on (seed, rank, step) alone: a resumed run draws the numbers the
    uninterrupted run drew whatever else consumed random numbers before (an evaluation, a peak
    measurement, a restored state), and a restarted or rolled-back rank needs no saved stream.
    """
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1))


def is_collective_failure(err: BaseException) -> bool:
    """A failed or timed-out collective (a peer that hung, died or closed its connection)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        mark in text for mark in ("gloo", "Gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        all_reduce_sum(tensor, ctx)
        tensor /= ctx.world_size
    return tensor


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank, over the control group (CPU, long timeout)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=ctx.control)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere), over the control group."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0, group=ctx.control)
    return out


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj` on every rank, over the control group."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.control)
    return out


def control_barrier(ctx: DistContext) -> None:
    """Wait for every rank on the control group: the others wait here (long timeout) while rank 0
    finishes work of its own."""
    if ctx.distributed:
        dist.barrier(group=ctx.control)


def rank0_decides(decide: Callable[[], Any], ctx: DistContext) -> Any:
    """Run `decide` on rank 0 and hand its result to every rank.

    Whatever `decide` raises on rank 0 is raised on every rank -- a UserError as a UserError,
    anything else as RunFailed with the same one-line reason (the traceback goes to rank 0's
    log) -- so no rank is left waiting in a collective for a peer that has already given up.
    """
    outcome: tuple[Any, str | None, str | None] = (None, None, None)
    if ctx.is_main:
        try:
            outcome = (decide(), None, None)
        except UserError as err:
            outcome = (None, "user", str(err))
        except Exception as err:  # noqa: BLE001 - every rank must learn that rank 0 failed
            log.debug("rank 0 decision failed:\n%s", traceback.format_exc())
            outcome = (None, "failed", _one_line(err))
    result, kind, message = broadcast_object(outcome, ctx)
    if kind == "user":
        raise UserError(message)
    if kind == "failed":
        raise RunFailed(message or "rank 0 failed")
    return result


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if not isinstance(err, RunFailed) else text
