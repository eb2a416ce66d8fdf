"""Stable GPT trainer: bf16 autocast on GPU, fp32 on CPU; DDP under torchrun.

    torchrun --standalone --nproc_per_node=4 src/train_improved.py --config configs/gpt2_124m.json
    torchrun --standalone --nproc_per_node=4 src/train_improved.py --resume latest
"""
from __future__ import annotations

import sys

from common.config import TrainConfig
from common.errors import run_cli
from common.trainer import main, plain_model_spec

if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:], TrainConfig, plain_model_spec))
