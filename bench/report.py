"""docs/BENCHMARKS.md from the results of bench/run_bench.py. Every figure must be a finite number
(a missing or malformed one raises), except the CUDA ones, which are absent off a GPU."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Results = dict[str, Any]


def num(x: Any, digits: int = 0, suffix: str = "") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"not a finite figure: {x!r}")
    return f"{x:,.{digits}f}{suffix}"


def med(s: dict[str, float], digits: int = 0, suffix: str = "") -> str:
    """A median and its spread over the rounds: `median (min..max)`."""
    return f"{num(s['median'], digits, suffix)} ({num(s['min'], digits)}..{num(s['max'], digits)})"


def optional(x: Any, show: Callable[[Any], str]) -> str:
    """A figure that a machine may lack (the load without /proc/stat, CUDA memory off a GPU)."""
    return "n/a" if x is None else show(x)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = [header, [":--", *["--:"] * (len(header) - 1)], *rows]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines) + "\n"


def _how(r: Results) -> str:
    m, d = r["machine"], r["data"]
    start, end = (", ".join(num(x, 2) for x in m[k]) for k in ("load_average_start", "load_average_end"))
    prepared = ", prepared for this run" if d["prepared_now"] else ""
    return f"""\
- `{r['command']}` ({r['mode']} mode, `{r['config']}`), {r['date']}, {num(r['duration_s'])} s,
  git `{m['git_commit']}`
- {m['cpu_model']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable), {num(m['memory_gb'], 1)} GB RAM;
  device **{m['device']}**; torch {m['torch']}, Python {m['python']}, {m['platform']}
- machine load: load average {start} at the start, {end} at the end; other processes used
  **{optional(m['other_load_cores'], lambda x: med(x, 2))} cores** while each measured process ran
  (/proc/stat busy time minus the process's own CPU time)
- data: `{d['dir']}` ({num(d['train_tokens'])} train tokens{prepared})
- each comparison runs its sides as separate processes in alternated rounds (A B, B A, ...);
  figures are medians with (min..max) over the rounds; MB = 10^6 bytes
"""


def _overhead(r: Results) -> str:
    ov = r["overhead"]
    b0, f, p = ov["rounds"][0]["bare"], ov["event_freq"], ov["preset_freq"]
    rows = [[str(i + 1), x["order"], num(x["bare"]["tokens_per_sec"]), num(x["trainer"]["tokens_per_sec"]),
             num(x["overhead_pct"], 2, "%"), num(x["with_work_pct"], 1, "%"), num(x["median_step_pct"], 1, "%"),
             num(x["end_to_end_pct"], 1, "%"),
             " / ".join(optional(x[side]["process"]["other_load_cores"], lambda v: num(v, 2))
                        for side in ("bare", "trainer"))]
            for i, x in enumerate(ov["rounds"])]
    header = ["round", "order", "bare tok/s", "trainer tok/s", "trainer's overhead", "... with evaluation and sample",
              "median step + events", "end to end", "others' load (cores), bare / trainer"]
    fast_rows = [[str(i + 1), x["order"], num(1e3 * x["bare"]["step_median_s"], 1),
                  num(1e3 * x["trainer"]["step_median_s"], 1)] for i, x in enumerate(ov["fast_rounds"])]
    bare_medians = [x["bare"]["step_median_s"] for x in ov["rounds"]]
    bare_drift = 100 * (max(bare_medians) / min(bare_medians) - 1)
    fast_medians = [x["bare"]["step_median_s"] for x in ov["fast_rounds"]]
    fast_drift_s = max(fast_medians) - min(fast_medians)
    fast_tokens = ov["fast_rounds"][0]["bare"]["tokens_per_step"]
    return f"""\
`src/train_improved.py` with every feature on against `bench/bare_loop.py`: the same model, data,
batch ({num(b0['tokens_per_step'])} tokens), threads ({b0['threads']}) and precision ({b0['precision']}); the bare
loop does next_batch, forward, backward, optimizer step and nothing else. One process each,
{ov['steps']} steps, the first {ov['warmup']} left out. Trainer flags: `{' '.join(ov['features'])}`, that is
metrics.jsonl, TensorBoard, the stop-signal check at every step, and every {f} steps an evaluation
with a text sample and an async checkpoint. The trainer's seconds run between the `time` of its
metrics.jsonl rows, so everything between steps counts.

**The trainer's overhead: {med(ov['overhead_pct'], 2, '%')} with an evaluation and a checkpoint every {f} steps,
{med(ov['preset_overhead_pct'], 2, '%')} every {p} steps** (configs/base.json's `eval_freq` and `checkpoint_freq`).
That is its extra time per step, {num(ov['step_extra_ms'], 1, ' ms')} (measured at fast steps, below),
plus its machinery at an event, {med(ov['machinery_event_s'], 2, ' s')}, divided by the events' frequency,
against the bare loop's median step. The machinery at an event is the event's stall
({med(ov['event_s'], 2, ' s')}: the time between two steps, row `time` minus the next row's `step_time`,
beyond the median such gap) without the evaluation's forward passes ({med(ov['eval_s'], 2, ' s')}) and the
text sample's ({med(ov['sample_s'], 2, ' s')}), which the trainer times itself (metrics.jsonl `val_seconds`,
samples.jsonl `seconds`): the checkpoint snapshot, logging, starting the charts' process.
**With the evaluation and the sample**, work the run asks for and the bare loop does not do, the
trainer costs {med(ov['with_work_pct'], 1, '%')} every {f} steps and
{med(ov['preset_with_work_pct'], 1, '%')} every {p}.

{table(header, rows)}
The trainer's extra time per step, from the bare loop and the trainer at steps of
{num(fast_tokens)} tokens (`{' '.join(ov['fast_model'])}`: the same parameters, so the same
optimizer step and gradient clipping), with the same per-step features on and no evaluation or
checkpoint ({ov['fast_steps']} steps, the first {ov['fast_warmup']} left out), in {len(fast_rows)} alternated
rounds: the median process's median step of each side, one subtracted from the other. On this
machine a process may run all its steps markedly faster or slower than the next process of the same
program; the median over the processes is the common speed.

{table(["round", "order", "bare, median step (ms)", "trainer, median step (ms)"], fast_rows)}
Why not simply compare the median steps: the bare loop's own median step differs by
{num(bare_drift, 1, '%')} between its rounds here (the same program on the same data: this machine's
speed drifts from minute to minute), so the direct comparisons in the
table (the trainer's median step plus its events' stall, and the window's means end to end,
bursts included) cannot tell a per-step difference smaller than that from noise. At fast
steps the same drift is {num(1e3 * fast_drift_s, 1)} ms (the bare loop's median step, slowest round
against fastest), {num(100 * fast_drift_s / min(bare_medians), 2, '%')} of a full step; the stall of an event is
measured within one process.
"""


def _mfu(r: Results) -> str:
    x = r["mfu"]
    n = x["peak_n"]
    rows = [["bare loop", med(x["bare_gflops"], 1), f"**{med(x['bare_mfu_pct'], 1, '%')}**"],
            ["trainer", med(x["trainer_gflops"], 1), f"**{med(x['trainer_mfu_pct'], 1, '%')}**"],
            ["matmul peak", med(x["peak_gflops"], 1), ""]]
    return f"""\
Model FLOP/s (FLOPs per token x tokens/s; {num(x['flops_per_token'] / 1e6, 1)}M FLOPs per token, 6N + 12·L·H·Q·T
as `common.metrics.flops_per_token`, {num(x['params'])} parameters) against a {n}x{n} fp32 matrix
product timed in each bare-loop process before its first and after its last step: the device's
own peak.

{table(["", "GFLOP/s", "MFU"], rows)}"""


def _loader(r: Results) -> str:
    x = r["loader"]
    return f"""\
`ShardedTrainLoader.next_batch` alone, {num(x['batches'])} batches timed in each bare-loop process after
its last step: **{med(x['tokens_per_sec'])} tokens/s**, {med(x['over_training'])} times what the
bare loop trains on. Its share of a bare training step (seconds inside next_batch over the
step's): **{med(x['share_of_step_pct'], 3, '%')}**.
"""


def _checkpoints(r: Results) -> str:
    rows = [[" ".join([c["model"], *([f"`{' '.join(c['flags'])}`"] if c["flags"] else [])]),
             f"{num(c['checkpoint_mb'], 1)} MB",
             med(c["async_stall_s"], 3, " s"), med(c["sync_stall_s"], 3, " s"), f"**{med(c['sync_over_async'], 1)}**",
             med(c["async_over_sync_tokens_per_sec"], 3), f"{len(c['rounds'])} x {c['saves_per_run']}"]
            for c in r["checkpoints"]]
    header = ["model", "checkpoint", "async stall", "sync stall", "sync / async", "tokens/s async / sync",
              "rounds x saves"]
    return f"""\
The trainer with `--async_checkpoint true` and `false`, alternated, a checkpoint every
{r['checkpoints'][0]['every']} steps and no evaluation. The stall is the time between two steps that holds a save (row
`time` minus the next row's `step_time`) beyond the median of the other such gaps: for async the
in-memory snapshot (and the previous write, if it still runs), for sync the whole write.

{table(header, rows)}
tokens/s async / sync is over the whole window: the background write competes for the same cores.
"""


def _startup(r: Results) -> str:
    x = r["startup"]
    rows = [[str(i + 1), num(s["startup_s"]["fresh"], 2, " s"), num(s["startup_s"]["resumed"], 2, " s"),
             f"{num(s['first_step_s']['fresh'], 2)} s / {num(s['first_step_s']['resumed'], 2)} s",
             f"{num(s['launch_to_first_row_s']['fresh'], 2)} s / {num(s['launch_to_first_row_s']['resumed'], 2)} s"]
            for i, s in enumerate(x["rounds"])]
    header = ["round", "start-up, fresh", "start-up, resumed", "first step, fresh / resumed",
              "launch to first row, fresh / resumed"]
    return f"""\
From the launch of `src/train_improved.py` to the `time` of its first metrics.jsonl row; start-up
is that minus the first step's `step_time`. Fresh: the trainer run of each round of section 1;
resumed: `--resume latest` of that run right after it (model, optimizer, loader and RNG state from
a {num(x['checkpoint_mb'], 1)} MB checkpoint).

{table(header, rows)}
Start-up resumed / fresh: **{med(x['resumed_over_fresh'], 2)}**.
"""


def _memory(r: Results) -> str:
    x = r["memory"]
    rows = [["bare loop", f"{med(x['bare_mb'])} MB"], ["trainer, every feature on", f"{med(x['trainer_mb'])} MB"],
            ["trainer, resumed", f"{med(x['resumed_mb'])} MB"]]
    cuda = "" if x["cuda_bare_mb"] is None else (
        f"\nPeak CUDA allocation: bare loop {num(x['cuda_bare_mb'])} MB, trainer {num(x['cuda_trainer_mb'])} MB.\n")
    return f"""\
Peak resident set size of each process of section 1 (`os.wait4`):

{table(["process", "peak RSS"], rows)}
Trainer / bare loop: **{med(x['trainer_over_bare'], 2)}**.
{cuda}"""


def _variant(r: Results, key: str, what: str) -> str:
    x = r[key]
    a, b = x["sides"]
    rows = [[str(i + 1), v["order"], num(v[a]["tokens_per_sec"]), num(v[b]["tokens_per_sec"]),
             num(v[a]["tokens_per_sec"] / v[b]["tokens_per_sec"], 3), num(_peak(v[a])), num(_peak(v[b]))]
            for i, v in enumerate(x["rounds"])]
    first = x["rounds"][0][a]
    header = ["round", "order", f"{a} tok/s", f"{b} tok/s", f"{a} / {b}", f"{a} peak MB", f"{b} peak MB"]
    return f"""\
`bench/bare_loop.py` with section 1's model and batch ({num(first['tokens_per_step'])} tokens a step,
{first['steps']} steps timed after the first {r['overhead']['warmup']}), one process per side and round, {what}:
`{' '.join(x['flags'][a])}` against `{' '.join(x['flags'][b])}`. Peak memory: {_peak_kind(first)}.

{table(header, rows)}
**{a} / {b}: {med(x['speedup'], 3)} times the tokens/s, {med(x['memory_ratio'], 2)} times the peak memory.**
"""


def _peak(run: Results) -> float:
    return run["cuda_peak_allocated_mb"] if run["cuda_peak_allocated_mb"] is not None else run["process"]["peak_rss_mb"]


def _peak_kind(run: Results) -> str:
    return ("CUDA's peak allocation" if run["cuda_peak_allocated_mb"] is not None
            else "the process's peak resident set size (model, optimizer and runtime included)")


def _cross_entropy(r: Results) -> str:
    return _variant(r, "cross_entropy", "the loss through the chunked linear + cross-entropy (common/fused_ce.py) "
                                        "or the plain product and `F.cross_entropy`")


def _adamw(r: Results) -> str:
    return _variant(r, "adamw", "the trainer's fused AdamW (one kernel per parameter group; it also lets the "
                                "trainer skip a step without a host sync) or the foreach implementation")


def _budget(r: Results) -> str:
    x = r["memory_budget"]
    paths = x["paths"]
    sizes = sorted({t["batch"] for p in paths.values() for t in p["tried"]})
    rows = [[str(size), *[next((f"{num(t['peak_mb'])} MB" + ("" if t["peak_mb"] <= x["budget_mb"] else " (over)")
                                for t in p["tried"] if t["batch"] == size), "") for p in paths.values()]]
            for size in sizes]
    largest = ", ".join(f"{name} **{p['largest']}{' or more (the cap)' if p['capped'] else ''}**"
                        for name, p in paths.items())
    return f"""\
The bare loop for two steps at micro-batch 1, 2, 4 ... ({num(x['block_size'])} tokens a sequence, no
accumulation) until its peak memory passes a budget of **{num(x['budget_mb'])} MB** or the micro-batch
reaches {x['max_batch']}; one process per size, one pass (memory does not depend on the machine's load).

{table(["micro-batch", *[f"{name} peak" for name in paths]], rows)}
Largest micro-batch within the budget: {largest}.
"""


def _parallel_memory(r: Results) -> str:
    x = r["parallel_memory"]
    rows = [[label, *(med(x[f"{side}_{key}"], 1) for key in ("params_mb", "grads_mb", "optimizer_mb", "state_mb",
                                                             "peak_mb"))]
            for label, side in (("ddp", "ddp"), ("fsdp", "fsdp"))]
    rows.append(["fsdp / ddp", "", "", "", f"**{med(x['state_ratio'], 2)}**", f"**{med(x['peak_ratio'], 2)}**"])
    return f"""\
`bench/memory_probe.py` under torchrun with {x['world_size']} ranks on {x['device']}, `--parallel ddp` and `fsdp`
alternated: the trainer's model, wrapping, optimizer and step (`common.parallel`), {num(x['params'])}
parameters (`{' '.join(x['flags'])}`), random tokens. At the end of the last step each rank counts the
bytes of its parameters, gradients and AdamW state (its shards under fsdp); peak:
{x['peak_kind']}, from building the model to the end. MB per rank, the median over ranks:

{table(["", "parameters", "gradients", "optimizer", "sum", "peak"], rows)}
The sum halves (docs/SCALING.md: 16 bytes per parameter under ddp, 16/W under fsdp); the peak
also holds what fsdp gathers for the block at work and the one prefetched (parameters and their
unsharded gradients), the root's embedding and head, and the activations: a share that falls as
the model gets deeper and wider.
"""


def _targets(r: Results) -> str:
    return table(["target", "this run", ""], [[t["target"], num(t["value"], 2), "met" if t["met"] else "**missed**"]
                                              for t in r["targets"]])


SECTIONS: tuple[tuple[str, Callable[[Results], str]], ...] = (
    ("## How it was run", _how),
    ("## 1. Trainer overhead", _overhead),
    ("## 2. MFU", _mfu),
    ("## 3. Data loader", _loader),
    ("## 4. Checkpoint stall", _checkpoints),
    ("## 5. Launch to first step", _startup),
    ("## 6. Peak memory", _memory),
    ("## 7. Cross-entropy: chunked against plain", _cross_entropy),
    ("## 8. Micro-batch within a memory budget", _budget),
    ("## 9. AdamW: fused against foreach", _adamw),
    ("## 10. Memory per rank, ddp against fsdp", _parallel_memory),
    ("## Targets", _targets),
)
def render(r: Results) -> str:
    body = "\n".join(f"{heading}\n\n{section(r)}" for heading, section in SECTIONS)
    return f"""\
# Benchmarks

Written by `make bench` (`bench/run_bench.py`; raw figures in `docs/benchmarks.json`). On a shared
machine the absolute figures move from minute to minute: read the ratios, measured side by side.

{body}"""
