"""FP8 GPT trainer: the block linears as TransformerEngine modules under FP8 autocast on
Hopper/Blackwell/Ada; elsewhere, and without --use_fp8, the ordinary model as train_improved.py
trains it (bf16 on GPU, fp32 on CPU, compiled per --compile), with a loud warning when FP8 was
asked for.

A separate script so the stable one can never break; the loop, checkpoints, logging and resume
are the shared ones (common/trainer.py). Checkpoints go to ./checkpoints_fp8 by default.

    torchrun --standalone --nproc_per_node=4 src/train_fp8.py --use_fp8 --use_tensorboard
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from common.config import FP8TrainConfig
from common.dist import DistContext
from common.errors import run_cli
from common.fp8 import (
    COMPILE_OFF_REASON,
    FP8Forward,
    amax_reduction_group,
    build_recipe,
    check_fp8_shapes,
    check_parallel,
    load_model_state,
    plan_precision,
)
from common.model import GPT, GPTConfig
from common.trainer import ModelSpec, main, plain_model_spec

log = logging.getLogger("train_fp8")


def fp8_model_spec(cfg: FP8TrainConfig, ctx: DistContext) -> ModelSpec:
    plain = plain_model_spec(cfg, ctx)
    plan = plan_precision(cfg, ctx.device, plain.precision)  # exits 2 here under --require_fp8 without FP8
    check_parallel(plan, cfg.parallel)  # before any model is built
    (log.warning if plan.fallback else log.info)("precision: %s", plan.reason)
    if not plan.use_fp8:
        # A checkpoint of an FP8 run resumes here too: its TE scaling state is dropped.
        return dataclasses.replace(plain, meta=plan.to_meta(), load_state=load_model_state)

    assert plan.te is not None
    check_fp8_shapes(cfg)
    fp8 = FP8Forward(plan.te, build_recipe(cfg, plan.te), amax_reduction_group())
    linear = fp8.linear_factory(ctx.device)
    if cfg.compile is not False:
        log.info(COMPILE_OFF_REASON)

    def build(model_cfg: GPTConfig) -> torch.nn.Module:
        return GPT(model_cfg, linear_factory=linear)

    return ModelSpec(
        build=build,
        precision=plan.precision,
        autocast_dtype=torch.bfloat16,  # TE takes its activation dtype from torch.autocast
        forward_context=fp8.forward_context,  # only the forward runs inside TE's autocast
        allow_compile=False,
        meta=plan.to_meta(),
        load_state=load_model_state,  # a checkpoint of the fallback model resumes here too
    )


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:], FP8TrainConfig, fp8_model_spec))
