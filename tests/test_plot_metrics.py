"""plot_metrics.py / common.plots: real PNGs from a metrics.jsonl; bad input is a one-line error."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from common.plots import OVERVIEW_FILE, moving_average, read_metrics, write_plots

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "src" / "plot_metrics.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE_CHARTS = ["loss.png", "learning_rate.png", "throughput.png", "grad_norm.png"]


def write_run(log_dir: Path, steps: int = 120, extras: bool = True, truncated_tail: bool = True) -> None:
    """A metrics.jsonl shaped like the trainer's: warmup + cosine lr, falling loss, evals."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "loss": 3.0 + 8.0 * math.exp(-s / 30) + 0.05 * math.sin(s),
                   "lr": 6e-4 * min(1.0, s / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)),
                   "grad_norm": 1.0 + 3 * math.exp(-s / 20), "tokens_per_sec": 4000.0 + 50 * math.sin(s / 5)}
            if extras:
                row.update(mfu=0.12, step_time=0.5, mem_rss_mb=800.0 + s, epoch=0, tokens=2048 * s)
            f.write(json.dumps(row) + "\n")
            if s % 40 == 0:
                evaluation = {"step": s, "val_loss": row["loss"] + 0.1, "val_perplexity": math.exp(row["loss"] + 0.1)}
                if extras:
                    evaluation["val_accuracy"] = 0.5 - 0.4 * math.exp(-s / 30)
                f.write(json.dumps(evaluation) + "\n")
        if truncated_tail:
            f.write(f'{{"step": {steps + 1}, "loss": 3.1')  # training killed mid-write


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_script_writes_documented_pngs(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    write_run(log_dir)
    proc = run_script(str(log_dir), "--window", "10", cwd=tmp_path)  # any cwd works
    assert proc.returncode == 0, proc.stderr
    expected = BASE_CHARTS + ["val_accuracy.png", "mfu.png", "memory.png", OVERVIEW_FILE]
    out = log_dir / "plots"
    assert proc.stdout.split() == [str(out / name) for name in expected]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # no temporary files left
    for name in expected:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 400
        assert (out / name).stat().st_size > 15_000, name  # drawn, not blank
    overview_w, overview_h = png_size(out / OVERVIEW_FILE)
    assert overview_w > png_size(out / "loss.png")[0] and overview_h > 2 * 400  # a grid, 4x2 here


def test_write_plots_minimal_metrics_to_out_dir(tmp_path: Path) -> None:
    write_run(tmp_path, steps=5, extras=False, truncated_tail=False)
    written = write_plots(tmp_path, tmp_path / "charts", window=50)
    assert [p.name for p in written] == BASE_CHARTS + [OVERVIEW_FILE]  # 2x2 overview without mfu/memory
    for p in written:
        assert p.parent == tmp_path / "charts"
        png_size(p)


def test_read_metrics_tolerates_garbage_and_duplicate_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\nnot json\n{"step": 2, "loss": 4.0}\n'
                    '{"step": 2, "loss": 3.5}\n{"step": 2, "val_loss": 3.9}\n[1, 2]\n{"step": 3, "lo')
    metrics = read_metrics(path)
    assert metrics.series("loss") == ([1, 2], [5.0, 3.5])
    assert metrics.series("val_loss", "evals") == ([2], [3.9])


def test_moving_average_is_centered_and_skips_nan() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.0, 2.0, 3.0, 4.0, 5.0]  # no lag on a trend
    assert moving_average([0.0, 3.0, 0.0, 3.0, 0.0], 3) == [0.0, 1.0, 2.0, 1.0, 0.0]
    assert moving_average([1.0, float("nan"), 3.0], 3) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("content, message", [
    (None, "no metrics file"),
    ("", "no training rows"),
    ('{"step": 5, "val_loss": 3.0}\n', "no training rows"),
])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    proc = run_script(str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("plot_metrics.py: error:")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())


def test_bad_window_is_a_user_error(tmp_path: Path) -> None:
    write_run(tmp_path, steps=3)
    with pytest.raises(UserError, match="--window"):
        write_plots(tmp_path, window=0)
