"""`make bench`: where the time goes, measured side by side, written to docs/BENCHMARKS.md.

    .venv/bin/python bench/run_bench.py [--quick] [--out docs] [--data_dir DIR] [--work_dir DIR]
                                        [--config FILE] [--keep_work] [--render JSON]
    make bench              # the full run (10-15 min on 2 CPU cores)
    make bench ARGS=--quick # every section in reduced size (under 2 min on 2 CPU cores)

Sections (each a comparison made in this one run, its sides alternated and repeated, medians;
process against process time-sliced, see bench/trainer_overhead.py):

1. trainer overhead: src/train_improved.py with every feature on against bench/bare_loop.py
   (same model, data, batch, threads; forward, backward and optimizer step only), with the
   trainer's time taken apart by bench/trainer_probe.py;
2. hardware use: model FLOP/s against a large fp32 matmul timed in the same process (the tiny
   config and a ~25M-parameter one), and threads per process;
3. data: loader tokens/s from plain and lz4 shards, the loader's share of a step, prepare_data.py
   tokens/s with 1 and all workers (bench/data_bench.py);
4. checkpoints: save stall async against sync at ~100 and ~500 MB (bench/checkpoint_bench.py);
   launch-to-first-step of a fresh and of a resumed run;
5. memory: peak RSS of each process (os.wait4), peak CUDA allocation on GPUs;
6. torch.compile on against off.

Writes OUT/BENCHMARKS.md and OUT/benchmarks.json (OUT defaults to docs/). Numbers on a shared
machine move from run to run: read the ratios, not the absolute figures.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SRC = REPO / "src"
for p in (str(BENCH), str(SRC)):
    if p not in sys.path:
        sys.path.insert(0, p)

import checkpoint_bench  # noqa: E402
import data_bench  # noqa: E402
import report  # noqa: E402
import trainer_overhead as overhead  # noqa: E402

TINY_CONFIG = "configs/tiny_cpu.json"
M25_SHAPE = ["--n_layer", "4", "--n_head", "6", "--n_embd", "384", "--block_size", "256"]

# Every size the two modes differ in. Steps are optimizer steps; "warmup" steps are left out of
# every rate. The full overhead window (steps 6..55) holds one evaluation and one checkpoint,
# the every-50-steps cost exactly once.
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "tiny_overrides": [],
        "steps": 55, "warmup": 5, "repeats": 3, "aa_steps": 35,
        "eval_freq": 50, "checkpoint_freq": 50, "eval_batches": 4, "sample_tokens": 64,
        "m25_batch": ["--batch_size", "4", "--total_batch_size", "1024"], "m25_steps": 8, "m25_warmup": 2,
        "m25_peak_every": 2, "peak_n": 2048,
        "thread_steps": 12, "thread_warmup": 2, "thread_repeats": 2, "thread_variants": 3,
        "compile_steps": 25, "compile_warmup": 5, "compile_repeats": 1,
        "slice_s": 3.0,  # a 1.4 s step must often fit in one turn for the median-of-unpaused-steps figure
        "data_tokens": 4_000_000, "prepare_repeats": 2, "loader_batches": 2000, "loader_repeats": 3,
        "checkpoint_sizes": [(100, 3), (500, 2)],
        "prepare_tokens": 3_000_000,
    },
    "quick": {
        "tiny_overrides": ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64",
                           "--batch_size", "4", "--total_batch_size", "256"],
        "steps": 10, "warmup": 2, "repeats": 1, "aa_steps": 6,
        "eval_freq": 5, "checkpoint_freq": 5, "eval_batches": 2, "sample_tokens": 8,
        "m25_batch": ["--batch_size", "1", "--total_batch_size", "256"], "m25_steps": 3, "m25_warmup": 1,
        "m25_peak_every": 1, "peak_n": 1024,
        "thread_steps": 4, "thread_warmup": 1, "thread_repeats": 1, "thread_variants": 2,
        "compile_steps": 0, "compile_warmup": 0, "compile_repeats": 0,  # compiling alone takes > 1 min on 2 cores
        "slice_s": 1.0,
        "data_tokens": 1_000_000, "prepare_repeats": 1, "loader_batches": 300, "loader_repeats": 2,
        "checkpoint_sizes": [(100, 1), (500, 1)],
        "prepare_tokens": 1_000_000,
    },
}


# --------------------------------------------------------------------------- machine and data

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return {k: fields[k] for k in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                                   "Hypervisor vendor", "L2 cache", "L3 cache") if k in fields}


def _other_cpu_load(seconds: float = 1.0) -> float:
    """CPU cores' worth used by other processes over `seconds` (what else runs on the machine)."""
    import psutil
    me = {os.getpid()}
    procs = [p for p in psutil.process_iter() if p.pid not in me]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(seconds)
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.Error:
            pass
    return total / 100.0


def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    from common.config import git_commit
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "lscpu": _lscpu(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "git_commit": git_commit(),
        "load_average_start": list(os.getloadavg()),
        "other_processes_cpu_cores_start": round(_other_cpu_load(), 2),
    }
    if info["cuda"]:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["device"] = "cuda" if info["cuda"] else ("mps" if info["mps"] else "cpu")
    return info


def find_or_prepare_data(requested: str | None, work: Path, tokens: int) -> dict[str, Any]:
    """data/stdlib when it is complete (read only), else a fresh `stdlib` cache under work/."""
    from common.data import read_meta
    candidates = [Path(requested)] if requested else [REPO / "data" / "stdlib"]
    for cand in candidates:
        meta = read_meta(cand) if cand.is_dir() else None
        if meta and meta.get("complete"):
            return {"dir": str(cand), "prepared_now": False, "train_tokens": meta.get("expected_train_tokens")}
    if requested:
        raise SystemExit(f"--data_dir {requested} is not a complete prepared dataset")
    out = work / "data_cache" / "stdlib"
    cmd = data_bench.prepare_command(out, len(os.sched_getaffinity(0)), tokens)
    proc = subprocess.run(cmd, env=data_bench._env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"preparing the bench data failed:\n{proc.stderr[-2000:]}")
    meta = read_meta(out) or {}
    return {"dir": str(out), "prepared_now": True, "command": " ".join(cmd),
            "train_tokens": meta.get("expected_train_tokens")}


# --------------------------------------------------------------------------- sections

def hardware_section(mode: dict[str, Any], tiny_flags: list[str], data_dir: str, work: Path,
                     tiny_bares: list[dict[str, Any]], trainer_tps: float) -> dict[str, Any]:
    """MFU against a matmul peak timed in the same process, tiny and ~25M; threads 1 vs all."""
    def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
        r0 = runs[0]
        return {
            "params_total": r0["params_total"], "params_for_flops": r0["params_for_flops"],
            "flops_per_token": r0["flops_per_token"], "tokens_per_step": r0["tokens_per_step"],
            "precision": r0["precision"], "threads": r0["threads"],
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in runs),
            "achieved_flops": statistics.median(r["achieved_flops"] for r in runs),
            "peak_fp32_flops": statistics.median(r["peak_fp32_flops_median"] for r in runs),
            "peak_fp32_flops_best": max(r["peak_fp32_flops_max"] for r in runs),
            "peak_probes": sum(len(r["peak_probes"]) for r in runs),
            "mfu_per_run": [r["mfu_vs_measured_peak"] for r in runs],
            "table_peak_bf16_flops": r0.get("table_peak_bf16_flops"),
            "peak_rss_mb": statistics.median(r["process"]["peak_rss_mb"] for r in runs),
            "cuda_peak_allocated_mb": r0.get("cuda_peak_allocated_mb"),
            "logits_mb": r0.get("logits_mb"),
        }

    def add_mfu(d: dict[str, Any]) -> dict[str, Any]:
        # the median FLOP/s against the median peak (the same figures the tables show)
        d["mfu"] = d["achieved_flops"] / d["peak_fp32_flops"]
        d["mfu_vs_best_peak"] = d["achieved_flops"] / d["peak_fp32_flops_best"]
        return d

    tiny = add_mfu(summary(tiny_bares))
    tiny["trainer_tokens_per_sec"] = trainer_tps
    tiny["trainer_mfu"] = tiny["flops_per_token"] * trainer_tps / tiny["peak_fp32_flops"]
    m25_flags = ["--config", TINY_CONFIG, "--data_dir", data_dir, *M25_SHAPE, *mode["m25_batch"],
                 "--max_steps", str(mode["m25_steps"])]
    (m25_run,) = overhead.run_jobs([overhead.bare_job(m25_flags, mode["m25_warmup"], work / "bare_25m", "bare",
                                                      peak_every=mode["m25_peak_every"], peak_n=mode["peak_n"])])
    m25 = add_mfu(summary([m25_run]))
    m25["shape"] = " ".join([*M25_SHAPE, *mode["m25_batch"]])
    threads = overhead.thread_section([*tiny_flags, "--max_steps", str(mode["thread_steps"])], mode["thread_warmup"],
                                      mode["thread_repeats"], mode["thread_variants"], work / "threads",
                                      mode["slice_s"])
    threads.update(steps=mode["thread_steps"], warmup_steps=mode["thread_warmup"])
    return {"tiny": tiny, "m25": m25, "threads": threads}


def data_section(mode: dict[str, Any], work: Path) -> dict[str, Any]:
    """prepare_data.py with 1 and all workers, alternated; the loader on plain and lz4 shards, alternated."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    tokens = mode["data_tokens"]
    prep: dict[int, list[dict[str, Any]]] = {1: [], workers: []}
    for i in range(mode["prepare_repeats"]):
        for w in dict.fromkeys((1, workers)):
            prep[w].append(data_bench.bench_prepare(work / f"prepare_w{w}_{i}", w, tokens))
    plain_dir = work / "prepare_plain"
    data_bench.bench_prepare(plain_dir, workers, tokens, compress="none")
    lz4_dir = work / f"prepare_w{workers}_0"
    loads: dict[str, list[dict[str, Any]]] = {"plain": [], "lz4": []}
    for _ in range(mode["loader_repeats"]):
        loads["plain"].append(data_bench.bench_loader(plain_dir, mode["loader_batches"]))
        loads["lz4"].append(data_bench.bench_loader(lz4_dir, mode["loader_batches"]))

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    one, many = med(prep[1], "tokens_per_sec"), med(prep[workers], "tokens_per_sec")
    plain, lz4 = med(loads["plain"], "tokens_per_sec"), med(loads["lz4"], "tokens_per_sec")
    return {
        "prepare": {"tokens": prep[1][0]["tokens"], "workers_all": workers, "repeats": mode["prepare_repeats"],
                    "tokens_per_sec_1": one, "tokens_per_sec_all": many, "all_over_1": many / one,
                    "process_tokens_per_sec_1": med(prep[1], "process_tokens_per_sec"),
                    "process_tokens_per_sec_all": med(prep[workers], "process_tokens_per_sec"),
                    "command": prep[workers][0]["command"]},
        "loader": {"batches": mode["loader_batches"], "batch_size": loads["lz4"][0]["batch_size"],
                   "block_size": loads["lz4"][0]["block_size"], "repeats": mode["loader_repeats"],
                   "tokens_per_sec_plain": plain, "tokens_per_sec_lz4": lz4, "lz4_over_plain": lz4 / plain},
    }


def checkpoint_section(mode: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    out = []
    for megabytes, repeats in mode["checkpoint_sizes"]:
        out.append(checkpoint_bench.measure_save_stall(megabytes, repeats, work / "checkpoint_bench"))
    return out


# --------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every section in reduced size (< 2 min on 2 cores)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="where BENCHMARKS.md and benchmarks.json go")
    parser.add_argument("--data_dir", default=None, help="a prepared dataset (default: data/stdlib if complete, "
                                                          "else a small stdlib cache prepared under the work dir)")
    parser.add_argument("--work_dir", default=None, help="runs, logs and checkpoints (default: a temporary "
                                                         "directory, removed at the end)")
    parser.add_argument("--keep_work", action="store_true", help="keep the work directory")
    parser.add_argument("--config", default=TINY_CONFIG,
                        help=f"the model and batch of sections 1 and 6 (default {TINY_CONFIG}; e.g. "
                             "configs/gpt2_124m.json on a GPU node)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only rewrite OUT/BENCHMARKS.md from an earlier benchmarks.json (no measuring)")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "BENCHMARKS.md").write_text(report.render(results))
        return 0

    started = time.time()
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.work_dir and Path(args.work_dir).exists() and any(Path(args.work_dir).iterdir()):
        raise SystemExit(f"--work_dir {args.work_dir} is not empty: give a new or empty directory")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="llm-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def step(msg: str) -> None:
        print(f"[bench {time.time() - started:6.1f}s] {msg}", flush=True)

    try:
        step(f"{mode_name} run; work dir {work}")
        results: dict[str, Any] = {
            "command": " ".join(["bench/run_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "mode": mode_name,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
        }
        data = find_or_prepare_data(args.data_dir, work, mode["prepare_tokens"])
        results["data_dir"] = data
        tiny_flags = ["--config", args.config, "--data_dir", data["dir"], *mode["tiny_overrides"]]
        features = ["--use_tensorboard", "true", "--eval_freq", str(mode["eval_freq"]),
                    "--eval_batches", str(mode["eval_batches"]), "--sample_tokens", str(mode["sample_tokens"]),
                    "--checkpoint_freq", str(mode["checkpoint_freq"]), "--async_checkpoint", "true",
                    "--histogram_freq", "0", "--log_freq", "10"]
        results["settings"] = {"mode": mode, "config": args.config, "tiny_flags": tiny_flags,
                               "trainer_features": features}

        step("1. trainer against bare loop (time-sliced), then resumes")
        run_flags = [*tiny_flags, "--max_steps", str(mode["steps"])]
        ov = overhead.overhead_section(run_flags, features, mode["warmup"], mode["repeats"], work / "overhead",
                                       mode["slice_s"])
        step(f"   overhead {ov['overhead_pct_paired_median']:+.1f}% (bare {ov['bare_tokens_per_sec']:.0f} tok/s, "
             f"trainer {ov['trainer_tokens_per_sec']:.0f} tok/s)")
        step("   A/A control: the bare loop against itself (time-sliced)")
        aa_flags = [*tiny_flags, "--max_steps", str(mode["aa_steps"])]
        ov["aa_control"] = overhead.aa_control(aa_flags, mode["warmup"], work / "overhead", mode["slice_s"])
        tiny_bares = [p["bare"] for p in ov["runs"]]
        results["trainer_overhead"] = {k: v for k, v in ov.items() if k not in ("runs", "resume")}
        results["trainer_overhead"]["runs"] = [_slim_pair(p) for p in ov["runs"]]
        results["resume"] = ov["resume"]

        step("2. hardware use: tiny and ~25M against a measured matmul peak; threads per process")
        results["hardware"] = hardware_section(mode, tiny_flags, data["dir"], work, tiny_bares,
                                               ov["trainer_tokens_per_sec"])

        step("3. data: prepare_data.py 1 vs all workers, loader plain vs lz4")
        results["data"] = data_section(mode, work / "data")
        results["data"]["loader_share_pct"] = {"bare_loop": ov["bare_loader_share_pct"],
                                               "trainer": ov["trainer_loader_share_pct"]}

        step("4. checkpoints: async vs sync save stall")
        results["checkpoints"] = {"stall": checkpoint_section(mode, work), "resume": ov["resume"]}

        results["memory"] = {
            "tiny_bare_peak_rss_mb": ov["peak_rss_mb"]["bare"],
            "tiny_trainer_peak_rss_mb": ov["peak_rss_mb"]["trainer"],
            "m25_bare_peak_rss_mb": results["hardware"]["m25"]["peak_rss_mb"],
            "cuda_peak_allocated_mb": {**ov["cuda_peak_allocated_mb"],
                                       "m25_bare": results["hardware"]["m25"]["cuda_peak_allocated_mb"]},
        }

        if mode["compile_repeats"]:
            step("6. torch.compile: trainer --compile false vs true (time-sliced)")
            plain = ["--use_tensorboard", "false", "--eval_freq", "1000000", "--checkpoint_freq", "1000000",
                     "--histogram_freq", "0", "--sample_tokens", "0", "--log_freq", "10"]
            comp_flags = [*tiny_flags, "--max_steps", str(mode["compile_steps"])]
            results["compile"] = overhead.compile_section(comp_flags, plain, mode["compile_warmup"],
                                                          mode["compile_repeats"], work / "compile", mode["slice_s"])
            results["compile"]["features"] = plain
        else:
            results["compile"] = {"skipped": "--quick: compiling the model alone takes over a minute on 2 CPU "
                                             "cores; the full run measures it"}

        results["machine"]["load_average_end"] = list(os.getloadavg())
        results["duration_s"] = time.time() - started
        results["targets"] = report.targets(results)
        (out_dir / "benchmarks.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        (out_dir / "BENCHMARKS.md").write_text(report.render(results))
        step(f"wrote {out_dir / 'BENCHMARKS.md'} and {out_dir / 'benchmarks.json'}")
    finally:
        if not (args.keep_work or args.work_dir):
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _slim_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """One A/B pair for the JSON file, without the per-step arrays."""
    bare = {k: v for k, v in pair["bare"].items() if k not in ("step_s", "loader_s", "end_unix")}
    trainer = {k: v for k, v in pair["trainer"].items() if k != "step_times"}
    return {"bare": bare, "trainer": trainer, "overhead_pct": pair["overhead_pct"]}


if __name__ == "__main__":
    sys.exit(main())
