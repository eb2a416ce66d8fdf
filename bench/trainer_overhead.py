"""Trainer against bare loop, torch.compile on against off, threads, and the time to the first
step after a resume -- each side a real process, the sides run in alternating time slices.

`bench/run_bench.py` calls `overhead_section`, `compile_section`, `thread_section` and uses
`bare_job` / `run_jobs` for single measurements.

Time slicing: the processes of one comparison are started together, and the driver lets only
one of them run at a time, `slice_s` seconds each in turn (SIGSTOP / SIGCONT to each process
group, so threads and helper processes pause too). On a shared machine whose load changes from
one minute to the next, both sides thus meet the same conditions, alternated every few seconds.
The driver records every pause; each figure is computed on the time its process was running
(wall clock minus the pauses inside the interval), so the slicing itself costs nothing in them.

Trainer tokens/s come from the "time" field of metrics.jsonl (the wall clock at the end of each
step), so evaluations, checkpoint stalls and everything else between two steps count. The bare
loop's come from its own step timings. Both leave out the same first `warmup` steps. Each
process's peak RSS comes from `os.wait4`, so it belongs to that process alone.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
BENCH = REPO / "bench"

# Parts of the trainer timed by bench/trainer_probe.py (labels as written there).
TRAIN_STEP = "train_step (loader+fwd+bwd+clip)"
LOADER = "loader.next_batch"
CLIP = "clip_grad_norm_"
HIST = "histograms"
OPT = "optimizer.step"
ZERO = "optimizer.zero_grad"
EPOCHS = "epochs_completed"
STOP = "shutdown.should_stop"
LOG_STEP = "log_step (jsonl+tensorboard+progress)"
AFTER = "after_step (eval+checkpoint)"
EVAL = "evaluate"
SAMPLE = "sample_text"
SAVE = "checkpoint save stall"
STATE = "checkpoint state dict"
STARTUP = ("Trainer.__init__ (startup)", "startup matmul peak", "checkpointer.prepare")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(SRC), "WANDB_MODE": "disabled"})
    return env


# --------------------------------------------------------------------------- processes

@dataclass
class Job:
    cmd: list[str]
    log_file: Path
    parse: Callable[[Job], dict[str, Any]]  # turns the finished process's outputs into figures
    env: dict[str, str] = field(default_factory=dict)
    # filled in by run_jobs
    launch_unix: float = 0.0
    wall_s: float = 0.0
    returncode: int | None = None
    peak_rss_mb: float = 0.0
    pauses: list[tuple[float, float]] = field(default_factory=list)  # (stopped, continued) unix times

    def process_info(self) -> dict[str, Any]:
        return {"launch_unix": self.launch_unix, "wall_s": self.wall_s, "returncode": self.returncode,
                "peak_rss_mb": self.peak_rss_mb, "paused_s": sum(b - a for a, b in self.pauses),
                "slices": len(self.pauses) + 1, "log": str(self.log_file)}

    def running(self, start: float, end: float) -> float:
        """Seconds of [start, end] this process was not paused."""
        return (end - start) - sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.pauses)


def run_jobs(jobs: Sequence[Job], slice_s: float = 3.0, timeout: float = 7200) -> list[dict[str, Any]]:
    """Run `jobs` to the end, one at a time in turns of `slice_s` seconds (all at once started,
    each in its own process group); return each job's parsed figures."""
    opened = []
    procs: list[subprocess.Popen | None] = []
    try:
        for i, job in enumerate(jobs):
            job.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = job.log_file.open("w")
            opened.append(out)
            env = _env()
            env.update(job.env)
            job.launch_unix = time.time()
            proc = subprocess.Popen(job.cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            procs.append(proc)
            if i > 0:
                _signal(proc, signal.SIGSTOP)
                job.pauses.append((time.time(), float("nan")))
        deadline = time.time() + timeout
        active = 0
        while any(j.returncode is None for j in jobs):
            turn_end = time.time() + slice_s
            while time.time() < turn_end and jobs[active].returncode is None:
                _reap(jobs, procs)
                time.sleep(0.02)
            _reap(jobs, procs)
            if time.time() > deadline:
                raise TimeoutError(f"bench processes still running after {timeout} s")
            waiting = [k for k in range(1, len(jobs) + 1)
                       if jobs[(active + k) % len(jobs)].returncode is None]
            if not waiting:
                break
            nxt = (active + waiting[0]) % len(jobs)
            if nxt != active:
                if jobs[active].returncode is None:
                    _signal(procs[active], signal.SIGSTOP)
                    jobs[active].pauses.append((time.time(), float("nan")))
                stopped_at, _ = jobs[nxt].pauses[-1]
                jobs[nxt].pauses[-1] = (stopped_at, time.time())
                _signal(procs[nxt], signal.SIGCONT)
                active = nxt
    finally:
        for proc, job in zip(procs, jobs):
            if proc is not None and job.returncode is None:
                _signal(proc, signal.SIGKILL)
                _signal(proc, signal.SIGCONT)
                os.waitpid(proc.pid, 0)
        for out in opened:
            out.close()
    for job in jobs:
        if job.returncode != 0:
            tail = job.log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(map(str, job.cmd))} exited with {job.returncode}:\n{tail}")
    return [job.parse(job) for job in jobs]


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _reap(jobs: Sequence[Job], procs: Sequence[subprocess.Popen]) -> None:
    for job, proc in zip(jobs, procs):
        if job.returncode is not None:
            continue
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            job.returncode = os.waitstatus_to_exitcode(status)
            job.wall_s = time.time() - job.launch_unix
            rss = usage.ru_maxrss
            job.peak_rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
            proc.returncode = job.returncode
            # the process group's leftovers (none expected) go with it
            _signal(proc, signal.SIGCONT)


# --------------------------------------------------------------------------- the two loops

def bare_job(flags: Sequence[str], warmup: int, out_dir: Path, name: str, peak_every: int = 0,
             peak_n: int = 2048, peak_repeats: int = 3, extra_env: dict[str, str] | None = None) -> Job:
    """A bench/bare_loop.py process over `flags` (the trainer's flags)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / f"{name}.json"
    cmd = [sys.executable, str(BENCH / "bare_loop.py"), *flags, "--bench_warmup", str(warmup),
           "--bench_json", str(result_file), "--bench_peak_every", str(peak_every),
           "--bench_peak_n", str(peak_n), "--bench_peak_repeats", str(peak_repeats)]

    def parse(job: Job) -> dict[str, Any]:
        result = json.loads(result_file.read_text())
        result["process"] = job.process_info()
        # Running time of each measured step (a pause inside a step is taken out; peak probes
        # between steps are not in any step). Loader share over the steps no pause touched.
        measured = range(result["warmup_steps"], len(result["step_s"]))
        spans = [(result["end_unix"][i] - result["step_s"][i], result["end_unix"][i]) for i in measured]
        running = [job.running(a, b) for a, b in spans]
        clean = [i for i, (a, b) in zip(measured, spans) if job.running(a, b) >= (b - a) - 1e-9]
        result["window_s"] = sum(running)
        result["tokens_per_sec"] = result["tokens_per_step"] * len(running) / result["window_s"]
        result["achieved_flops"] = result["flops_per_token"] * result["tokens_per_sec"]
        for key in ("mfu_vs_measured_peak", "mfu_vs_best_peak", "mfu_vs_table_peak"):
            peak = {"mfu_vs_measured_peak": "peak_fp32_flops_median", "mfu_vs_best_peak": "peak_fp32_flops_max",
                    "mfu_vs_table_peak": "table_peak_bf16_flops"}[key]
            if peak in result:
                result[key] = result["achieved_flops"] / result[peak]
        if clean:
            result["loader_share"] = (sum(result["loader_s"][i] for i in clean)
                                      / sum(result["step_s"][i] for i in clean))
            result["step_s_median"] = statistics.median(result["step_s"][i] for i in clean)
            result["compute_s_median"] = statistics.median(result["step_s"][i] - result["loader_s"][i]
                                                           for i in clean)
        result["unpaused_steps"] = len(clean)
        return result

    return Job(cmd, out_dir / f"{name}.log", parse, dict(extra_env or {}))


def read_metrics(log_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step rows, eval rows) of LOG_DIR/metrics.jsonl."""
    steps, evals = [], []
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        (evals if "val_loss" in row else steps).append(row)
    return steps, evals


def trainer_job(flags: Sequence[str], warmup: int, run_dir: Path, name: str, *, extra: Sequence[str] = (),
                probe: bool = True, first_step: int = 0) -> Job:
    """A src/train_improved.py process (through bench/trainer_probe.py when `probe`).

    `first_step` is the step the run starts after (a resumed run): the window is steps
    first_step+warmup+1 .. last."""
    log_dir, ckpt_dir = run_dir / "logs", run_dir / "ckpt"
    probe_file = run_dir / f"{name}.probe.json"
    script = BENCH / "trainer_probe.py" if probe else SRC / "train_improved.py"
    cmd = [sys.executable, str(script), *flags, "--log_dir", str(log_dir), "--checkpoint_dir", str(ckpt_dir),
           *extra]

    def parse(job: Job) -> dict[str, Any]:
        rows, evals = read_metrics(log_dir)
        rows = [r for r in rows if r["step"] > first_step]
        probe_data = json.loads(probe_file.read_text()) if probe and probe_file.exists() else None
        times, source = step_end_times(rows, probe_data)
        tokens_per_step = rows[-1]["tokens"] - rows[-2]["tokens"] if len(rows) > 1 else 0
        if tokens_per_step <= 0:
            tokens_per_step = _flag_value(flags, "total_batch_size", int)
        start_step, end_step = first_step + warmup, rows[-1]["step"]
        measured = end_step - start_step
        window = job.running(times[start_step], times[end_step]) if measured > 0 and start_step in times else None
        first_row = times[first_step + 1]
        loop_start = first_row - float(rows[0].get("step_time") or 0.0)  # StepTimer starts as the loop does
        result: dict[str, Any] = {
            "process": job.process_info(),
            "rows": len(rows),
            "time_source": source,
            "first_step": first_step,
            "window_steps": [start_step + 1, end_step],
            "measured_steps": measured,
            "window_s": window,
            "tokens_per_step": tokens_per_step,
            "tokens_per_sec": tokens_per_step * measured / window if window else None,
            "launch_to_first_row_s": job.running(job.launch_unix, first_row),
            "launch_to_loop_start_s": job.running(job.launch_unix, loop_start),
            "first_step_running_s": job.running(loop_start, first_row),
            "max_row_rss_mb": max((r.get("mem_rss_mb", 0.0) for r in rows), default=None),
            "max_row_cuda_allocated_mb": max((r.get("mem_allocated_mb", 0.0) for r in rows), default=0.0) or None,
            "evals_in_run": len(evals),
            "last_loss": rows[-1]["loss"],
            "step_times": {int(r["step"]): r.get("step_time") for r in rows},
            "checkpoint_mb": _checkpoint_mb(ckpt_dir),
        }
        if probe_data is not None and window:
            result["probe"] = attribute(probe_data, times[start_step], times[end_step], job)
            result["probe"]["startup"] = {k: sum(job.running(t0, t0 + sec) for _s, t0, sec in
                                                 probe_data["timers"].get(k, [])) for k in STARTUP}
        return result

    return Job(cmd, run_dir / f"{name}.log", parse, {"BENCH_PROBE_OUT": str(probe_file)} if probe else {})


def _flag_value(flags: Sequence[str], name: str, cast: type) -> Any:
    flags = list(flags)
    for i, flag in enumerate(flags):
        if flag == f"--{name}" and i + 1 < len(flags):
            return cast(flags[i + 1])
    raise ValueError(f"--{name} not among the flags")


def step_end_times(rows: list[dict[str, Any]], probe: dict[str, Any] | None) -> tuple[dict[int, float], str]:
    """step -> unix time at the end of that step: metrics.jsonl's "time" field, else the probe's
    record of when the step's metrics were logged (the same moment)."""
    if rows and all("time" in r for r in rows):
        return {int(r["step"]): float(r["time"]) for r in rows}, "metrics.jsonl time field"
    if probe is not None:
        return ({int(k): v for k, v in probe["step_end_unix"].items()},
                "probe (metrics.jsonl rows have no time field)")
    raise RuntimeError("metrics.jsonl rows carry no 'time' field and the run had no probe")


def attribute(probe: dict[str, Any], start_unix: float, end_unix: float, job: Job) -> dict[str, Any]:
    """Running seconds of each timed part of the trainer inside the window (start_unix, end_unix]."""
    timers = probe["timers"]

    def inside(label: str) -> list[tuple[float, float]]:
        return [(t0, sec) for _step, t0, sec in timers.get(label, []) if start_unix < t0 <= end_unix]

    def total(label: str) -> float:
        return sum(job.running(t0, t0 + sec) for t0, sec in inside(label))

    window = job.running(start_unix, end_unix)
    # Per step: the bare loop's work (forward, backward, optimizer step, zero_grad) inside the
    # trainer, for the steps no pause touched -- its median is robust to bursts of machine load.
    by_step: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for label in (TRAIN_STEP, LOADER, CLIP, HIST, OPT, ZERO):
        for step, t0, sec in timers.get(label, []):
            if start_unix < t0 <= end_unix:
                by_step.setdefault(int(step), {}).setdefault(label, []).append((t0, sec))
    compute = []
    for calls in by_step.values():
        if not (calls.get(TRAIN_STEP) and calls.get(OPT) and calls.get(ZERO)):
            continue
        begin = calls[TRAIN_STEP][0][0]
        finish = calls[ZERO][-1][0] + calls[ZERO][-1][1]
        if job.running(begin, finish) < (finish - begin) - 1e-9:
            continue  # paused inside this step
        secs = {label: sum(sec for _t0, sec in v) for label, v in calls.items()}
        compute.append(secs[TRAIN_STEP] - secs.get(LOADER, 0.0) - secs.get(CLIP, 0.0) - secs.get(HIST, 0.0)
                       + secs[OPT] + secs[ZERO])
    parts = {label: total(label) for label in (TRAIN_STEP, LOADER, CLIP, HIST, OPT, ZERO, LOG_STEP, AFTER, EVAL,
                                               SAMPLE, SAVE, STATE, EPOCHS, STOP)}
    counted = parts[TRAIN_STEP] + parts[OPT] + parts[ZERO] + parts[LOG_STEP] + parts[AFTER] + parts[STOP]
    fwd_bwd = parts[TRAIN_STEP] - parts[LOADER] - parts[CLIP] - parts[HIST]
    return {
        "window_s": window,
        "parts_s": parts,
        "calls": {label: len(inside(label)) for label in (EVAL, SAMPLE, SAVE, HIST)},
        # what the bare loop also does
        "loader_s": parts[LOADER],
        "fwd_bwd_s": fwd_bwd,
        "optimizer_s": parts[OPT] + parts[ZERO],  # step and zero_grad, as in the bare loop's step
        "compute_s_median": statistics.median(compute) if compute else None,
        "unpaused_steps": len(compute),
        # Python's garbage collector, inside the parts above (not an extra part)
        "gc_s": sum(job.running(t0, t0 + sec) for _gen, t0, sec in probe.get("gc", []) if start_unix < t0 <= end_unix),
        # what only the trainer does
        "extra_s": {
            "clip_grad_norm_": parts[CLIP],
            "histograms": parts[HIST],
            "log_step (metrics.jsonl, TensorBoard scalars, RSS, progress)": parts[LOG_STEP],
            "evaluation (val forward passes)": parts[EVAL],
            "text sample (generate)": parts[SAMPLE],
            "checkpoint save stall (state dict + snapshot)": parts[SAVE],
            "rest of after_step (eval logging, tiers)": parts[AFTER] - parts[EVAL] - parts[SAMPLE] - parts[SAVE],
            "signal check (shutdown.should_stop)": parts[STOP],
            "loop bookkeeping (lr schedule, epoch bookkeeping, loss/grad_norm .item(), NaN check, step timer)":
                window - counted,
        },
    }


def _checkpoint_mb(ckpt_dir: Path) -> float | None:
    latest = ckpt_dir / "latest.pt"
    return latest.stat().st_size / 1e6 if latest.exists() else None


def _replace_flag(flags: list[str], name: str, value: str) -> list[str]:
    out = list(flags)
    for i, flag in enumerate(out):
        if flag == f"--{name}":
            out[i + 1] = value
            return out
    return out + [f"--{name}", value]


# --------------------------------------------------------------------------- sections

def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def aa_control(common_flags: Sequence[str], warmup: int, work: Path, slice_s: float) -> dict[str, Any]:
    """The bare loop against itself, time-sliced: the noise floor of every process comparison."""
    first, second = run_jobs([bare_job(common_flags, warmup, work / f"aa_{k}", "bare") for k in (0, 1)], slice_s)
    return {"steps": first["steps"], "warmup_steps": warmup,
            "tokens_per_sec": [first["tokens_per_sec"], second["tokens_per_sec"]],
            "ratio": second["tokens_per_sec"] / first["tokens_per_sec"],
            "step_compute_ratio": (second["compute_s_median"] / first["compute_s_median"]
                                   if first.get("compute_s_median") and second.get("compute_s_median") else None)}


def overhead_section(common_flags: Sequence[str], trainer_features: Sequence[str], warmup: int, repeats: int,
                     work: Path, slice_s: float, resume_steps: int = 3) -> dict[str, Any]:
    """Bare loop (A) and trainer with every feature on (B), time-sliced, `repeats` pairs; after
    each pair a resume of B's run times the launch to the first resumed step."""
    pairs, resumes = [], []
    for i in range(repeats):
        run_dir = work / f"trainer_{i}"
        bare, trainer = run_jobs([bare_job(common_flags, warmup, work / f"bare_{i}", "bare", peak_every=10**9),
                                  trainer_job([*common_flags, *trainer_features], warmup, run_dir, "trainer")],
                                 slice_s)
        pairs.append({"bare": bare, "trainer": trainer,
                      "overhead_pct": 100.0 * (trainer["window_s"] / trainer["measured_steps"])
                      / (bare["window_s"] / bare["measured_steps"]) - 100.0})
        if resume_steps:
            resumes.append(resume_run(common_flags, trainer_features, run_dir, trainer, resume_steps))
    bare_tps = _median([p["bare"]["tokens_per_sec"] for p in pairs])
    trainer_tps = _median([p["trainer"]["tokens_per_sec"] for p in pairs])
    probes = [p["trainer"]["probe"] for p in pairs]
    return {
        "repeats": repeats,
        "warmup_steps": warmup,
        "slice_s": slice_s,
        "bare_tokens_per_sec": bare_tps,
        "trainer_tokens_per_sec": trainer_tps,
        "trainer_over_bare": trainer_tps / bare_tps,
        "overhead_pct_of_medians": 100.0 * (bare_tps / trainer_tps - 1.0),
        "overhead_pct_paired_median": _median([p["overhead_pct"] for p in pairs]),
        "overhead_pct_paired": [p["overhead_pct"] for p in pairs],
        "within_run_overhead_pct_median": _median([_within_run_overhead(p) for p in probes]),
        "gc_ms_per_step_median": _median([1000 * pr["gc_s"] / p["trainer"]["measured_steps"]
                                          for pr, p in zip(probes, pairs)]),
        # forward+backward+optimizer of one step, median over unpaused steps, trainer / bare
        "step_compute_ratio_median": _median([p["trainer"]["probe"]["compute_s_median"] / p["bare"]["compute_s_median"]
                                              for p in pairs if p["trainer"]["probe"]["compute_s_median"]
                                              and p["bare"].get("compute_s_median")] or [float("nan")]),
        "attribution": _attribution_table(pairs),
        "bare_loader_share_pct": _median([100.0 * p["bare"]["loader_share"] for p in pairs]),
        "trainer_loader_share_pct": _median([100.0 * pr["loader_s"] / pr["window_s"] for pr in probes]),
        "peak_rss_mb": {"bare": _median([p["bare"]["process"]["peak_rss_mb"] for p in pairs]),
                        "trainer": _median([p["trainer"]["process"]["peak_rss_mb"] for p in pairs])},
        "cuda_peak_allocated_mb": {"bare": pairs[0]["bare"].get("cuda_peak_allocated_mb"),
                                   "trainer": pairs[0]["trainer"].get("max_row_cuda_allocated_mb")},
        "resume": resumes,
        "runs": pairs,
    }


def _within_run_overhead(probe: dict[str, Any]) -> float:
    """Time the trainer spends outside the bare loop's work (loader, forward, backward, optimizer)
    over that work, inside one run: free of the run-to-run noise of a shared machine, blind to
    background threads slowing the step itself."""
    base = probe["loader_s"] + probe["fwd_bwd_s"] + probe["optimizer_s"]
    return 100.0 * (probe["window_s"] - base) / base


def _attribution_table(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per part: median milliseconds per measured step, and percent of the bare loop's step time."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for p in pairs:
        bare, probe = p["bare"], p["trainer"]["probe"]
        bare_step = bare["window_s"] / bare["measured_steps"]
        n = p["trainer"]["measured_steps"]
        bare_loader = bare["loader_share"] * bare_step
        entries = {
            "forward+backward+optimizer: trainer minus bare (background threads, noise)":
                (probe["fwd_bwd_s"] + probe["optimizer_s"]) / n - (bare_step - bare_loader),
            "loader.next_batch: trainer minus bare": probe["loader_s"] / n - bare_loader,
            **{k: v / n for k, v in probe["extra_s"].items()},
        }
        for k, v in entries.items():
            rows.setdefault(k, []).append((v, 100.0 * v / bare_step))
    return [{"part": k, "ms_per_step": 1000 * _median([a for a, _ in v]),
             "pct_of_bare_step": _median([b for _, b in v])} for k, v in rows.items()]


def resume_run(common_flags: Sequence[str], trainer_features: Sequence[str], run_dir: Path,
               finished: dict[str, Any], extra_steps: int = 3) -> dict[str, Any]:
    """Resume `run_dir`'s finished run for a few more steps (alone, not sliced): launch to its
    first metrics row, against the same figure of the fresh run (its pauses taken out)."""
    last = finished["window_steps"][1]
    flags = [*_replace_flag(list(common_flags), "max_steps", str(last + extra_steps)), *trainer_features]
    (resumed,) = run_jobs([trainer_job(flags, 0, run_dir, "resume", extra=["--resume", "latest"], probe=False,
                                       first_step=last)])
    return {
        "resumed_after_step": last,
        "launch_to_first_step_s": resumed["launch_to_first_row_s"],
        "launch_to_loop_start_s": resumed["launch_to_loop_start_s"],
        "first_step_s": resumed["first_step_running_s"],
        "fresh_launch_to_first_step_s": finished["launch_to_first_row_s"],
        "fresh_launch_to_loop_start_s": finished["launch_to_loop_start_s"],
        "fresh_first_step_s": finished["first_step_running_s"],
        "startup_parts_fresh_s": finished.get("probe", {}).get("startup"),
        "checkpoint_mb": finished["checkpoint_mb"],
        "time_source": resumed["time_source"],
    }


def compile_section(common_flags: Sequence[str], plain_features: Sequence[str], warmup: int, repeats: int,
                    work: Path, slice_s: float) -> dict[str, Any]:
    """Trainer with --compile false and --compile true, time-sliced pairs; the compilation itself
    (first steps) is left out of the tokens/s and reported apart."""
    runs = []
    for i in range(repeats):
        jobs = [trainer_job([*common_flags, *plain_features, "--compile", flag], warmup,
                            work / f"compile_{flag}_{i}", "trainer", probe=False) for flag in ("false", "true")]
        # A cold compiler cache, as on a user's first run (a warm one skips most of the compilation).
        jobs[1].env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor_cache_{i}")
        for flag, res in zip(("false", "true"), run_jobs(jobs, slice_s)):
            runs.append({"compile": flag == "true", "tokens_per_sec": res["tokens_per_sec"],
                         "first_step_s": res["first_step_running_s"],
                         "launch_to_first_step_s": res["launch_to_first_row_s"],
                         "peak_rss_mb": res["process"]["peak_rss_mb"], "last_loss": res["last_loss"]})
    off = _median([r["tokens_per_sec"] for r in runs if not r["compile"]])
    on = _median([r["tokens_per_sec"] for r in runs if r["compile"]])
    return {
        "repeats": repeats,
        "warmup_steps": warmup,
        "eager_tokens_per_sec": off,
        "compiled_tokens_per_sec": on,
        "compiled_over_eager": on / off,
        "compile_first_step_s": _median([r["first_step_s"] for r in runs if r["compile"]]),
        "eager_first_step_s": _median([r["first_step_s"] for r in runs if not r["compile"]]),
        "compile_launch_to_first_step_s": _median([r["launch_to_first_step_s"] for r in runs if r["compile"]]),
        "runs": runs,
    }


THREAD_VARIANTS: list[tuple[str, str, dict[str, str]]] = [
    ("1 thread", "1", {}),
    ("all usable cores (the trainer's default for one rank)", "0", {}),
    ("all usable cores, OMP_WAIT_POLICY=PASSIVE", "0", {"OMP_WAIT_POLICY": "PASSIVE"}),
]


def thread_section(flags: Sequence[str], warmup: int, repeats: int, variants: int, work: Path,
                   slice_s: float) -> dict[str, Any]:
    """Bare loop with 1 thread, all cores, and all cores with OpenMP's passive wait policy
    (idle threads sleep instead of spinning), time-sliced together, `repeats` rounds."""
    chosen = THREAD_VARIANTS[:variants]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in chosen}
    for i in range(repeats):
        jobs = [bare_job([*flags, "--cpu_threads", value], warmup, work / f"threads_{k}_{i}", "bare", extra_env=env)
                for k, (_label, value, env) in enumerate(chosen)]
        for (label, _, _), res in zip(chosen, run_jobs(jobs, slice_s)):
            results[label].append(res)
    one = _median([r["tokens_per_sec"] for r in results[chosen[0][0]]])
    rows = []
    for label, _value, env in chosen:
        runs = results[label]
        tps = _median([r["tokens_per_sec"] for r in runs])
        rows.append({"variant": label, "threads": runs[0]["threads"], "env": env, "tokens_per_sec": tps,
                     "ratio_to_1_thread": tps / one, "all_tokens_per_sec": [r["tokens_per_sec"] for r in runs]})
    return {"variants": rows, "repeats": repeats}
