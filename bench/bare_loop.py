"""The bare training loop the trainer is measured against: forward, backward, optimizer step.

    python bench/bare_loop.py --config configs/tiny_cpu.json --data_dir data/stdlib --max_steps 60 \
        --bench_warmup 5 --bench_json out.json [--bench_peak_every 20]

Takes the trainer's own flags (`common.config.parse_args`, so defaults, model shape, batch,
learning rate, seed, device, dtype, compile and `cpu_threads` are exactly the trainer's) and
builds the same pieces the trainer builds: `common.model.GPT`, `common.optim.build_adamw`,
`common.data.ShardedTrainLoader`, the same thread policy (`common.dist.set_cpu_threads`) and
the same autocast rule. It then does only what a step must do -- next_batch, forward, backward
for each micro-batch, optimizer.step, zero_grad -- and records, per step, the wall time, the
time spent inside `loader.next_batch`, and the unix time at the end of the step.

With `--bench_peak_every K` a large fp32 matrix product (`common.metrics.measure_matmul_peak`)
is timed before the first step and after every K steps -- interleaved with training, outside the
step times -- so the model's achieved FLOP/s can be set against the device's peak measured at
the same moments (the CPU's own MFU).

Writes one JSON object to --bench_json (and prints it). `bench/run_bench.py` runs this file as a
subprocess, so the peak RSS it reports belongs to this loop alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from common.config import TrainConfig, parse_args  # noqa: E402
from common.data import ShardedTrainLoader  # noqa: E402
from common.dist import choose_device, seed_everything, set_cpu_threads  # noqa: E402
from common.metrics import flops_per_token, gpu_peak_flops, measure_matmul_peak  # noqa: E402
from common.model import GPT, GPTConfig  # noqa: E402
from common.optim import build_adamw  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The trainer's rule (common.trainer.resolve_autocast_dtype), imported rather than copied."""
    from common.trainer import resolve_autocast_dtype
    return resolve_autocast_dtype(cfg, device)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def run(cfg: TrainConfig, warmup: int, peak_every: int = 0, peak_n: int = 2048, peak_repeats: int = 3
        ) -> dict[str, Any]:
    device = choose_device(cfg.device, 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = set_cpu_threads(cfg.cpu_threads, 1)
    accum = cfg.total_batch_size // (cfg.batch_size * cfg.block_size)
    if accum < 1 or cfg.total_batch_size % (cfg.batch_size * cfg.block_size):
        raise SystemExit("total_batch_size must be a multiple of batch_size * block_size")
    steps = cfg.max_steps
    if steps <= warmup:
        raise SystemExit(f"--max_steps {steps} must exceed --bench_warmup {warmup}")

    seed_everything(cfg.seed)
    model = GPT(GPTConfig.from_train_config(cfg)).to(device)
    optimizer = build_adamw(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            betas=(cfg.beta1, cfg.beta2), device=device)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fwd = torch.compile(model) if use_compile else model
    dtype = _autocast_dtype(cfg, device)
    loader = ShardedTrainLoader(cfg.data_dir, block_size=cfg.block_size, micro_batch_size=cfg.batch_size,
                                grad_accum_steps=accum, rank=0, world_size=1, seed=cfg.seed, device=device)

    def autocast() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    peaks: list[dict[str, Any]] = []

    def probe_peak(after_step: int) -> None:
        flops = measure_matmul_peak(device, dtype=torch.float32, n=peak_n, repeats=peak_repeats)
        peaks.append({"after_step": after_step, "flops": flops})

    step_s: list[float] = []
    loader_s: list[float] = []
    end_unix: list[float] = []
    losses: list[float] = []
    if peak_every:
        probe_peak(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, steps + 1):
        start = time.perf_counter()
        in_loader = 0.0
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            t0 = time.perf_counter()
            x, y = loader.next_batch()
            in_loader += time.perf_counter() - t0
            with autocast():
                _, loss = fwd(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)  # the trainer syncs once per step too (loss.item() for the log)
        step_s.append(time.perf_counter() - start)
        end_unix.append(time.time())
        loader_s.append(in_loader)
        losses.append(float(loss_sum) / accum)  # outside the timed region
        if peak_every and step > warmup and ((step - warmup) % peak_every == 0 or step == steps):
            probe_peak(step)
    loader.close()

    measured = step_s[warmup:]
    tokens = cfg.total_batch_size * len(measured)
    seconds = sum(measured)
    nparams = model.num_params()
    fpt = flops_per_token(nparams, cfg.n_layer, cfg.n_embd, cfg.block_size)
    tps = tokens / seconds
    out: dict[str, Any] = {
        "device": str(device),
        "threads": threads,
        "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
        "compile": bool(use_compile),
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_for_flops": nparams,
        "flops_per_token": fpt,
        "grad_accum": accum,
        "padded_vocab": model.padded_vocab_size,
        # One (micro-batch tokens, padded vocabulary) logits tensor in the forward's dtype: the
        # output head and the loss hold a few of these at once, the largest activations here.
        "logits_mb": cfg.batch_size * cfg.block_size * model.padded_vocab_size
        * (2 if dtype in (torch.bfloat16, torch.float16) else 4) / 2**20,
        "tokens_per_step": cfg.total_batch_size,
        "steps": steps,
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "seconds": seconds,
        "tokens_per_sec": tps,
        "step_s_median": statistics.median(measured),
        "step_s": step_s,
        "loader_s": loader_s,
        "loader_share": sum(loader_s[warmup:]) / seconds,
        "loader_s_median": statistics.median(loader_s[warmup:]),
        "end_unix": end_unix,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "achieved_flops": fpt * tps,
        "peak_rss_mb": peak_rss_mb(),
    }
    if peaks:
        best = max(p["flops"] for p in peaks)
        med = statistics.median(p["flops"] for p in peaks)
        out.update({"peak_probes": peaks, "peak_fp32_flops_max": best, "peak_fp32_flops_median": med,
                    "peak_n": peak_n, "mfu_vs_measured_peak": fpt * tps / med,
                    "mfu_vs_best_peak": fpt * tps / best})
    table = gpu_peak_flops(device)
    if table is not None:
        out["table_peak_bf16_flops"] = table
        out["mfu_vs_table_peak"] = fpt * tps / table
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--bench_warmup", type=int, default=5, help="first steps left out of the figures")
    bench.add_argument("--bench_json", default=None, help="write the result here (also printed)")
    bench.add_argument("--bench_peak_every", type=int, default=0,
                       help="time a large fp32 matmul before the loop and every K measured steps (0: never)")
    bench.add_argument("--bench_peak_n", type=int, default=2048)
    bench.add_argument("--bench_peak_repeats", type=int, default=3)
    known, rest = bench.parse_known_args(argv)
    cfg, _ = parse_args(rest, TrainConfig)
    result = run(cfg, known.bench_warmup, known.bench_peak_every, known.bench_peak_n, known.bench_peak_repeats)
    text = json.dumps(result)
    if known.bench_json:
        Path(known.bench_json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
