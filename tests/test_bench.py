"""`make bench ARGS=--quick` end to end: the report and the JSON come out with every section.

Never asserts a speed: the figures depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import report  # noqa: E402  (bench/report.py: the headings every report has)

JSON_SECTIONS = {
    "machine": ("cpu_model", "logical_cpus", "torch", "device", "load_average_start", "load_average_end"),
    "trainer_overhead": ("bare_tokens_per_sec", "trainer_tokens_per_sec", "overhead_pct_paired_median",
                         "attribution", "runs"),
    "hardware": ("tiny", "m25", "threads"),
    "data": ("prepare", "loader", "loader_share_pct"),
    "checkpoints": ("stall", "resume"),
    "memory": ("tiny_bare_peak_rss_mb", "tiny_trainer_peak_rss_mb", "m25_bare_peak_rss_mb"),
    "compile": (),
    "targets": (),
}


def test_quick_bench_writes_report_and_json(tmp_path: Path, prepared_data: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run_bench.py"), "--quick", "--out", str(out),
         "--data_dir", str(prepared_data), "--work_dir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"run_bench.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    results = json.loads((out / "benchmarks.json").read_text())
    assert results["mode"] == "quick"
    for section, keys in JSON_SECTIONS.items():
        assert section in results, f"benchmarks.json lacks {section}"
        for key in keys:
            assert key in results[section], f"benchmarks.json: {section} lacks {key}"
    assert len(results["checkpoints"]["stall"]) == 2  # ~100 MB and ~500 MB
    assert results["resume"] and results["resume"][0]["launch_to_first_step_s"] > 0
    assert {t["target"] for t in results["targets"]}  # every target is listed, met or not

    text = (out / "BENCHMARKS.md").read_text()
    positions = [text.find(heading) for heading in report.SECTIONS]
    assert all(p >= 0 for p in positions), [h for h, p in zip(report.SECTIONS, positions) if p < 0]
    assert positions == sorted(positions), "sections out of order"
    assert not re.search(r"(?<![A-Za-z])nan(?![A-Za-z])", text), "a figure came out as nan"
