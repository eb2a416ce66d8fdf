"""The bench (`make bench`): its arithmetic on metrics.jsonl rows, its report on canned results,
and one tiny real measurement (bare loop, trainer, resumed trainer) through the same code.

Never asserts a speed: the figures depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import measure  # noqa: E402
import report  # noqa: E402
import run_bench  # noqa: E402

MODE = {"steps": 6, "warmup": 1, "event_freq": 2, "repeats": 1, "resume_steps": 1, "eval_batches": 1,
        "sample_tokens": 2, "peak_n": 64, "loader_batches": 20, "variant_steps": 3, "budget_mb": 900,
        "budget_max_batch": 4, "fast_model": ["--block_size", "8", "--batch_size", "1", "--total_batch_size", "8"],
        "fast_steps": 6, "fast_warmup": 1, "fast_repeats": 1,
        "model": ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "2",
                  "--total_batch_size", "64", "--cpu_threads", "1"]}


def _process(rss: float) -> dict[str, Any]:
    return {"launch_unix": 1e9, "wall_s": 9.0, "peak_rss_mb": rss, "other_load_cores": 0.25}


def _bare(step_s: float) -> dict[str, Any]:
    return {"process": _process(600.0), "device": "cpu", "torch": "2.13.0+cpu", "threads": 2, "precision": "fp32",
            "params": 1_600_000, "flops_per_token": 9.7e6, "tokens_per_step": 64, "steps": 5, "seconds": 5 * step_s,
            "step_s": step_s, "step_median_s": step_s, "tokens_per_sec": 64 / step_s, "loader_share": 0.0004,
            "loader_tokens_per_sec": 2e6, "peak_flops": 1.2e11, "cuda_peak_allocated_mb": None}


def _trainer(step_s: float, event_s: float) -> dict[str, Any]:
    return {"process": _process(650.0), "steps": 5, "seconds": 5 * step_s, "step_s": step_s,
            "tokens_per_sec": 64 / step_s, "step_median_s": step_s - event_s / 2, "events": 2,
            "event_s": event_s, "eval_s": event_s / 2, "sample_s": event_s / 4, "first_row_step": 1,
            "launch_to_first_row_s": 4.2,
            "first_step_s": 0.2, "startup_s": 4.0, "cuda_peak_allocated_mb": None, "checkpoint_mb": 19.5}


def _probe(state_mb: float, peak_mb: float) -> dict[str, Any]:
    return {"process": _process(900.0), "params": 1_000_000, "world_size": 2, "device": "cpu",
            "peak_kind": "resident set above the one before the model was built", "ranks": [], "state_mb": state_mb,
            "params_mb": state_mb / 4,
            "grads_mb": state_mb / 4, "optimizer_mb": state_mb / 2, "peak_mb": peak_mb}


def canned_results(rounds: list[dict[str, Any]] | None = None, mode: dict[str, Any] = MODE) -> dict[str, Any]:
    """Results as run_bench.main assembles them, from canned (or given) processes' figures."""
    if rounds is None:
        rounds = [{"order": "bare trainer", "bare": _bare(0.10), "trainer": _trainer(0.11, 0.02),
                   "resumed": _trainer(0.10, 0.0)},
                  {"order": "trainer bare", "bare": _bare(0.12), "trainer": _trainer(0.12, 0.01),
                   "resumed": _trainer(0.10, 0.0)}]
    # At fast steps the median trainer process takes 2 ms longer than the median bare process.
    fast = [{"order": "bare trainer", "bare": _bare(0.010), "trainer": _trainer(0.011, 0.0)},
            {"order": "trainer bare", "bare": _bare(0.012), "trainer": _trainer(0.015, 0.0)}]
    ov = run_bench.summarize_overhead(rounds, fast, ["--use_tensorboard", "true"], mode)
    ckpt_rounds = [{"order": "async sync", "async": _trainer(0.1, 0.01), "sync": _trainer(0.12, 0.2)}]
    results = {
        "command": "bench/run_bench.py --quick", "mode": "quick", "config": "configs/tiny_cpu.json",
        "date": "2026-01-01T00:00:00+00:00", "duration_s": 60.0,
        "machine": {"cpu_model": "a CPU", "logical_cpus": 2, "usable_cpus": 2, "memory_gb": 24.0, "platform": "Linux",
                    "python": "3.11", "git_commit": "abc1234", "load_average_start": [0.5, 0.5, 0.5],
                    "load_average_end": [1.0, 0.7, 0.6], "device": "cpu", "torch": "2.13.0+cpu",
                    "other_load_cores": measure.spread([0.1, 0.3])},
        "data": {"dir": "data/stdlib", "train_tokens": 1_000_000, "prepared_now": False},
        "overhead": ov, **run_bench.derived_sections(ov, mode),
        "checkpoints": [run_bench.summarize_checkpoints("the overhead model", [], 3, ckpt_rounds)],
        "parallel_memory": run_bench.summarize_parallel_memory(
            ["--n_layer", "2"], [{"order": "ddp fsdp", "ddp": _probe(16.0, 20.0), "fsdp": _probe(8.0, 12.0)}]),
    }
    results["cross_entropy"] = run_bench.summarize_variant("cross_entropy", [
        {"order": "chunked plain", "chunked": _bare(0.08), "plain": {**_bare(0.10), "process": _process(900.0)}}])
    results["adamw"] = run_bench.summarize_variant("adamw", [
        {"order": "fused foreach", "fused": _bare(0.10), "foreach": _bare(0.11)}])
    results["memory_budget"] = {"budget_mb": 900, "max_batch": 64, "block_size": 32, "paths": {
        "chunked": run_bench.summarize_budget([{"batch": b, "peak_mb": 600 + b, "tokens_per_sec": 640.0}
                                               for b in (1, 2, 4, 8, 16, 32, 64)], 900),
        "plain": run_bench.summarize_budget([{"batch": b, "peak_mb": 600 + 60 * b, "tokens_per_sec": 600.0}
                                             for b in (1, 2, 4, 8)], 900)}}
    results["targets"] = run_bench.targets(results)
    return results


# The sections docs/BENCHMARKS.md must have, in order (issues 11 and 16).
HEADINGS = ("## How it was run", "## 1. Trainer overhead", "## 2. MFU", "## 3. Data loader", "## 4. Checkpoint stall",
            "## 5. Launch to first step", "## 6. Peak memory", "## 7. Cross-entropy: chunked against plain",
            "## 8. Micro-batch within a memory budget", "## 9. AdamW: fused against foreach",
            "## 10. Memory per rank, ddp against fsdp", "## Targets")


def check_report(text: str) -> None:
    positions = [text.find(heading) for heading in HEADINGS]
    assert all(p >= 0 for p in positions), [h for h, p in zip(HEADINGS, positions) if p < 0]
    assert positions == sorted(positions), "sections out of order"
    assert not re.search(r"(?<![A-Za-z])(nan|inf|None)(?![A-Za-z])", text), "a figure came out malformed"
    assert "every 250 steps" in text  # the overhead at the presets' frequency beside the bench's


def test_step_window_splits_steps_from_events() -> None:
    """Rows 2..6, 64 tokens a step, each step 0.1 s, 0.01 s between steps, 0.31 s after step 4."""
    rows, t = [], 100.0
    for step in range(2, 7):
        t += 0.1 + (0.01 if step != 5 else 0.31)
        rows.append({"step": step, "time": t, "tokens": 64 * step, "step_time": 0.1})
    figures = measure.step_window(rows, event_freq=4)
    assert figures["steps"] == 4 and figures["events"] == 1
    assert figures["event_s"] == pytest.approx(0.30)
    assert figures["tokens_per_sec"] == pytest.approx(4 * 64 / (4 * 0.11 + 0.30))
    assert figures["step_median_s"] == pytest.approx(0.11)
    with pytest.raises(ValueError, match="one row per step"):
        measure.step_window(rows[::2], event_freq=4)


def test_step_rows_leave_out_evaluations_and_events(tmp_path: Path) -> None:
    """A skipped step writes an event row (no `time`, no `step_time`) between the step rows."""
    rows = [{"step": 1, "loss": 5.0, "step_time": 0.1, "time": 1.0}, {"step": 2, "event": "skip", "skipped_step": 1},
            {"step": 2, "loss": 4.0, "step_time": 0.1, "time": 1.1}, {"step": 2, "val_loss": 4.5, "val_seconds": 0.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["loss"] for r in measure.read_rows(tmp_path)] == [5.0, 4.0]


def test_alternate_reverses_the_order_every_other_round() -> None:
    calls: list[str] = []
    rounds = measure.alternate([("a", lambda i: calls.append(f"a{i}") or {}),
                                ("b", lambda i: calls.append(f"b{i}") or {})], 3)
    assert calls == ["a0", "b0", "b1", "a1", "a2", "b2"]
    assert [r["order"] for r in rounds] == ["a b", "b a", "a b"]


def test_report_has_every_section_and_rejects_malformed_figures() -> None:
    results = canned_results()
    text = report.render(results)
    check_report(text)
    ov = results["overhead"]
    # Round 1: bare step 0.10 s, events every 2 steps stalling 0.02 s, of which the evaluation 0.01 s
    # and the sample 0.005 s; 2 ms extra per step (fast steps). The trainer's own: (2 ms + 5 ms / 2)
    # / 100 ms; with the evaluation and sample: (2 ms + 20 ms / 2) / 100 ms; every 250 steps:
    # (2 ms + 5 ms / 250) / 100 ms. The direct comparison: (0.10 + 0.02 / 2) / 0.10 - 1.
    assert "| 1 | bare trainer | 640 | 582 | 4.50% | 12.0% | 10.0% | 10.0% | 0.25 / 0.25 |" in text
    first = ov["rounds"][0]
    assert first["preset_overhead_pct"] == pytest.approx(100 * (0.002 + 0.005 / 250) / 0.10)
    assert first["preset_with_work_pct"] == pytest.approx(100 * (0.002 + 0.02 / 250) / 0.10)
    assert ov["step_extra_ms"] == pytest.approx(2.0) and "per step, 2.0 ms (measured" in text
    assert ov["machinery_event_s"]["median"] == pytest.approx((0.005 + 0.0025) / 2)
    assert "| 2 | trainer bare | 12.0 | 15.0 |" in text  # the fast steps, ms
    assert "forward passes (0.01 s (0.01..0.01))" in text
    assert "| fsdp / ddp |  |  |  | **0.50 (0.50..0.50)** | **0.60 (0.60..0.60)** |" in text
    targets = {t["target"]: t["met"] for t in results["targets"]}
    assert [met for target, met in targets.items() if target.startswith("trainer overhead")] == [False, True]
    assert targets["fsdp parameters + gradients + optimizer state per rank <= 0.55x ddp's"] is True
    assert targets["fsdp peak memory per rank <= 0.55x ddp's"] is False

    broken = copy.deepcopy(results)
    broken["checkpoints"][0]["sync_stall_s"]["median"] = math.nan
    with pytest.raises(ValueError, match="not a finite figure"):
        report.render(broken)
    assert "**chunked / plain: 1.250 (1.250..1.250) times the tokens/s, 0.67 (0.67..0.67) times" in text
    assert "chunked **64 or more (the cap)**, plain **4**" in text
    assert "| 8 | 608 MB | 1,080 MB (over) |" in text

    broken = copy.deepcopy(results)
    del broken["loader"]
    with pytest.raises(KeyError):
        report.render(broken)


def test_budget_search_doubles_until_over_the_budget_or_the_cap(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Peak memory grows with the micro-batch: each path stops at its first size over the budget;
    one that never passes it stops at the cap. Each size is one bare-loop run with its flags."""
    calls: list[list[str]] = []

    def fake_bare_run(flags: list[str], warmup: int, run_dir: Path, peak_n: int, loader_batches: int) -> dict[str, Any]:
        calls.append(flags)
        batch = int(flags[flags.index("--batch_size") + 1])
        per_sample = 10 if "on" in flags else 150
        assert flags[flags.index("--total_batch_size") + 1] == str(batch * 32)
        return {"cuda_peak_allocated_mb": None, "process": _process(500 + per_sample * batch), "tokens_per_sec": 1.0}

    monkeypatch.setattr(measure, "bare_run", fake_bare_run)
    out = run_bench.budget_section({"budget_mb": 900, "budget_max_batch": 16}, ["--x"], 32, tmp_path)
    chunked, plain = out["paths"]["chunked"], out["paths"]["plain"]
    assert [t["batch"] for t in chunked["tried"]] == [1, 2, 4, 8, 16] and chunked["largest"] == 16 and chunked["capped"]
    assert [t["batch"] for t in plain["tried"]] == [1, 2, 4] and plain["largest"] == 2 and not plain["capped"]
    assert len(calls) == 8


@pytest.mark.slow
def test_tiny_real_variants_run_each_side(tmp_path: Path, prepared_data: Path) -> None:
    """The bare loop really takes each side's flags: chunked and plain cross-entropy, fused and
    foreach AdamW (the loop reports what it ran)."""
    flags = ["--config", "configs/tiny_cpu.json", "--data_dir", str(prepared_data), *MODE["model"]]
    ce = run_bench.variant_section("cross_entropy", MODE, flags, tmp_path)
    adamw = run_bench.variant_section("adamw", MODE, flags, tmp_path)
    (ce_round,), (adamw_round,) = ce["rounds"], adamw["rounds"]
    assert ce_round["chunked"]["fused_ce"] is True and ce_round["plain"]["fused_ce"] is False
    assert adamw_round["fused"]["adamw"] == "fused" and adamw_round["foreach"]["adamw"] == "foreach"
    assert ce_round["chunked"]["steps"] == MODE["variant_steps"] - MODE["warmup"]


@pytest.mark.slow
def test_tiny_real_measurement_reaches_the_report(tmp_path: Path, prepared_data: Path) -> None:
    """The bare loop, the trainer and its resume as real processes on a 1-layer model."""
    flags = ["--config", "configs/tiny_cpu.json", "--data_dir", str(prepared_data), *MODE["model"]]
    ov = run_bench.overhead_section(MODE, flags, tmp_path)
    (r,) = ov["rounds"]
    assert r["trainer"]["steps"] == r["bare"]["steps"] == MODE["steps"] - MODE["warmup"]
    assert r["trainer"]["events"] == 2  # after steps 2 and 4 (the one after step 6 ends the run)
    assert r["trainer"]["eval_s"] > 0 and r["trainer"]["sample_s"] > 0  # the trainer's own clock, read back
    (fast,) = ov["fast_rounds"]
    assert fast["bare"]["tokens_per_step"] == 8 and fast["trainer"]["steps"] == MODE["fast_steps"] - MODE["fast_warmup"]
    assert r["resumed"]["first_row_step"] == MODE["steps"] + 1
    for run in (r["bare"], r["trainer"], r["resumed"]):
        assert run["process"]["peak_rss_mb"] > 100
    check_report(report.render(canned_results(ov["rounds"])))


def test_children_read_the_tiktoken_cache_the_bench_was_pointed_at(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """The bench's processes run in the repository: a cache directory given relative to where the
    bench was started reaches them as the same directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "cache")
    assert measure.child_env()["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "cache")


@pytest.mark.slow
def test_a_trainer_run_without_its_text_samples_is_not_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                prepared_data: Path) -> None:
    """A tokenizer that cannot load costs a run its samples, not the run: the bench must then not
    report that run as one with every feature on."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    flags = ["--config", "configs/tiny_cpu.json", "--data_dir", str(prepared_data), *MODE["model"],
             "--max_steps", "2", "--eval_freq", "2", "--eval_batches", "1", "--sample_tokens", "2"]
    with pytest.raises(RuntimeError, match="without its text samples.*cannot load tokenizer"):
        measure.trainer_run(flags, tmp_path / "run", "fresh")


@pytest.mark.slow
def test_memory_per_rank_of_ddp_and_fsdp_at_two_ranks(tmp_path: Path) -> None:
    """bench/memory_probe.py under real torchrun: fsdp holds half of ddp's parameters, gradients and
    optimizer state per rank (byte counts, not speeds: exact up to AdamW's replicated step counts)."""
    mode = {"memory_model": ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--vocab_size", "512",
                             "--block_size", "16", "--batch_size", "1", "--total_batch_size", "32"],
            "memory_steps": 1, "memory_repeats": 1}
    section = run_bench.parallel_memory_section(mode, tmp_path)
    (r,) = section["rounds"]
    assert r["ddp"]["params"] == r["fsdp"]["params"] and r["ddp"]["world_size"] == 2
    for side in ("ddp", "fsdp"):
        assert r[side]["state_mb"] == pytest.approx(r[side]["params_mb"] * 4, rel=1e-3)  # grads 1x, AdamW 2x
        assert r[side]["peak_mb"] >= r[side]["state_mb"]
    assert section["state_ratio"]["median"] == pytest.approx(0.5, abs=0.01)
