"""Data pipeline throughput: prepare_data.py on `stdlib` with 1 and N workers, and the tokens/s the
training loader serves from plain and lz4 shards.

    python bench/data_bench.py [--max_tokens 4000000] [--workers N] [--batches 2000]

Prints one JSON object. `bench/run_bench.py` imports `run_all` (or the single measurements).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

SHARD_TOKENS = 1_000_000  # several shards, so the loader's shard switches (lz4 decompression) are measured


def _env() -> dict[str, str]:
    # Offline, TIKTOKEN_CACHE_DIR must point at a tiktoken cache (as for prepare_data.py itself).
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))


def prepare_command(out: Path, workers: int, max_tokens: int, compress: str = "lz4") -> list[str]:
    return [sys.executable, str(SRC / "prepare_data.py"), "--dataset", "stdlib", "--out", str(out),
            "--max_tokens", str(max_tokens), "--shard_tokens", str(SHARD_TOKENS), "--workers", str(workers),
            "--compress", compress]


def bench_prepare(out: Path, workers: int, max_tokens: int, compress: str = "lz4") -> dict[str, Any]:
    """Tokens/s of one fresh prepare_data.py run: over its tokenize+write phase, and over the whole process."""
    cmd = prepare_command(out, workers, max_tokens, compress)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    meta = json.loads((out / "meta.json").read_text())
    tokens = sum(e["tokens"] for e in meta["shards"])
    found = re.search(r"tokens in ([\d.]+)s", proc.stdout)
    phase = float(found.group(1)) if found else wall
    return {"workers": workers, "compress": compress, "tokens": tokens, "seconds": round(phase, 3),
            "tokens_per_sec": round(tokens / phase), "process_seconds": round(wall, 3),
            "process_tokens_per_sec": round(tokens / wall), "command": " ".join(cmd)}


def bench_loader(data_dir: Path, batches: int = 2000, block_size: int = 1024, batch_size: int = 8) -> dict[str, Any]:
    """Tokens/s ShardedTrainLoader serves on one rank (CPU tensors), including its first shard load."""
    import torch

    from common.data import ShardedTrainLoader

    torch.set_num_threads(1)
    loader = ShardedTrainLoader(data_dir, block_size=block_size, micro_batch_size=batch_size, seed=0)
    start = time.perf_counter()
    for _ in range(batches):
        x, _y = loader.next_batch()
    elapsed = time.perf_counter() - start
    epochs = loader.epoch
    loader.close()
    tokens = batches * batch_size * block_size
    return {"batches": batches, "batch_size": batch_size, "block_size": block_size, "epochs_touched": epochs + 1,
            "seconds": round(elapsed, 3), "tokens_per_sec": round(tokens / elapsed)}


def run_all(max_tokens: int = 4_000_000, workers: int | None = None, batches: int = 2000,
            work_dir: Path | None = None) -> dict[str, Any]:
    workers = workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        one = bench_prepare(root / "w1", 1, max_tokens)
        many = bench_prepare(root / f"w{workers}", workers, max_tokens)
        plain = bench_prepare(root / "plain", workers, max_tokens, compress="none")
        loader_plain = bench_loader(root / "plain", batches)
        loader_lz4 = bench_loader(root / f"w{workers}", batches)
    return {
        "prepare_stdlib": {"workers_1": one, f"workers_{workers}": many, "plain_shards": plain,
                           "speedup": round(many["tokens_per_sec"] / one["tokens_per_sec"], 2)},
        "loader": {"plain": loader_plain, "lz4": loader_lz4,
                   "lz4_vs_plain": round(loader_lz4["tokens_per_sec"] / loader_plain["tokens_per_sec"], 2)},
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_tokens", type=int, default=4_000_000)
    p.add_argument("--workers", type=int, default=None, help="the N of the N-worker run (default: all cores)")
    p.add_argument("--batches", type=int, default=2000, help="loader micro-batches of 8 x 1024 tokens")
    args = p.parse_args()
    print(json.dumps(run_all(args.max_tokens, args.workers, args.batches), indent=1))


if __name__ == "__main__":
    main()
