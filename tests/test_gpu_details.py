"""GPU details that can be checked without a GPU: the MFU peak table looked up by device name,
and the TF32 switch. No GPU exists here: the lookup is tested on the names
torch.cuda.get_device_name gives, and the switch is called directly (setting it needs no device);
the CUDA matmuls it speeds up are not run."""
from __future__ import annotations

import sys

import pytest
from runs import run

from common.metrics import peak_flops_for_name


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA H800", 989), ("NVIDIA H800 PCIe", 756),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A30", 165),
    ("NVIDIA A10", 125), ("NVIDIA A10G", 70), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
    ("NVIDIA RTX A6000", 155), ("NVIDIA GeForce RTX 4090", 165.2), ("Tesla T4", 65), ("NVIDIA B200", 2250),
    ("NVIDIA GB200", 2500),
])
def test_peak_table_matches_the_device_by_whole_name(name: str, tflops: float) -> None:
    assert peak_flops_for_name(name) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA RTX A3000 Laptop GPU", "NVIDIA H100", "NVIDIA GeForce GTX 1080", ""])
def test_a_device_not_in_the_table_has_no_peak(name: str) -> None:
    """No partial matches (A30 is not an A3000): without a peak the trainer measures one."""
    assert peak_flops_for_name(name) is None


def test_tf32_switch_uses_the_fp32_precision_settings() -> None:
    """In a fresh process (the settings are process-wide): after enable_tf32() cuBLAS matmuls and
    cuDNN convolutions in fp32 may use TF32, set through torch's current API; the deprecated
    allow_tf32 flags were not touched, so reading them is what raises (torch refuses a state
    that mixes both APIs, as inductor does)."""
    code = """
import torch
from common.dist import enable_tf32
enable_tf32()
print(torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
try:
    torch.backends.cuda.matmul.allow_tf32
    print("legacy readable")
except RuntimeError:
    print("legacy refused")
"""
    proc = run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["tf32 tf32", "legacy refused"]
