"""`make bench`: where the trainer's time and memory go, measured side by side, written to
docs/BENCHMARKS.md and docs/benchmarks.json.

    python bench/run_bench.py [--quick] [--out docs] [--data_dir DIR] [--config FILE]
                              [--work_dir DIR] [--keep_work] [--render JSON]

Every comparison runs its two sides as separate processes, one after the other, in alternated
repeats (A B, B A, ...), and reports per-round ratios, medians and their spread. The sections:
trainer overhead against the bare loop (at the bench's evaluation and checkpoint frequency and at
the presets'), MFU against a measured matmul peak, data loader throughput, checkpoint stall async
against sync, launch to first step fresh against resumed, peak memory; then the bare loop with one
setting changed: cross-entropy chunked against plain (tokens/s, peak memory, and the largest
micro-batch within a memory budget) and AdamW fused against foreach; and per-rank memory of
`--parallel ddp` against `fsdp` at 2 ranks on the same model. `--quick` runs them all in reduced
size (three to four minutes on 2 CPU cores; the full run 15 to 20).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import measure
import report
from measure import REPO, spread

PRESET_FREQ = 250  # eval_freq and checkpoint_freq of configs/base.json, which the presets extend
OVERHEAD_TARGET_PCT = 2.0
LOADER_SHARE_TARGET_PCT = 1.0
FSDP_MEMORY_TARGET = 0.55  # fsdp's per-rank memory over ddp's, at 2 ranks (issue 13)
# One thread per process in --quick: with two or more, every parallel region waits for its slowest
# thread, and on a machine that others load, a descheduled thread stalls a short step many times over.
QUICK_MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--batch_size", "2",
               "--total_batch_size", "64", "--cpu_threads", "1"]
SMALL_BATCH = ["--block_size", "64", "--batch_size", "1", "--total_batch_size", "64"]  # a save's cost, fast steps
# Steps of 16 tokens: the same parameters (so the same optimizer step and gradient clipping), so
# little compute that the trainer's own per-step work stands out of the machine's noise. A process
# here may run all its steps at one of two speeds (about 35 or 58 ms a step for the same bare loop,
# steady within the process): hence more rounds, and the median process of each side.
FAST_STEP = ["--block_size", "16", "--batch_size", "1", "--total_batch_size", "16"]

# Steps are optimizer steps; the first `warmup` are left out of every rate. The overhead window
# (steps warmup+1 .. steps) holds evaluations and checkpoints exactly every `event_freq` steps.
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "model": [], "steps": 55, "warmup": 5, "event_freq": 50, "repeats": 3, "resume_steps": 3,
        "eval_batches": 4, "sample_tokens": 64, "peak_n": 2048, "loader_batches": 2000,
        "fast_model": FAST_STEP, "fast_steps": 150, "fast_warmup": 20, "fast_repeats": 6,
        "checkpoint_models": [("the overhead model", SMALL_BATCH),
                              ("~25M", ["--n_layer", "4", "--n_head", "6", "--n_embd", "384", *SMALL_BATCH])],
        "checkpoint_steps": 32, "checkpoint_freq": 10, "checkpoint_repeats": 2, "prepare_tokens": 3_000_000,
        "variant_steps": 20, "budget_mb": 1500, "budget_max_batch": 256,
        # Blocks dominate its parameters (a small vocabulary: the probe trains on random tokens).
        "memory_model": ["--n_layer", "16", "--n_head", "8", "--n_embd", "512", "--vocab_size", "8192",
                         "--block_size", "64", "--batch_size", "1", "--total_batch_size", "128"],
        "memory_steps": 3, "memory_repeats": 2,
    },
    "quick": {
        "model": QUICK_MODEL, "steps": 16, "warmup": 2, "event_freq": 7, "repeats": 2, "resume_steps": 2,
        "eval_batches": 2, "sample_tokens": 8, "peak_n": 1024, "loader_batches": 300,
        "fast_model": ["--block_size", "8", "--batch_size", "1", "--total_batch_size", "8"], "fast_steps": 60,
        "fast_warmup": 10, "fast_repeats": 2,
        "checkpoint_models": [("the overhead model", [])],
        "checkpoint_steps": 8, "checkpoint_freq": 3, "checkpoint_repeats": 2, "prepare_tokens": 1_000_000,
        "variant_steps": 8, "budget_mb": 700, "budget_max_batch": 32,
        "memory_model": ["--n_layer", "4", "--n_head", "4", "--n_embd", "256", "--vocab_size", "4096",
                         "--block_size", "32", "--batch_size", "1", "--total_batch_size", "64"],
        "memory_steps": 2, "memory_repeats": 2,
    },
}


def overhead_section(mode: dict[str, Any], model_flags: list[str], work: Path) -> dict[str, Any]:
    """Bare loop against the trainer with every feature on, alternated; each trainer run is then
    resumed for a few steps (launch to first step, fresh against resumed). Then the same pair at
    fast steps, for the trainer's cost per step."""
    steps, warmup, freq = mode["steps"], mode["warmup"], mode["event_freq"]
    features = ["--use_tensorboard", "true", "--eval_freq", str(freq), "--checkpoint_freq", str(freq),
                "--async_checkpoint", "true", "--eval_batches", str(mode["eval_batches"]),
                "--sample_tokens", str(mode["sample_tokens"]), "--viz_freq", str(freq), "--histogram_freq", "0"]
    run_flags = [*model_flags, "--max_steps", str(steps)]
    resume_flags = [*model_flags, "--max_steps", str(steps + mode["resume_steps"]), *features]
    resumed: dict[int, dict[str, Any]] = {}

    def trainer_then_resumed(i: int) -> dict[str, Any]:
        fresh = measure.trainer_run([*run_flags, *features], work / f"trainer_{i}", "fresh", warmup=warmup,
                                    event_freq=freq)
        resumed[i] = measure.trainer_run(resume_flags, work / f"trainer_{i}", "resumed", after_step=steps,
                                         extra=["--resume", "latest"])
        return fresh

    rounds = measure.alternate([
        ("bare", lambda i: measure.bare_run(run_flags, warmup, work / f"bare_{i}", mode["peak_n"],
                                            mode["loader_batches"])),
        ("trainer", trainer_then_resumed),
    ], mode["repeats"])
    for i, r in enumerate(rounds):
        r["resumed"] = resumed[i]
    return summarize_overhead(rounds, fast_step_rounds(mode, model_flags, work / "fast"), features, mode)


def fast_step_rounds(mode: dict[str, Any], model_flags: list[str], work: Path) -> list[dict[str, Any]]:
    """Bare loop against the trainer at fast steps (`fast_model`), alternated, with the trainer's
    per-step features on and no evaluation or checkpoint in the window: the trainer's own cost per
    step (metrics row, TensorBoard scalars, the stop-signal agreement, the skip guard, gradient
    clipping), which at full steps hides in the machine's noise."""
    steps, warmup = mode["fast_steps"], mode["fast_warmup"]
    flags = [*model_flags, *mode["fast_model"], "--max_steps", str(steps)]
    per_step = ["--use_tensorboard", "true", "--async_checkpoint", "true", "--eval_freq", "0",
                "--checkpoint_freq", str(steps + 1), "--viz_freq", "0", "--histogram_freq", "0"]
    return measure.alternate([
        ("bare", lambda i: measure.bare_run(flags, warmup, work / f"bare_{i}", peak_n=256, loader_batches=10)),
        ("trainer", lambda i: measure.trainer_run([*flags, *per_step], work / f"trainer_{i}", "fast", warmup=warmup,
                                                  event_freq=steps + 1)),
    ], mode["fast_repeats"])


def summarize_overhead(rounds: list[dict[str, Any]], fast_rounds: list[dict[str, Any]], features: list[str],
                       mode: dict[str, Any]) -> dict[str, Any]:
    """The trainer's overhead: its extra seconds per step (at fast steps, where they stand out of
    the noise: the median trainer process's median step minus the median bare process's) plus its
    machinery at an event spread over the events' frequency, against the bare
    loop's median step; also with the evaluation's and sample's forward passes, and, per round,
    the direct comparisons (end to end, and median step plus events), which carry the noise of
    two processes."""
    extra_s = (statistics.median(r["trainer"]["step_median_s"] for r in fast_rounds)
               - statistics.median(r["bare"]["step_median_s"] for r in fast_rounds))
    for r in rounds:
        t, bare_s = r["trainer"], r["bare"]["step_median_s"]
        # The evaluation's and the sample's own forward passes: work the run asks for, which the
        # bare loop does not do. The rest of an event's stall is the trainer's machinery.
        r["machinery_event_s"] = t["event_s"] - (t["eval_s"] or 0.0) - (t["sample_s"] or 0.0)

        def pct(event_s: float, freq: int, bare_s: float = bare_s) -> float:
            return 100 * (extra_s + event_s / freq) / bare_s

        r["overhead_pct"] = pct(r["machinery_event_s"], mode["event_freq"])
        r["preset_overhead_pct"] = pct(r["machinery_event_s"], PRESET_FREQ)
        r["with_work_pct"] = pct(t["event_s"], mode["event_freq"])
        r["preset_with_work_pct"] = pct(t["event_s"], PRESET_FREQ)
        r["end_to_end_pct"] = 100 * (t["step_s"] / r["bare"]["step_s"] - 1)
        r["median_step_pct"] = 100 * ((t["step_median_s"] + t["event_s"] / mode["event_freq"]) / bare_s - 1)
    per_round = ("overhead_pct", "preset_overhead_pct", "with_work_pct", "preset_with_work_pct", "end_to_end_pct",
                 "median_step_pct", "machinery_event_s")
    return {"features": features, "steps": mode["steps"], "warmup": mode["warmup"], "event_freq": mode["event_freq"],
            "preset_freq": PRESET_FREQ, "rounds": rounds, "fast_rounds": fast_rounds,
            "fast_steps": mode["fast_steps"], "fast_warmup": mode["fast_warmup"], "fast_model": mode["fast_model"],
            "step_extra_ms": 1e3 * extra_s,
            **{key: spread([r[key] for r in rounds]) for key in per_round},
            **{key: spread([r["trainer"][key] or 0.0 for r in rounds]) for key in ("event_s", "eval_s", "sample_s")}}


def derived_sections(ov: dict[str, Any], mode: dict[str, Any]) -> dict[str, Any]:
    """MFU, loader, start-up and memory, from the overhead section's processes."""
    rounds = ov["rounds"]
    bares, trainers, resumed = ([r[k] for r in rounds] for k in ("bare", "trainer", "resumed"))
    first = bares[0]

    def flops(run: dict[str, Any]) -> float:
        return first["flops_per_token"] * run["tokens_per_sec"]

    def rss(runs: list[dict[str, Any]]) -> list[float]:
        return [run["process"]["peak_rss_mb"] for run in runs]

    return {
        "mfu": {
            "params": first["params"], "flops_per_token": first["flops_per_token"], "peak_n": mode["peak_n"],
            "peak_gflops": spread([b["peak_flops"] / 1e9 for b in bares]),
            "bare_gflops": spread([flops(b) / 1e9 for b in bares]),
            "trainer_gflops": spread([flops(t) / 1e9 for t in trainers]),
            "bare_mfu_pct": spread([100 * flops(b) / b["peak_flops"] for b in bares]),
            "trainer_mfu_pct": spread([100 * flops(t) / b["peak_flops"] for b, t in zip(bares, trainers)]),
        },
        "loader": {
            "batches": mode["loader_batches"],
            "tokens_per_sec": spread([b["loader_tokens_per_sec"] for b in bares]),
            "over_training": spread([b["loader_tokens_per_sec"] / b["tokens_per_sec"] for b in bares]),
            "share_of_step_pct": spread([100 * b["loader_share"] for b in bares]),
        },
        "startup": {
            "rounds": [{key: {"fresh": t[key], "resumed": s[key]}
                        for key in ("startup_s", "first_step_s", "launch_to_first_row_s")}
                       for t, s in zip(trainers, resumed)],
            "resumed_over_fresh": spread([s["startup_s"] / t["startup_s"] for t, s in zip(trainers, resumed)]),
            "checkpoint_mb": trainers[0]["checkpoint_mb"],
        },
        "memory": {
            "bare_mb": spread(rss(bares)), "trainer_mb": spread(rss(trainers)), "resumed_mb": spread(rss(resumed)),
            "trainer_over_bare": spread([t / b for b, t in zip(rss(bares), rss(trainers))]),
            "cuda_bare_mb": first["cuda_peak_allocated_mb"], "cuda_trainer_mb": trainers[0]["cuda_peak_allocated_mb"],
        },
    }


def checkpoint_section(mode: dict[str, Any], data_flags: list[str], work: Path) -> list[dict[str, Any]]:
    """The trainer with --async_checkpoint true and false, alternated, a save every few steps and
    nothing else between steps; per model size."""
    freq, out = mode["checkpoint_freq"], []
    for k, (label, shape) in enumerate(mode["checkpoint_models"]):
        flags = [*data_flags, *mode["model"], *shape, "--max_steps", str(mode["checkpoint_steps"]),
                 "--checkpoint_freq", str(freq), "--eval_freq", "1000000", "--sample_tokens", "0",
                 "--use_tensorboard", "false", "--histogram_freq", "0"]

        def side(value: str, k: int = k, flags: list[str] = flags) -> Any:
            return lambda i: measure.trainer_run([*flags, "--async_checkpoint", value], work / f"ckpt{k}_{value}_{i}",
                                                 "run", warmup=mode["warmup"], event_freq=freq)

        rounds = measure.alternate([("async", side("true")), ("sync", side("false"))], mode["checkpoint_repeats"])
        out.append(summarize_checkpoints(label, shape, freq, rounds))
    return out


def summarize_checkpoints(label: str, flags: list[str], freq: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": label, "flags": flags, "checkpoint_mb": rounds[0]["async"]["checkpoint_mb"], "every": freq,
        "saves_per_run": rounds[0]["async"]["events"], "rounds": rounds,
        "async_stall_s": spread([r["async"]["event_s"] for r in rounds]),
        "sync_stall_s": spread([r["sync"]["event_s"] for r in rounds]),
        "sync_over_async": spread([r["sync"]["event_s"] / r["async"]["event_s"] for r in rounds]),
        "async_over_sync_tokens_per_sec": spread([r["async"]["tokens_per_sec"] / r["sync"]["tokens_per_sec"]
                                                  for r in rounds]),
    }


# One setting of the bare loop changed, the rest as the overhead section's: (name, flags) per side.
VARIANTS: dict[str, tuple[tuple[str, list[str]], tuple[str, list[str]]]] = {
    "cross_entropy": (("chunked", ["--fused_ce", "on"]), ("plain", ["--fused_ce", "off"])),
    "adamw": (("fused", ["--bench_adamw", "fused"]), ("foreach", ["--bench_adamw", "foreach"])),
}


def peak_mb(run: dict[str, Any]) -> float:
    """What a step needs at most: CUDA's peak allocation on a GPU, the process's peak RSS elsewhere."""
    cuda = run["cuda_peak_allocated_mb"]
    return cuda if cuda is not None else run["process"]["peak_rss_mb"]


def variant_section(name: str, mode: dict[str, Any], model_flags: list[str], work: Path) -> dict[str, Any]:
    """The bare loop with each side's flags, alternated: tokens/s and peak memory per side."""
    (a, a_flags), (b, b_flags) = VARIANTS[name]

    def side(flags: list[str], label: str) -> Any:
        return lambda i: measure.bare_run([*model_flags, "--max_steps", str(mode["variant_steps"]), *flags],
                                          mode["warmup"], work / f"{name}_{label}_{i}", peak_n=64, loader_batches=1)

    rounds = measure.alternate([(a, side(a_flags, a)), (b, side(b_flags, b))], mode["repeats"])
    return summarize_variant(name, rounds)


def summarize_variant(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    (a, a_flags), (b, b_flags) = VARIANTS[name]
    return {
        "sides": [a, b], "flags": {a: a_flags, b: b_flags}, "rounds": rounds,
        "tokens_per_sec": {side: spread([r[side]["tokens_per_sec"] for r in rounds]) for side in (a, b)},
        "peak_mb": {side: spread([peak_mb(r[side]) for r in rounds]) for side in (a, b)},
        "speedup": spread([r[a]["tokens_per_sec"] / r[b]["tokens_per_sec"] for r in rounds]),
        "memory_ratio": spread([peak_mb(r[a]) / peak_mb(r[b]) for r in rounds]),
    }


def budget_section(mode: dict[str, Any], model_flags: list[str], block_size: int, work: Path) -> dict[str, Any]:
    """Per cross-entropy path, the largest micro-batch whose two-step run stays within the budget:
    micro-batches 1, 2, 4 ... until one passes it (or the cap is reached)."""
    budget, cap = mode["budget_mb"], mode["budget_max_batch"]
    out: dict[str, Any] = {"budget_mb": budget, "max_batch": cap, "block_size": block_size, "paths": {}}
    for label, flags in VARIANTS["cross_entropy"]:
        tried = []
        batch = 1
        while batch <= cap:
            run = measure.bare_run([*model_flags, *flags, "--batch_size", str(batch), "--total_batch_size",
                                    str(batch * block_size), "--max_steps", "2"], 1,
                                   work / f"budget_{label}_{batch}", peak_n=64, loader_batches=1)
            tried.append({"batch": batch, "peak_mb": peak_mb(run), "tokens_per_sec": run["tokens_per_sec"]})
            if tried[-1]["peak_mb"] > budget:
                break
            batch *= 2
        out["paths"][label] = summarize_budget(tried, budget)
    return out


def summarize_budget(tried: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    fitting = [t for t in tried if t["peak_mb"] <= budget]
    # The search ends at the first micro-batch over the budget, or at the cap with every one within it.
    return {"tried": tried, "largest": fitting[-1]["batch"] if fitting else 0,
            "capped": tried[-1]["peak_mb"] <= budget}


def parallel_memory_section(mode: dict[str, Any], work: Path) -> dict[str, Any]:
    """bench/memory_probe.py under torchrun at 2 ranks, --parallel ddp and fsdp alternated."""
    flags = [*mode["memory_model"], "--max_steps", str(mode["memory_steps"])]

    def side(parallel: str) -> Any:
        return lambda i: measure.probe_run([*flags, "--parallel", parallel], work / f"{parallel}_{i}", nproc=2)

    rounds = measure.alternate([("ddp", side("ddp")), ("fsdp", side("fsdp"))], mode["memory_repeats"])
    return summarize_parallel_memory(flags, rounds)


def summarize_parallel_memory(flags: list[str], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def ratio(key: str) -> dict[str, float]:
        return spread([r["fsdp"][key] / r["ddp"][key] for r in rounds])

    first = rounds[0]["ddp"]
    return {"flags": flags, "params": first["params"], "world_size": first["world_size"],
            "device": first["device"], "peak_kind": first["peak_kind"], "rounds": rounds,
            **{f"{side}_{key}": spread([r[side][key] for r in rounds])
               for side in ("ddp", "fsdp") for key in ("state_mb", "params_mb", "grads_mb", "optimizer_mb", "peak_mb")},
            "state_ratio": ratio("state_mb"), "peak_ratio": ratio("peak_mb")}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ov = results["overhead"]
    share = results["loader"]["share_of_step_pct"]["median"]
    pm = results["parallel_memory"]
    return [
        {"target": f"fsdp parameters + gradients + optimizer state per rank <= {FSDP_MEMORY_TARGET:g}x ddp's",
         "value": pm["state_ratio"]["median"], "met": pm["state_ratio"]["median"] <= FSDP_MEMORY_TARGET},
        {"target": f"fsdp peak memory per rank <= {FSDP_MEMORY_TARGET:g}x ddp's",
         "value": pm["peak_ratio"]["median"], "met": pm["peak_ratio"]["median"] <= FSDP_MEMORY_TARGET},
        *({"target": f"trainer overhead (per step and at events, beyond the forward passes of the evaluation "
                     f"and sample) <= {OVERHEAD_TARGET_PCT:g}%, events every {freq} steps",
           "value": ov[key]["median"], "met": ov[key]["median"] <= OVERHEAD_TARGET_PCT}
          for key, freq in (("overhead_pct", ov["event_freq"]), ("preset_overhead_pct", ov["preset_freq"]))),
        {"target": f"loader share of a bare step < {LOADER_SHARE_TARGET_PCT:g}%", "value": share,
         "met": share < LOADER_SHARE_TARGET_PCT},
    ]


# --------------------------------------------------------------------------- machine and data

def block_size(flags: list[str]) -> int:
    """The block size the trainer's own flag parsing gives these flags (config file included)."""
    sys.path.insert(0, str(REPO / "src"))
    from common.config import TrainConfig, parse_args

    cfg, _ = parse_args(flags, TrainConfig)
    return cfg.block_size


def machine_info() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or platform.machine())
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
            "platform": platform.platform(), "python": platform.python_version(), "git_commit": commit or "unknown",
            "load_average_start": list(os.getloadavg())}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _other_loads(node: Any) -> Iterator[float]:
    """Every process's `other_load_cores` inside the results."""
    if isinstance(node, dict):
        if node.get("other_load_cores") is not None and "launch_unix" in node:
            yield node["other_load_cores"]
        for value in node.values():
            yield from _other_loads(value)
    elif isinstance(node, list):
        for value in node:
            yield from _other_loads(value)


def find_data(requested: str | None, work: Path, tokens: int) -> dict[str, Any]:
    """--data_dir, else data/stdlib when complete, else a small stdlib dataset prepared under work/."""
    candidate = Path(requested).resolve() if requested else REPO / "data" / "stdlib"
    meta_file = candidate / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("complete"):
        return {"dir": str(candidate), "train_tokens": meta.get("expected_train_tokens"), "prepared_now": False}
    if requested:
        print(f"--data_dir {requested} is not a complete prepared dataset: run src/prepare_data.py first",
              file=sys.stderr)
        raise SystemExit(2)
    out = work / "data"
    measure.run_process([sys.executable, REPO / "src" / "prepare_data.py", "--dataset", "stdlib", "--out", out,
                         "--max_tokens", str(tokens), "--shard_tokens", "1000000"], work / "prepare_data.log")
    meta = json.loads((out / "meta.json").read_text())
    return {"dir": str(out), "train_tokens": meta.get("expected_train_tokens"), "prepared_now": True}


# --------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every section in reduced size")
    parser.add_argument("--out", default=str(REPO / "docs"), help="where BENCHMARKS.md and benchmarks.json go")
    parser.add_argument("--data_dir", help="a prepared dataset (default: data/stdlib when complete, else a small "
                                           "one prepared in the work directory)")
    parser.add_argument("--config", default="configs/tiny_cpu.json", help="the model and batch measured")
    parser.add_argument("--work_dir", help="runs, logs and checkpoints (default: a temporary directory)")
    parser.add_argument("--keep_work", action="store_true", help="keep the work directory")
    parser.add_argument("--render", metavar="JSON", help="only rewrite OUT/BENCHMARKS.md from a benchmarks.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        (out / "BENCHMARKS.md").write_text(report.render(json.loads(Path(args.render).read_text())))
        return 0
    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        parser.error(f"--work_dir {args.work_dir} is not empty: give a new or empty directory")

    started = time.time()
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="llm-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[bench {time.time() - started:6.1f}s] {msg}", flush=True)

    try:
        results: dict[str, Any] = {
            "command": " ".join(["bench/run_bench.py", *(sys.argv[1:] if argv is None else argv)]),
            "mode": mode_name, "config": args.config,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()}
        say(f"{mode_name} run; work directory {work}")
        data = find_data(args.data_dir, work, mode["prepare_tokens"])
        data_flags = ["--config", args.config, "--data_dir", data["dir"]]
        say("1. trainer against the bare loop, alternated; each trainer run then resumed")
        ov = overhead_section(mode, [*data_flags, *mode["model"]], work / "overhead")
        say(f"   overhead {ov['overhead_pct']['median']:+.1f}% (every {ov['event_freq']} steps), "
            f"{ov['preset_overhead_pct']['median']:+.1f}% (every {PRESET_FREQ})")
        results.update(data=data, overhead=ov, **derived_sections(ov, mode))
        say("4. checkpoint stall: async against sync, alternated")
        results["checkpoints"] = checkpoint_section(mode, data_flags, work / "checkpoints")
        model_flags = [*data_flags, *mode["model"]]
        say("7. cross-entropy: chunked against plain, alternated")
        results["cross_entropy"] = variant_section("cross_entropy", mode, model_flags, work / "variants")
        say(f"   chunked / plain: {results['cross_entropy']['speedup']['median']:.2f}x tokens/s, "
            f"{results['cross_entropy']['memory_ratio']['median']:.2f}x peak memory")
        say(f"8. the largest micro-batch within {mode['budget_mb']} MB, per cross-entropy path")
        results["memory_budget"] = budget_section(mode, model_flags, block_size(model_flags), work / "budget")
        say("9. AdamW: fused against foreach, alternated")
        results["adamw"] = variant_section("adamw", mode, model_flags, work / "variants")
        say("10. memory per rank: --parallel ddp against fsdp at 2 ranks, alternated")
        results["parallel_memory"] = parallel_memory_section(mode, work / "parallel_memory")
        say(f"   fsdp / ddp: state {results['parallel_memory']['state_ratio']['median']:.2f}, "
            f"peak {results['parallel_memory']['peak_ratio']['median']:.2f}")
        bare, loads = ov["rounds"][0]["bare"], list(_other_loads(results))
        results["machine"].update(device=bare["device"], torch=bare["torch"], load_average_end=list(os.getloadavg()),
                                  other_load_cores=spread(loads) if loads else None)
        results["duration_s"] = time.time() - started
        results["targets"] = targets(results)
        (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "BENCHMARKS.md").write_text(report.render(results))
        say(f"wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.json'}")
    finally:
        if not (args.keep_work or args.work_dir):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
