"""Throughput, model FLOPs utilisation (MFU), ETA and memory figures.

FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B), as nanoGPT and
torchtitan use them: 6 * N for the matrix products of forward and backward over the N
non-embedding-position parameters, plus 12 * n_layer * n_embd * block_size for attention scores.
"""
from __future__ import annotations

import math
import os
import re
import time

import psutil
import torch

# Dense bf16 tensor-core peak per GPU, FLOP/s, without sparsity (vendor data sheets). A key
# matches whole words of the device name (torch.cuda.get_device_name), the longest key first:
# "H200 NVL" before "H200", and "A10" never matches an A100.
PEAK_BF16_FLOPS: dict[str, float] = {
    "B200": 2.25e15,
    "B100": 1.75e15,
    "GB200": 2.5e15,
    "H200": 989e12,
    "H200 NVL": 835e12,
    "H100 SXM": 989e12,  # also "H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "H800 PCIe": 756e12,
    "H20": 148e12,
    "GH200": 989e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 6000 Ada": 364e12,
    "RTX 5090": 209.5e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
    "A100": 312e12,
    "A800": 312e12,
    "A30": 165e12,
    "A10G": 70e12,
    "A10": 125e12,
    "A6000": 155e12,
    "A40": 150e12,
    "V100": 125e12,  # fp16; V100 has no bf16
    "T4": 65e12,  # fp16
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def flops_per_token(num_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    return 6.0 * num_params + 12.0 * n_layer * n_embd * block_size


def gpu_peak_flops(device: torch.device) -> float | None:
    """Table peak of this GPU in bf16, or None when it is not in the table (or not a GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_flops_for_name(name: str) -> float | None:
    """Table peak of the GPU called `name` (as torch.cuda.get_device_name gives it), or None."""
    normalized = " ".join(name.upper().replace("NVIDIA ", "").split())
    if "H100" in normalized and ("HBM3" in normalized or "SXM" in normalized):
        return PEAK_BF16_FLOPS["H100 SXM"]
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(key.upper())}(?![A-Z0-9])", normalized):
            return PEAK_BF16_FLOPS[key]
    return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                        repeats: int = 5) -> float:
    """Achieved FLOP/s of a large square matrix product: the practical peak of a CPU (or an
    unlisted GPU), measured rather than looked up. The fastest of `repeats` products counts, so
    a moment of contention on a shared machine does not lower the peak."""
    # A generator of its own: the measurement must not move the training run's random stream.
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    torch.matmul(a, b)  # warm up kernels and caches
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def memory_stats(device: torch.device) -> dict[str, float]:
    """GPU allocated/reserved (peak since the last call) or the process RSS, in MB."""
    if device.type == "cuda":
        stats = {"mem_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                 "mem_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    return {"mem_rss_mb": psutil.Process(os.getpid()).memory_info().rss / 2**20}


class StepTimer:
    """Wall time per optimizer step and an ETA from a moving average of recent steps."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self.avg_step_time: float | None = None
        self._start = time.perf_counter()

    def lap(self, skip_average: bool = False) -> float:
        """Seconds since the previous lap. `skip_average` keeps an evaluation or a checkpoint
        out of the ETA estimate."""
        now = time.perf_counter()
        elapsed, self._start = now - self._start, now
        if not skip_average:
            self.avg_step_time = elapsed if self.avg_step_time is None else (
                self.smoothing * self.avg_step_time + (1 - self.smoothing) * elapsed)
        return elapsed

    def eta_seconds(self, steps_left: int) -> float | None:
        return None if self.avg_step_time is None else steps_left * self.avg_step_time


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"
