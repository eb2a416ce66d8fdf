"""FP8 GPT trainer: the block linears as TransformerEngine modules under FP8 autocast on
Hopper/Blackwell; a loud fallback to the ordinary model in bf16 (fp32 on CPU) elsewhere.

A separate script so the stable one can never break; the loop, checkpoints, logging and resume
are the shared ones (common/trainer.py). Checkpoints go to ./checkpoints_fp8 by default.

    torchrun --standalone --nproc_per_node=4 src/train_fp8.py --use_fp8 --use_tensorboard
"""
from __future__ import annotations

import logging
import sys

import torch

from common.config import FP8TrainConfig, handle_config_actions, parse_args
from common.dist import DistContext
from common.errors import run_cli
from common.fp8 import (
    align_extra_state,
    amax_reduction_group,
    build_recipe,
    check_fp8_shapes,
    compile_allowed,
    fp8_autocast,
    load_te,
    plan_precision,
    te_linear_factory,
)
from common.model import GPT, GPTConfig
from common.trainer import ModelSpec, resolve_autocast_dtype, train

log = logging.getLogger("train_fp8")


def fp8_model_spec(cfg: FP8TrainConfig, ctx: DistContext) -> ModelSpec:
    te = load_te()
    plan = plan_precision(cfg, ctx.device, te)  # exits 2 here under --require_fp8 without FP8
    (log.warning if plan.fallback else log.info)("precision: %s", plan.reason)
    autocast_dtype = resolve_autocast_dtype(cfg, ctx.device)
    if not plan.use_te:
        return ModelSpec(build=GPT, precision=plan.precision, autocast_dtype=autocast_dtype, meta=plan.to_meta(),
                         adapt_state_dict=align_extra_state)

    if plan.use_fp8:
        check_fp8_shapes(cfg)
    recipe = build_recipe(cfg, te) if plan.use_fp8 else None
    group = amax_reduction_group()
    # fp32 master weights; TE takes the activation dtype (bf16) from torch.autocast.
    linear = te_linear_factory(te, torch.float32, device=ctx.device)
    compile_ok, why = compile_allowed(cfg, te, plan)
    if cfg.compile is not False and not compile_ok:
        log.info(why)

    def build(model_cfg: GPTConfig) -> torch.nn.Module:
        return GPT(model_cfg, linear_factory=linear)

    return ModelSpec(
        build=build,
        precision=plan.precision,
        autocast_dtype=torch.bfloat16,
        # Only the forward runs inside TE's autocast; the backward runs outside it.
        forward_context=lambda: fp8_autocast(te, enabled=plan.use_fp8, recipe=recipe, group=group),
        allow_compile=compile_ok,
        meta=plan.to_meta(),
        adapt_state_dict=align_extra_state,  # a checkpoint of the fallback model resumes here too
    )


def main() -> int:
    cfg, actions = parse_args(sys.argv[1:], FP8TrainConfig)
    if handle_config_actions(cfg, actions):
        return 0
    return train(cfg, fp8_model_spec, actions["explicit"])


if __name__ == "__main__":
    run_cli(main)
