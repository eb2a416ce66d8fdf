"""The bare training loop the trainer is measured against: forward, backward, optimizer step.

    python bench/bare_loop.py [train_improved.py flags ...] --bench_warmup 5 --bench_json out.json

Takes the trainer's own flags and builds the trainer's pieces from them (`common.model.GPT`,
`common.optim.build_adamw`, `common.data.ShardedTrainLoader`, the thread policy, the autocast
rule), then does only what a step must do: next_batch, forward and backward per micro-batch,
optimizer step, zero_grad. It records each step's seconds and the seconds spent in next_batch.
`--bench_adamw foreach` swaps the trainer's fused AdamW for the foreach one (same groups and
hyperparameters), to measure what the fused one wins.

Outside the steps it also times: a large fp32 matrix product before the first step and after
the last (the device's measured peak, for MFU), and then `--bench_loader_batches` calls of
next_batch alone (what the loader can serve). Writes one JSON object to --bench_json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from common.config import TrainConfig, parse_args  # noqa: E402
from common.data import DatasetIndex, ShardedTrainLoader  # noqa: E402
from common.dist import choose_device, seed_everything, set_cpu_threads  # noqa: E402
from common.metrics import flops_per_token, measure_matmul_peak  # noqa: E402
from common.model import GPT, GPTConfig  # noqa: E402
from common.optim import build_adamw  # noqa: E402
from common.trainer import resolve_autocast_dtype, with_dataset_vocab  # noqa: E402


def _sync(device: torch.device) -> None:
    """Wait for queued device work, as the trainer's per-step loss read does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def foreach_adamw(fused: torch.optim.AdamW) -> torch.optim.AdamW:
    """The same parameter groups and hyperparameters as `fused`, with the foreach implementation."""
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in fused.param_groups]
    d = fused.defaults
    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], foreach=True)


def run(cfg: TrainConfig, warmup: int, peak_n: int, loader_batches: int, adamw: str = "fused") -> dict[str, Any]:
    device = choose_device(cfg.device, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = set_cpu_threads(cfg.cpu_threads, 1)
    accum, rest = divmod(cfg.total_batch_size, cfg.batch_size * cfg.block_size)
    if accum < 1 or rest or cfg.max_steps <= warmup:
        raise SystemExit("need total_batch_size a multiple of batch_size * block_size, max_steps > bench_warmup")
    seed_everything(cfg.seed)
    cfg = with_dataset_vocab(cfg, DatasetIndex.open(cfg.data_dir))
    model = GPT(GPTConfig.from_train_config(cfg)).to(device)
    optimizer = build_adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    if adamw == "foreach":
        optimizer = foreach_adamw(optimizer)
    forward = torch.compile(model) if (cfg.compile if cfg.compile is not None else device.type == "cuda") else model
    dtype = resolve_autocast_dtype(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    loader = ShardedTrainLoader(cfg.data_dir, block_size=cfg.block_size, micro_batch_size=cfg.batch_size,
                                grad_accum_steps=accum, seed=cfg.seed, device=device)
    peaks = [measure_matmul_peak(device, torch.float32, n=peak_n, repeats=3)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, loader_s = [], []
    for _ in range(cfg.max_steps):
        start, in_loader = time.perf_counter(), 0.0
        for _ in range(accum):
            t0 = time.perf_counter()
            x, y = loader.next_batch()
            in_loader += time.perf_counter() - t0
            with autocast():
                _, loss = forward(x, y)
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        step_s.append(time.perf_counter() - start)
        loader_s.append(in_loader)
    cuda_peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None
    peaks.append(measure_matmul_peak(device, torch.float32, n=peak_n, repeats=3))
    start = time.perf_counter()
    for _ in range(loader_batches):
        loader.next_batch()
    loader_alone_s = time.perf_counter() - start
    loader.close()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "threads": threads,
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
        "fused_ce": model.uses_fused_ce(device),
        "adamw": adamw,
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token(model.num_params(), cfg.n_layer, cfg.n_embd, cfg.block_size),
        "tokens_per_step": cfg.total_batch_size,
        "step_s": step_s,
        "loader_s": loader_s,
        "peak_flops": peaks,
        "loader_tokens": loader_batches * cfg.batch_size * cfg.block_size,
        "loader_alone_s": loader_alone_s,
        "cuda_peak_allocated_mb": cuda_peak,
    }


def main(argv: list[str] | None = None) -> int:
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--bench_warmup", type=int, default=5, help="first steps left out of the figures")
    bench.add_argument("--bench_json", required=True, help="write the result here")
    bench.add_argument("--bench_peak_n", type=int, default=2048, help="size of the timed square matmul")
    bench.add_argument("--bench_loader_batches", type=int, default=500, help="next_batch calls timed alone")
    bench.add_argument("--bench_adamw", choices=("fused", "foreach"), default="fused", help="AdamW implementation")
    known, rest = bench.parse_known_args(argv)
    cfg, _ = parse_args(rest, TrainConfig)
    result = run(cfg, known.bench_warmup, known.bench_peak_n, known.bench_loader_batches, known.bench_adamw)
    Path(known.bench_json).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
