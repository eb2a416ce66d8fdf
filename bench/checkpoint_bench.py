"""Caller-side stall of one checkpoint save: asynchronous against synchronous.

    OMP_NUM_THREADS=1 .venv/bin/python bench/checkpoint_bench.py [--mb 110] [--repeats 3] [--dir DIR]

Builds a GPT-like model + AdamW state of fp32 tensors (~110 MB: weights, exp_avg, exp_avg_sq),
then saves it alternately with async_save (the caller waits only for the in-memory snapshot) and
synchronously (the caller waits for torch.save + fsync + links + sidecars), each `repeats` times
in the same run, and prints JSON with the medians and their ratio. The directory defaults to a
temporary one under ./checkpoints' file system (the disk a real run writes to); it is removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from common.checkpoint import Checkpointer, estimate_state_bytes  # noqa: E402


def make_state(megabytes: float = 110.0, n_embd: int = 768) -> dict:
    """A model + AdamW-like checkpoint dict of fp32 tensors totalling about `megabytes`."""
    params_wanted = int(megabytes * 1e6 / 12)  # 4 bytes weight + 8 bytes of AdamW moments
    block = {"attn.c_attn.weight": (3 * n_embd, n_embd), "attn.c_proj.weight": (n_embd, n_embd),
             "mlp.c_fc.weight": (4 * n_embd, n_embd), "mlp.c_proj.weight": (n_embd, 4 * n_embd)}
    per_block = sum(a * b for a, b in block.values())
    n_layer = max(1, params_wanted // (2 * per_block))
    vocab = max(1, (params_wanted - n_layer * per_block) // n_embd)
    shapes = {"transformer.wte.weight": (vocab, n_embd)}
    for layer in range(n_layer):
        for name, shape in block.items():
            shapes[f"transformer.h.{layer}.{name}"] = shape
    model = {name: torch.randn(shape) for name, shape in shapes.items()}
    optimizer = {
        "state": {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)}
                  for i, s in enumerate(shapes.values())},
        "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": list(range(len(shapes)))}],
    }
    return {"model": model, "optimizer": optimizer, "step": 100, "epoch": 0, "val_loss": None,
            "meta": {"bench": True}}


def measure_save_stall(megabytes: float = 110.0, repeats: int = 3, directory: str | Path | None = None) -> dict:
    """Median caller-side stall of async and sync saves of the same state, and their ratio."""
    state = make_state(megabytes)
    state_bytes = estimate_state_bytes(state)
    base = Path(directory) if directory else ROOT / "checkpoints"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=base))
    ck = Checkpointer(work, keep_rolling=2, keep_epoch=0, async_save=True)
    ck.prepare(state_bytes)
    async_stall, async_total, sync_stall = [], [], []
    try:
        step = 0
        for _ in range(repeats):
            step += 1
            t0 = time.perf_counter()
            ck.save(state, step=step, epoch=0, val_loss=None, tiers={"latest", "rolling"})
            t1 = time.perf_counter()
            ck.wait()  # not part of the stall: a real loop trains on while this runs
            async_stall.append(t1 - t0)
            async_total.append(time.perf_counter() - t0)

            step += 1
            t0 = time.perf_counter()
            ck.save(state, step=step, epoch=0, val_loss=None, tiers={"latest", "rolling"}, wait=True)
            sync_stall.append(time.perf_counter() - t0)
        file_bytes = (work / "latest.pt").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, s = statistics.median(async_stall), statistics.median(sync_stall)
    return {
        "state_mb": round(state_bytes / 1e6, 1),
        "file_mb": round(file_bytes / 1e6, 1),
        "repeats": repeats,
        "async_stall_s": round(a, 4),
        "sync_stall_s": round(s, 4),
        "stall_ratio_sync_over_async": round(s / a, 1),
        "async_background_write_s": round(statistics.median(async_total), 4),
        "async_stall_all_s": [round(x, 4) for x in async_stall],
        "sync_stall_all_s": [round(x, 4) for x in sync_stall],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "directory_fs": str(base),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=110.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    args = parser.parse_args()
    print(json.dumps(measure_save_stall(args.mb, args.repeats, args.dir), indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
