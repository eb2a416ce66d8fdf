"""Stable GPT trainer: bf16 autocast on GPU, fp32 on CPU; DDP under torchrun.

    torchrun --standalone --nproc_per_node=4 src/train_improved.py --config configs/gpt2_124m.json
    torchrun --standalone --nproc_per_node=4 src/train_improved.py --resume latest
"""
from __future__ import annotations

import sys

from common.config import TrainConfig, handle_config_actions, parse_args
from common.errors import run_cli
from common.trainer import plain_model_spec, train


def main() -> int:
    cfg, actions = parse_args(sys.argv[1:], TrainConfig)
    if handle_config_actions(cfg, actions):
        return 0
    return train(cfg, plain_model_spec, actions["explicit"])


if __name__ == "__main__":
    run_cli(main)
