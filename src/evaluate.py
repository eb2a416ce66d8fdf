"""Score a checkpoint on a downstream task: HellaSwag's validation split, acc and acc_norm.

    python src/evaluate.py checkpoints/best.pt --task hellaswag --data hellaswag_val.jsonl --out hellaswag.json
    torchrun --standalone --nproc_per_node=4 src/evaluate.py checkpoints/best.pt --task hellaswag \\
        --data Rowan/hellaswag

CHECKPOINT: a checkpoint of either trainer (a .pt file, a sharded .dcp directory of an fsdp run, or
an export of one), or a local Hugging Face GPT-2 directory. --data: HellaSwag's jsonl, a local
dataset directory, or a Hugging Face dataset id (read with `datasets`). The text is tokenized with
the tokenizer of the run's dataset (--tokenizer to choose another). Under torchrun each rank
scores every W-th example; the result is exactly the one-process result. --out writes {"task",
"examples", "acc", "acc_norm"} (rank 0).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from common.checkpoint import is_dcp
from common.dist import destroy, init_distributed
from common.errors import UserError, run_cli
from common.evals import TASKS, load_task, score
from common.fsutil import atomic_write_text
from common.hf import read_hf_model
from common.logger import setup_logging
from common.model import GPT
from common.tokenizer import dataset_tokenizer, get_tokenizer
from export_checkpoint import load_plain_model

log = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Score a checkpoint on a downstream task.")
    parser.add_argument("checkpoint", type=Path, help="checkpoint of either trainer (.pt or .dcp), or a Hugging "
                                                      "Face GPT-2 directory")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--data", required=True, help="the task's data: a local jsonl, a dataset directory, or a "
                                                      "Hugging Face dataset id")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--tokenizer", help="tokenizer name (default: the run's dataset's; gpt2 when unknown)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    return parser.parse_args(argv)


def load_model(path: Path) -> tuple[GPT, str | None]:
    """The model (fp32, eval mode) and the data directory its run trained on (None if unknown)."""
    if path.is_dir() and not is_dcp(path):
        cfg, state = read_hf_model(path)
        data_dir = None
    elif path.exists():
        ckpt, cfg, state = load_plain_model(path)
        data_dir = ckpt["config"].get("data_dir")
        data_dir = data_dir if isinstance(data_dir, str) and Path(data_dir).is_dir() else None
    else:
        raise UserError(f"{path}: no such checkpoint file or directory")
    model = GPT(cfg)
    model.load_state_dict(state)
    return model.eval(), data_dir


def encoder(tokenizer: str | None, data_dir: str | None) -> tuple[str, Callable[[], Callable[[str], list[int]]]]:
    """(name, loader of an encode function): --tokenizer, else the run's dataset's own tokenizer
    (tiktoken, Hugging Face or SentencePiece), else gpt2."""
    if tokenizer or not data_dir:
        name = tokenizer or "gpt2"
        if not tokenizer:
            log.info("the checkpoint does not say which data its run used: gpt2 (--tokenizer to choose)")
        return name, lambda: get_tokenizer(name).encode_ordinary
    return f"of {data_dir}", lambda: dataset_tokenizer(data_dir).encode_ordinary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = init_distributed(args.device)
    setup_logging(is_main=ctx.is_main, rank=ctx.rank)
    try:
        model, data_dir = load_model(args.checkpoint)
        name, encode = encoder(args.tokenizer, data_dir)
        examples = load_task(args.task, args.data, encode, model.config.vocab_size, ctx)
        model.to(ctx.device)
        log.info("%s: %d examples on %d rank(s), tokenizer %s", args.task, len(examples), ctx.world_size, name)
        started = time.perf_counter()
        with tqdm(total=len(examples), unit="ex", disable=not ctx.is_main, file=sys.stderr) as bar:
            # rank 0 sees its own examples: each stands for one per rank
            scores = score(model, examples, ctx, progress=lambda n: bar.update(min(n * ctx.world_size,
                                                                                   bar.total - bar.n)))
        log.info("%s: acc %.4f, acc_norm %.4f on %d examples (%.1f s)", args.task, scores.acc, scores.acc_norm,
                 scores.examples, time.perf_counter() - started)
        if args.out and ctx.is_main:
            result = {"task": args.task, "examples": scores.examples, "acc": scores.acc, "acc_norm": scores.acc_norm}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    finally:
        destroy(ctx)
    return 0


if __name__ == "__main__":
    run_cli(main)
