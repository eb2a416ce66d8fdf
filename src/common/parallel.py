"""Data parallelism: how the model is wrapped, how its gradients are synchronised and clipped, and
how model + optimizer state goes in and out of the wrapped model.

* ddp (default): every rank holds the whole model, its gradients and AdamW's two moments (16
  bytes per parameter in fp32); DDP all-reduces the gradients on the last micro-step.
* fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each transformer block and on the root.
  Parameters, gradients and optimizer state are sharded across the ranks (DTensors, each rank
  holding 1/world of every tensor); a block's parameters are all-gathered just before its
  forward and backward and freed after, gradients reduce-scattered at every micro-step (they
  stay sharded: accumulation costs no full-size buffer). On CUDA, compute in bf16 with fp32
  master weights and fp32 reductions; fp32 on CPU. With a single process and no process group
  there is nothing to shard: the model runs unwrapped.

Either mode may checkpoint activations per block (`--activation_checkpointing full`): a block's
activations are recomputed in the backward instead of kept (dropout masks replayed exactly).

State: a DDP run's checkpoint holds the model's and optimizer's ordinary state dicts (full
tensors, the optimizer keyed by parameter index); an fsdp run's holds DCP state dicts (DTensor
shards, the optimizer keyed by parameter name; see common.dcp_checkpoint). `load_weights` loads
either kind into either mode: DCP reshards to the world size at hand.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from common.dist import DistContext

log = logging.getLogger(__name__)

_FULL = StateDictOptions(full_state_dict=True)  # every rank holds the whole state; each keeps its part

# FSDP2 warns when the root returns a view (the GPT's logits are a slice). The trainer never
# changes the logits in place, which is what the warning is about.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model wrapped by fully_shard (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise): what element-wise checks and
    in-place drills run on, without a collective."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


class LocalShards:
    """A sharded model's parameters as `named_parameters()` yields them, each this rank's shard with
    its gradient's shard: what rank 0 draws histograms of without a collective."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        for name, param in self.model.named_parameters():
            shard = local_tensor(param.detach())
            shard.grad = local_tensor(param.grad) if param.grad is not None else None
            yield name, shard


def wrap_model(model: torch.nn.Module, *, parallel: str, ctx: DistContext, use_compile: bool,
               activation_checkpointing: str, bf16_compute: bool) -> torch.nn.Module:
    """The model as the training step calls it. Under fsdp the model itself is sharded in place
    (the returned object is `model`); under ddp it is wrapped (and compiled whole)."""
    if activation_checkpointing == "full":
        for block in _blocks(model):
            _checkpoint_activations(block)
    if parallel == "fsdp" and ctx.distributed:
        _fully_shard(model, ctx, bf16_compute)
        if use_compile:
            for block in _blocks(model):
                block.compile()  # in place: parameter names stay those of the plain model
        return model
    if use_compile:
        model = torch.compile(model)
    if ctx.distributed:
        device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
        # Gradients live in DDP's buckets: no copy between them and .grad.
        model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
    return model


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.transformer.h)


def _checkpoint_activations(block: torch.nn.Module) -> None:
    """Recompute the block's activations in the backward. The block keeps its class and its
    parameter names (checkpoints do not depend on the choice); RNG state is replayed, so dropout
    draws the same masks in the recomputation."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def checkpointed_forward(*args: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False)

    block.forward = checkpointed_forward


def _fully_shard(model: torch.nn.Module, ctx: DistContext, bf16_compute: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16_compute else MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root holds the embeddings (tied to the output head), the final norm and the head.
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # Scoring (HellaSwag) calls GPT.logits, not forward: it must gather the root's shards too.
    register_fsdp_forward_method(model, "logits")


def gradient_sync(model: torch.nn.Module, last_micro_step: bool) -> ContextManager:
    """DDP all-reduces on the last micro-step only; FSDP reduce-scatters at every micro-step, so
    the accumulated gradients stay sharded (a full-size buffer would undo the memory saving)."""
    if isinstance(model, DDP) and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to the global L2 norm over every rank's gradients; returns that norm as a plain
    tensor on the device (identical on every rank), never read on the host here."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    full_tensor = getattr(norm, "full_tensor", None)  # FSDP: the norm of sharded gradients is a DTensor
    if full_tensor is not None:
        norm = full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------- state

def checkpoint_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sharded: bool,
                       ) -> dict[str, Any]:
    """{"model", "optimizer"} for a checkpoint: DCP state dicts (this rank's shards, keyed by
    name) when `sharded`, else the ordinary state dicts (full tensors)."""
    if sharded:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def load_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Mapping[str, Any],
                 load_model: Callable[[Mapping[str, Any]], None]) -> None:
    """Model and optimizer state of `checkpoint` into `model` (unwrapped, sharded or not) and
    `optimizer`, whatever mode and world size wrote it.

    `checkpoint["dcp"]` names a DCP directory (common.dcp_checkpoint reads and reshards it);
    otherwise it holds full state dicts: `load_model` (the entry script's loader, which ends in
    `load_full_state`) loads the model's, and a sharded optimizer takes its part of every tensor.
    """
    if checkpoint.get("dcp"):
        from common.dcp_checkpoint import load_dcp_weights

        load_dcp_weights(model, optimizer, checkpoint["dcp"])
        return
    load_model(checkpoint["model"])
    if not is_sharded(model):
        optimizer.load_state_dict(checkpoint["optimizer"])
        return
    names = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, by_name(checkpoint["optimizer"], names), options=_FULL)


def load_full_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """A full model state dict into `model`, strictly: a sharded model keeps its part of each
    tensor (every rank holds the whole state, as every rank loads the checkpoint file)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    set_model_state_dict(model, dict(state), options=_FULL)


def by_name(optimizer_state: Mapping[str, Any], named_groups: list[dict[str, Any]]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index (torch's `Optimizer.state_dict()`) keyed
    by parameter name instead, as DCP's state-dict API takes it. `named_groups` are the target
    optimizer's groups as that API reports them: the same parameters in the same order (both
    optimizers are built by common.optim.build_adamw over the same model)."""
    groups = optimizer_state["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in named_groups]:
        raise ValueError("the checkpoint's optimizer has other parameter groups than this model's")
    name_of = {index: name for group, named in zip(groups, named_groups)
               for index, name in zip(group["params"], named["params"])}
    return {"state": {name_of[index]: value for index, value in optimizer_state["state"].items()},
            "param_groups": [dict(group, params=named["params"]) for group, named in zip(groups, named_groups)]}
