"""Run the trainer and the bare loop as processes, alternated, and read their figures from what
they write: the trainer's LOG_DIR/metrics.jsonl, the bare loop's JSON. Nothing is patched.

Per process the driver records its peak RSS (os.wait4) and the machine's load while it ran: the
CPU time of the whole machine (/proc/stat) minus the process's own, in cores.

The trainer's figures come from its metrics.jsonl step rows, one per step, each with `step`,
`time` (wall clock when the row was written, before that step's evaluation and checkpoint),
`tokens` (tokens seen so far) and `step_time` (the step's own seconds, without the evaluation
and checkpoint after the previous step). Its rate runs from the row of step `after_step + warmup`
to the last row, so whatever happens between steps counts.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "src" / "train_improved.py"
BARE_LOOP = REPO / "bench" / "bare_loop.py"
MEMORY_PROBE = REPO / "bench" / "memory_probe.py"
MB = 1e6  # every size in the bench is in MB of 10^6 bytes


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (None where /proc/stat is absent)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    """The environment of every process the bench starts. The processes run in the repository
    (cwd=REPO): a relative TIKTOKEN_CACHE_DIR, meant from where the bench was started, is made
    absolute so that they read the same tiktoken cache."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if env.get("TIKTOKEN_CACHE_DIR"):
        env["TIKTOKEN_CACHE_DIR"] = os.path.abspath(env["TIKTOKEN_CACHE_DIR"])
    return env


def run_process(cmd: Sequence[str], log_file: Path, timeout_s: float = 3600,
                extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` to its end, output to `log_file`; raise with the log's tail if it fails."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**child_env(), **(extra_env or {})}
    busy_before, launch = _busy_cpu_s(), time.time()
    with log_file.open("w") as out:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        pid = 0
        while not pid:  # wait4 rather than wait(): the child's own peak RSS and CPU time
            time.sleep(0.05)
            if time.time() - launch > timeout_s:
                proc.kill()
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    wall = time.time() - launch
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {proc.returncode} after {wall:.0f} s:\n{tail}")
    busy_after = _busy_cpu_s()
    others = None
    if busy_before is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy_before - usage.ru_utime - usage.ru_stime) / wall)
    rss_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"launch_unix": launch, "wall_s": wall, "peak_rss_mb": rss_bytes / MB, "other_load_cores": others}


def alternate(sides: Sequence[tuple[str, Callable[[int], dict[str, Any]]]], repeats: int) -> list[dict[str, Any]]:
    """Each side once per repeat, the order reversed every other repeat (A B, B A, A B ...) so a
    drift in the machine's load falls on both sides alike. One {side: figures} per repeat."""
    rounds = []
    for i in range(repeats):
        order = sides if i % 2 == 0 else sides[::-1]
        rounds.append({"order": " ".join(name for name, _ in order), **{name: fn(i) for name, fn in order}})
    return rounds


# --------------------------------------------------------------------------- the bare loop

def bare_run(flags: Sequence[str], warmup: int, run_dir: Path, peak_n: int, loader_batches: int) -> dict[str, Any]:
    result_file = run_dir / "bare.json"
    process = run_process([sys.executable, BARE_LOOP, *flags, "--bench_warmup", str(warmup),
                           "--bench_json", result_file, "--bench_peak_n", str(peak_n),
                           "--bench_loader_batches", str(loader_batches)], run_dir / "bare.log")
    raw = json.loads(result_file.read_text())
    steps = raw["step_s"][warmup:]
    seconds = sum(steps)
    tokens_per_sec = raw["tokens_per_step"] * len(steps) / seconds
    return {
        "process": process, "device": raw["device"], "torch": raw["torch"], "threads": raw["threads"],
        "precision": raw["precision"], "fused_ce": raw["fused_ce"], "adamw": raw["adamw"], "params": raw["params"],
        "flops_per_token": raw["flops_per_token"],
        "tokens_per_step": raw["tokens_per_step"], "steps": len(steps), "seconds": seconds,
        "step_s": seconds / len(steps), "step_median_s": statistics.median(steps), "tokens_per_sec": tokens_per_sec,
        "loader_share": sum(raw["loader_s"][warmup:]) / seconds,
        "loader_tokens_per_sec": raw["loader_tokens"] / raw["loader_alone_s"],
        "peak_flops": statistics.median(raw["peak_flops"]),
        "cuda_peak_allocated_mb": raw["cuda_peak_allocated_mb"],
    }


# --------------------------------------------------------------------------- memory per rank

def probe_run(flags: Sequence[str], run_dir: Path, nproc: int) -> dict[str, Any]:
    """bench/memory_probe.py under torchrun: the medians over ranks of each rank's bytes of
    parameters, gradients and optimizer state and its peak memory, in MB."""
    result_file = run_dir / "memory.json"
    process = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", MEMORY_PROBE, *flags, "--bench_json", result_file],
                          run_dir / "probe.log", extra_env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    raw = json.loads(result_file.read_text())
    ranks = raw["ranks"]

    def per_rank(key: str) -> float:
        return statistics.median(r[key] for r in ranks) / (MB if key.endswith("_bytes") else 1)

    return {"process": process, "params": raw["params"], "world_size": raw["world_size"], "device": raw["device"],
            "peak_kind": raw["peak_kind"], "ranks": ranks,
            **{f"{key}_mb": per_rank(f"{key}_bytes") for key in ("state", "params", "grads", "optimizer")},
            "peak_mb": per_rank("peak_mb")}


# --------------------------------------------------------------------------- the trainer

def read_rows(log_dir: Path) -> list[dict[str, Any]]:
    """The step rows of LOG_DIR/metrics.jsonl (those with a `step_time`: not the rows of an
    evaluation or of an event such as a skipped step)."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if "step_time" in r), key=lambda r: r["step"])


def step_window(rows: Sequence[dict[str, Any]], event_freq: int) -> dict[str, Any]:
    """Tokens/s over consecutive step rows, the median step, and what an evaluation or checkpoint adds.

    The time between the rows of steps k and k+1 is step k+1's own `step_time` plus a gap: the
    rest of step k's logging and the evaluation and checkpoint due after step k, if any. An
    event's cost is its gap's excess over the median quiet gap; unlike whole intervals, gaps
    do not carry the noise of the steps themselves."""
    first, last = rows[0], rows[-1]
    if [r["step"] for r in rows] != list(range(first["step"], last["step"] + 1)):
        raise ValueError("metrics.jsonl must hold one row per step")
    steps, seconds = last["step"] - first["step"], last["time"] - first["time"]
    quiet_intervals, quiet_gaps, event_gaps = [], [], []
    for a, b in pairwise(rows):
        gap = b["time"] - a["time"] - b["step_time"]
        if a["step"] % event_freq:
            quiet_intervals.append(b["time"] - a["time"])
            quiet_gaps.append(gap)
        else:
            event_gaps.append(gap)
    return {
        "steps": steps,
        "seconds": seconds,
        "step_s": seconds / steps,
        "tokens_per_sec": (last["tokens"] - first["tokens"]) / seconds,
        "step_median_s": statistics.median(quiet_intervals),
        "events": len(event_gaps),
        "event_s": statistics.mean(event_gaps) - statistics.median(quiet_gaps) if event_gaps else None,
    }


def event_work(log_dir: Path, window: Sequence[dict[str, Any]], event_freq: int) -> dict[str, Any]:
    """What the evaluations and text samples inside `window` took, by the trainer's own clock
    (metrics.jsonl `val_seconds`, samples.jsonl `seconds`): the work the events do, which the bare
    loop does not, as opposed to the trainer's machinery around it."""
    steps = {r["step"] for r in window[:-1] if r["step"] % event_freq == 0}

    def mean_at_events(path: Path, key: str) -> float | None:
        if not path.exists():
            return None
        values = [row[key] for row in map(json.loads, path.read_text().splitlines())
                  if row.get("step") in steps and key in row]
        return statistics.mean(values) if values else None

    return {"eval_s": mean_at_events(log_dir / "metrics.jsonl", "val_seconds"),
            "sample_s": mean_at_events(log_dir / "samples.jsonl", "seconds")}


def trainer_run(flags: Sequence[str], run_dir: Path, name: str, *, event_freq: int | None = None, warmup: int = 0,
                after_step: int = 0, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One src/train_improved.py process: its start-up, and with `event_freq` the figures of its
    steps after `after_step + warmup` (`after_step`: where a resumed run starts)."""
    log_dir = run_dir / "logs"
    process = run_process([sys.executable, TRAINER, *flags, "--log_dir", log_dir,
                           "--checkpoint_dir", run_dir / "ckpt", *extra], run_dir / f"{name}.log")
    no_samples = [line for line in (run_dir / f"{name}.log").read_text(errors="replace").splitlines()
                  if "no text samples in this run" in line]
    if no_samples:  # the tokenizer did not load: the run lacks a feature the overhead must include
        raise RuntimeError(f"the trainer ran without its text samples, so it is not measured with every feature "
                           f"on: {no_samples[0].strip()}")
    rows = [r for r in read_rows(log_dir) if r["step"] > after_step]
    first = rows[0]
    to_first_row = first["time"] - process["launch_unix"]
    window = [r for r in rows if r["step"] >= after_step + warmup]
    return {
        "process": process,
        **({**step_window(window, event_freq), **event_work(log_dir, window, event_freq)} if event_freq else {}),
        "first_row_step": first["step"],
        "launch_to_first_row_s": to_first_row,
        "first_step_s": first["step_time"],
        "startup_s": to_first_row - first["step_time"],
        "cuda_peak_allocated_mb": max((r["mem_allocated_mb"] * 2**20 / MB for r in rows if "mem_allocated_mb" in r),
                                      default=None),
        "checkpoint_mb": (run_dir / "ckpt" / "latest.pt").stat().st_size / MB,
    }
