"""`make gpu-check` (bench/gpu_check.py) where no GPU exists: its no-GPU path, and every leg run
on CPU with a tiny model through the same code -- the real trainer processes, the SIGTERM stop
and `--resume latest` with its loss comparison, dynamo's graph-break count, the report.
What needs a GPU is not run: bf16 autocast, torch.compile's kernels, FP8 (train_fp8.py falls back
to the plain model here, with --require_fp8 left off)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from runs import REPO, run

sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--vocab_size", "50257"]


def test_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    proc = run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA GPU" in proc.stdout
    assert not any(tmp_path.iterdir())  # nothing written


def test_loss_comparison() -> None:
    ref = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    assert gpu_check.compare_losses(ref, [dict(r) for r in ref])["exact"]
    off = gpu_check.compare_losses(ref, [*ref[:2], {"step": 3, "loss": 0.5}])
    assert not off["exact"] and off["max_abs_diff"] == pytest.approx(0.5 - 1 / 3)
    assert not gpu_check.compare_losses(ref, ref[:2])["exact"]  # a missing step is not exact


@pytest.mark.slow
def test_every_leg_on_cpu_with_a_tiny_model(tmp_path: Path, prepared_data: Path) -> None:
    results = gpu_check.run_all(data_dir=str(prepared_data), work=tmp_path / "work", model_flags=TINY, steps=16,
                                batch_size=2, precision_flags=["--compile", "false"], recipes=("delayed",),
                                require_fp8=False, device=torch.device("cpu"))
    assert results["bf16"]["chunked"]["ok"] and results["bf16"]["plain"]["ok"], results["bf16"]
    # The same data, seed and weights: both cross-entropy paths give the same losses.
    assert results["bf16"]["chunked"]["final_loss"] == pytest.approx(results["bf16"]["plain"]["final_loss"], rel=1e-4)
    assert {g["graph_breaks"] for g in results["graph_breaks"].values()} == {0}
    leg = results["fp8"]["delayed"]
    assert leg["ok"] and leg["resume"]["returncode"] == 0 and 8 <= leg["resume"]["stopped_at"] < 16
    assert leg["resume"]["exact"] and leg["resume"]["steps"] == 16
    assert all(v["ok"] for v in results["verdicts"]), results["verdicts"]
    results.update(date="2026-01-01", machine={"device": "cpu", "torch": torch.__version__, "cuda": None, "te": "no"})
    text = gpu_check.render(results)
    for heading in ("## bf16 with torch.compile", "## Graph breaks", "## FP8", "## Checks"):
        assert heading in text
    assert "exact" in text and "**FAILED**" not in text
