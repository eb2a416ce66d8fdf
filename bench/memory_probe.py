"""Per-rank memory of one training configuration under --parallel ddp or fsdp; run under torchrun.

    torchrun --nproc_per_node=2 bench/memory_probe.py [train_improved.py flags ...] --bench_json out.json

Takes the trainer's own flags and builds the trainer's pieces from them (`GPT`, `wrap_model`,
`build_adamw`, `gradient_sync`, `clip_grad_norm`, the thread policy, the autocast rule), then
trains `--max_steps` steps on random tokens. At the end of the last step -- parameters,
gradients and AdamW's moments all alive -- each rank counts the bytes of its own parameters,
gradients and optimizer state (its shards under fsdp; each storage once, so DDP's gradient
buckets count once). Peak memory, from building the model to the end: on CUDA the allocator's
peak; on CPU the peak resident set (VmHWM) above the resident set just before the model was
built, with glibc told to map every block of 64 KiB or more on its own
(MALLOC_MMAP_THRESHOLD_=65536, required): a freed tensor then leaves the resident set at once,
whichever thread frees it (gloo's worker threads free FSDP's communication buffers), instead of
staying in a malloc arena, and the resident set follows the bytes held. Rank 0 writes one JSON
object with every rank's figures to --bench_json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from common.config import TrainConfig, parse_args  # noqa: E402
from common.dist import DistContext, all_gather_objects, destroy, init_distributed, seed_everything  # noqa: E402
from common.model import GPT, GPTConfig  # noqa: E402
from common.optim import build_adamw  # noqa: E402
from common.parallel import clip_grad_norm, gradient_sync, local_tensor, wrap_model  # noqa: E402
from common.trainer import gradient_accumulation_steps, resolve_autocast_dtype  # noqa: E402

MB = 1e6
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages under `tensors` (this rank's shards of DTensors), each counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in tensors:
        storage = local_tensor(tensor).untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def run(cfg: TrainConfig) -> dict[str, Any]:
    ctx = init_distributed(cfg.device, cfg.cpu_threads, cfg.collective_timeout_s)
    try:
        on_cpu = ctx.device.type == "cpu"
        if on_cpu and os.environ.get(MMAP_THRESHOLD) != "65536":
            raise SystemExit(f"set {MMAP_THRESHOLD}=65536 (see the docstring): bench/run_bench.py does")
        baseline_kb = _status_kb("VmRSS") if on_cpu else 0
        if not on_cpu:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        raw, optimizer = train(cfg, ctx)
        params = list(raw.parameters())
        figures = {
            "rank": ctx.rank,
            "params_bytes": tensor_bytes(params),
            "grads_bytes": tensor_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer_bytes": tensor_bytes([v for state in optimizer.state.values() for v in state.values()
                                             if isinstance(v, torch.Tensor)]),
        }
        figures["state_bytes"] = figures["params_bytes"] + figures["grads_bytes"] + figures["optimizer_bytes"]
        if on_cpu:
            figures["peak_mb"] = (_status_kb("VmHWM") - baseline_kb) * 1024 / MB
        else:
            figures["peak_mb"] = torch.cuda.max_memory_allocated(ctx.device) / MB
        ranks = all_gather_objects(figures, ctx)
        return {"parallel": cfg.parallel, "device": str(ctx.device), "world_size": ctx.world_size,
                "params": raw.num_params(non_embedding=False), "ranks": ranks,
                "peak_kind": "resident set above the one before the model was built" if on_cpu
                else "CUDA allocator's peak"}
    finally:
        destroy(ctx)


def train(cfg: TrainConfig, ctx: DistContext) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer after `max_steps` steps, the last step's gradients kept."""
    seed_everything(cfg.seed)
    raw = GPT(GPTConfig.from_train_config(cfg)).to(ctx.device)
    dtype = resolve_autocast_dtype(cfg, ctx.device)
    model = wrap_model(raw, parallel=cfg.parallel, ctx=ctx, use_compile=bool(cfg.compile),
                       activation_checkpointing=cfg.activation_checkpointing, bf16_compute=dtype == torch.bfloat16)
    optimizer = build_adamw(raw, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    accum = gradient_accumulation_steps(cfg, ctx.world_size)
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    generator = torch.Generator().manual_seed(cfg.seed + ctx.rank)
    for step in range(cfg.max_steps):
        for micro in range(accum):
            x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size), generator=generator).to(ctx.device)
            with gradient_sync(model, last_micro_step=micro == accum - 1), autocast():
                _, loss = model(x, x)
                (loss / accum).backward()
        clip_grad_norm(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        if step < cfg.max_steps - 1:
            optimizer.zero_grad(set_to_none=True)
    return raw, optimizer


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--bench_json", required=True, type=Path)
    args, rest = parser.parse_known_args()
    cfg, _ = parse_args(rest, TrainConfig)
    result = run(cfg)
    if os.environ.get("RANK", "0") == "0":
        args.bench_json.parent.mkdir(parents=True, exist_ok=True)
        args.bench_json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
