"""`make gpu-check`: what a GPU lent for a few minutes must show, in under 8 minutes on one GPU.

    python bench/gpu_check.py [--out DIR] [--data_dir DIR] [--steps 30] [--batch_size 8]

Writes OUT/gpu_check.json and OUT/GPU_CHECK.md (OUT defaults to logs/gpu_check):

1. GPT-2 124M (configs/gpt2_124m.json's shape), bf16, torch.compile, `--steps` optimizer steps of
   one micro-batch each, with the chunked and with the plain cross-entropy (`--fused_ce on|off`):
   tokens/s, MFU and peak CUDA memory from the trainer's metrics.jsonl (compile steps left out).
2. Graph breaks of torch.compile in the training forward, per cross-entropy path (dynamo's
   explain on the same model).
3. `src/train_fp8.py --use_fp8 --require_fp8` with `--fp8_recipe delayed` and `current`: a run of
   `--steps` steps, and the same run stopped by SIGTERM halfway and resumed with `--resume latest`;
   tokens/s against the bf16 run, the final loss against bf16's, and every step's loss of the
   stopped-and-resumed run against the uninterrupted one's (exact on the same GPU).

Every run is a real trainer process with its own directories under OUT/work. Without a CUDA
device the script says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import measure
from measure import REPO
from run_bench import find_data

SRC = REPO / "src"
sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from common.model import GPT, GPTConfig  # noqa: E402

GPT2_124M = ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024", "--vocab_size", "50257"]
# Warm up fast so 30 steps move the loss enough to compare precisions; no evaluation.
RUN_FLAGS = ["--warmup_steps", "5", "--learning_rate", "6e-4", "--eval_freq", "0", "--checkpoint_freq", "1000000",
             "--use_tensorboard", "false", "--histogram_freq", "0", "--log_freq", "5", "--seed", "1337"]
RECIPES = ("delayed", "current")
DEADLINE_S = 7.5 * 60  # legs not started by then are reported as skipped, so the check ends within 8 minutes
LOSS_TOLERANCE = 0.05  # FP8 final loss within 5% of bf16's after a few dozen steps


# --------------------------------------------------------------------------- trainer processes

def trainer_cmd(script: str, flags: Sequence[str], run_dir: Path) -> list[str]:
    return [sys.executable, str(SRC / script), *flags, "--log_dir", str(run_dir / "logs"),
            "--checkpoint_dir", str(run_dir / "ckpt")]


def run_trainer(script: str, flags: Sequence[str], run_dir: Path, *, stop_after: int | None = None,
                timeout_s: float = 600) -> dict[str, Any]:
    """One trainer process to its end; with `stop_after`, SIGTERM once metrics.jsonl has that step
    (the trainer finishes its step, saves latest.pt and exits). Returns its exit code, the step
    rows and the log's tail."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / ("stopped.log" if stop_after else "run.log")
    with log_file.open("a") as out:
        proc = subprocess.Popen(trainer_cmd(script, flags, run_dir), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=measure.child_env())
        deadline = time.time() + timeout_s
        signalled = False
        while proc.poll() is None:
            if time.time() > deadline:
                proc.kill()
            if stop_after is not None and not signalled and _last_step(run_dir) >= stop_after:
                proc.send_signal(signal.SIGTERM)
                signalled = True
            time.sleep(0.05)
    rows = measure.read_rows(run_dir / "logs") if (run_dir / "logs" / "metrics.jsonl").exists() else []
    return {"returncode": proc.returncode, "rows": rows, "log_tail": log_file.read_text(errors="replace")[-2000:]}


def _last_step(run_dir: Path) -> int:
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def stop_and_resume(script: str, flags: Sequence[str], run_dir: Path, stop_after: int,
                    timeout_s: float = 600) -> dict[str, Any]:
    """The run stopped by SIGTERM after step `stop_after`, then resumed to its end."""
    stopped = run_trainer(script, flags, run_dir, stop_after=stop_after, timeout_s=timeout_s)
    saved = json.loads((run_dir / "ckpt" / "latest.json").read_text())["step"] \
        if (run_dir / "ckpt" / "latest.json").exists() else None
    resumed = run_trainer(script, [*flags, "--resume", "latest"], run_dir, timeout_s=timeout_s)
    return {"stopped_returncode": stopped["returncode"], "stopped_at": saved, "returncode": resumed["returncode"],
            "rows": resumed["rows"], "log_tail": resumed["log_tail"]}


def compare_losses(reference: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every step's loss of `rows` against the same step's in `reference`."""
    ref = {r["step"]: r["loss"] for r in reference}
    got = {r["step"]: r["loss"] for r in rows}
    common = sorted(ref.keys() & got.keys())
    diffs = [abs(ref[s] - got[s]) for s in common]
    return {"steps": len(common), "same_steps": sorted(ref) == sorted(got), "exact": bool(common) and not any(diffs)
            and sorted(ref) == sorted(got), "max_abs_diff": max(diffs, default=math.nan)}


def throughput(rows: Sequence[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Medians over the steps after `warmup` (compilation and the first allocations)."""
    timed = [r for r in rows if r["step"] > warmup] or list(rows)
    mem = [r["mem_allocated_mb"] * 2**20 / measure.MB for r in rows if "mem_allocated_mb" in r]
    mfu = [r["mfu"] for r in timed if "mfu" in r]
    return {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None, "peak_mem_mb": max(mem) if mem else None,
            "final_loss": statistics.mean(r["loss"] for r in rows[-5:]), "steps": len(rows)}


# --------------------------------------------------------------------------- graph breaks

def graph_breaks(model_flags: Sequence[str], fused_ce: str, device: torch.device, batch_size: int) -> dict[str, Any]:
    """Graph breaks dynamo finds in one training forward (with the loss) of the model, under the
    trainer's bf16 autocast on CUDA."""
    cfg = GPTConfig(**_model_fields(model_flags), fused_ce=fused_ce)
    model = GPT(cfg).to(device).train()
    idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), device=device)
    torch._dynamo.reset()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        explained = torch._dynamo.explain(model)(idx, idx)
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "reasons": sorted({str(b.reason).splitlines()[0] for b in explained.break_reasons})[:5]}


def _model_fields(flags: Sequence[str]) -> dict[str, int]:
    names = {"--n_layer", "--n_head", "--n_embd", "--block_size", "--vocab_size"}
    return {flags[i][2:]: int(flags[i + 1]) for i in range(len(flags) - 1) if flags[i] in names}


# --------------------------------------------------------------------------- the check

def run_all(*, data_dir: str, work: Path, model_flags: Sequence[str], steps: int, batch_size: int,
            precision_flags: Sequence[str], recipes: Sequence[str] = RECIPES, require_fp8: bool = True,
            device: torch.device, deadline_s: float = DEADLINE_S) -> dict[str, Any]:
    """Every leg, in order, until the deadline; what could not start in time is marked skipped."""
    started = time.time()
    warmup = min(5, steps // 3)
    block = _model_fields(model_flags)["block_size"]
    flags = [*model_flags, "--data_dir", data_dir, "--batch_size", str(batch_size), "--total_batch_size",
             str(batch_size * block), "--max_steps", str(steps), *RUN_FLAGS]
    results: dict[str, Any] = {"steps": steps, "batch_size": batch_size, "warmup_left_out": warmup,
                               "flags": flags, "precision_flags": list(precision_flags), "skipped": []}

    def in_time(name: str) -> bool:
        if time.time() - started < deadline_s:
            return True
        results["skipped"].append(name)
        return False

    results["bf16"] = {}
    for path, value in (("chunked", "on"), ("plain", "off")):
        if in_time(f"bf16 {path}"):
            run = run_trainer("train_improved.py", [*flags, *precision_flags, "--fused_ce", value],
                              work / f"bf16_{path}")
            results["bf16"][path] = _summary(run, warmup)
    results["graph_breaks"] = {path: graph_breaks(model_flags, value, device, batch_size)
                               for path, value in (("chunked", "on"), ("plain", "off")) if in_time(f"graph {path}")}
    results["fp8"] = {}
    baseline = results["bf16"].get("chunked", {})
    fp8_flags = [*flags, "--use_fp8", *(["--require_fp8"] if require_fp8 else [])]
    for recipe in recipes:
        if not in_time(f"fp8 {recipe}"):
            continue
        recipe_flags = [*fp8_flags, "--fp8_recipe", recipe]
        full = run_trainer("train_fp8.py", recipe_flags, work / f"fp8_{recipe}")
        leg: dict[str, Any] = _summary(full, warmup)
        if full["returncode"] == 0 and in_time(f"fp8 {recipe} stop and resume"):
            again = stop_and_resume("train_fp8.py", recipe_flags, work / f"fp8_{recipe}_resumed", steps // 2)
            leg["resume"] = {"stopped_at": again["stopped_at"], "returncode": again["returncode"],
                             **compare_losses(full["rows"], again["rows"])}
        if baseline.get("ok") and leg.get("ok"):
            leg["tokens_per_sec_over_bf16"] = leg["tokens_per_sec"] / baseline["tokens_per_sec"]
            leg["loss_over_bf16"] = leg["final_loss"] / baseline["final_loss"]
        results["fp8"][recipe] = leg
    results["duration_s"] = time.time() - started
    results["verdicts"] = verdicts(results)
    return results


def _summary(run: dict[str, Any], warmup: int) -> dict[str, Any]:
    if run["returncode"] != 0 or not run["rows"]:
        return {"ok": False, "returncode": run["returncode"], "log_tail": run["log_tail"]}
    return {"ok": True, **throughput(run["rows"], warmup)}


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for path, leg in r["bf16"].items():
        out.append({"check": f"bf16 compiled run, {path} cross-entropy", "ok": leg["ok"]})
    for path, g in r["graph_breaks"].items():
        out.append({"check": f"no graph break, {path} cross-entropy", "ok": g["graph_breaks"] == 0})
    for recipe, leg in r["fp8"].items():
        out.append({"check": f"FP8 {recipe}: runs", "ok": leg["ok"]})
        if "loss_over_bf16" in leg:
            out.append({"check": f"FP8 {recipe}: final loss within {LOSS_TOLERANCE:.0%} of bf16's",
                        "ok": abs(leg["loss_over_bf16"] - 1) <= LOSS_TOLERANCE})
        if "resume" in leg:
            out.append({"check": f"FP8 {recipe}: stopped by SIGTERM, resumed, every loss exact",
                        "ok": leg["resume"]["returncode"] == 0 and leg["resume"]["exact"]})
    out.extend({"check": f"{name}: not started before the deadline", "ok": False} for name in r["skipped"])
    return out


# --------------------------------------------------------------------------- report

def _fmt(x: Any, digits: int = 0, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{digits}f}{suffix}"


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    bf16_rows = [[path, _fmt(leg.get("tokens_per_sec")), _fmt(100 * leg["mfu"], 1, "%") if leg.get("mfu") else "n/a",
                  _fmt(leg.get("peak_mem_mb"), 0, " MB"), _fmt(leg.get("final_loss"), 4)] if leg["ok"]
                 else [path, f"failed (exit {leg['returncode']})", "", "", ""] for path, leg in r["bf16"].items()]
    graph_rows = [[path, str(g["graph_breaks"]), str(g["graphs"]), "; ".join(g["reasons"]) or "-"]
                  for path, g in r["graph_breaks"].items()]
    fp8_rows = []
    for recipe, leg in r["fp8"].items():
        if not leg["ok"]:
            last = leg["log_tail"].strip().splitlines()[-1:] or [""]
            fp8_rows.append([recipe, f"failed (exit {leg['returncode']}): {last[0][:150]}", "", "", "", ""])
            continue
        res = leg.get("resume")
        resume = "n/a" if res is None else (
            f"stopped at {res['stopped_at']}, {res['steps']} steps " +
            ("exact" if res["exact"] else f"max diff {_fmt(res['max_abs_diff'], 6)}"))
        fp8_rows.append([recipe, _fmt(leg["tokens_per_sec"]), _fmt(leg.get("tokens_per_sec_over_bf16"), 2),
                         _fmt(leg["final_loss"], 4), _fmt(leg.get("loss_over_bf16"), 3), resume])
    checks = [[v["check"], "ok" if v["ok"] else "**FAILED**"] for v in r["verdicts"]]
    return f"""\
# GPU check

Written by `make gpu-check` (`bench/gpu_check.py`; raw figures in `gpu_check.json`), {r['date']},
{_fmt(r['duration_s'])} s. {m['device']}, torch {m['torch']}, CUDA {m['cuda']}, TransformerEngine {m['te']}.
GPT-2 124M, micro-batch {r['batch_size']} x 1024 tokens, {r['steps']} steps, one process; medians over
the steps after the first {r['warmup_left_out']}. Flags: `{' '.join(r['flags'])}`.

## bf16 with torch.compile: chunked against plain cross-entropy

`src/train_improved.py {' '.join(r['precision_flags'])} --fused_ce on|off`

{_table(["cross-entropy", "tokens/s", "MFU", "peak CUDA memory", "final loss"], bf16_rows)}
## Graph breaks under torch.compile

The training forward with its loss, traced by dynamo (`torch._dynamo.explain`).

{_table(["cross-entropy", "graph breaks", "graphs", "reasons"], graph_rows)}
## FP8 (train_fp8.py --use_fp8 --require_fp8)

Each recipe: one uninterrupted run, and the same run stopped by SIGTERM halfway then resumed with
`--resume latest`, its every step's loss compared with the uninterrupted run's. Against bf16: the
chunked bf16 run above (compiled; the FP8 model is not).

{_table(["recipe", "tokens/s", "tokens/s / bf16", "final loss", "loss / bf16", "stop and resume"], fp8_rows)}
## Checks

{_table(["check", ""], checks)}"""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, [":--", *["--:"] * (len(header) - 1)], *rows] if rows else [header, ["--"] * len(header)]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines) + "\n"


def machine(device: torch.device) -> dict[str, Any]:
    try:
        import transformer_engine
        te = getattr(transformer_engine, "__version__", "installed")
    except ImportError:
        te = "not installed"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "torch": torch.__version__, "cuda": torch.version.cuda, "te": te}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "logs" / "gpu_check"), help="where the report goes")
    parser.add_argument("--data_dir", help="a prepared dataset (default: data/stdlib, else a small one made now)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch_size", type=int, default=8, help="micro-batch in sequences of 1024 tokens")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU on this machine, nothing to check (run `make gpu-check` where one is lent)")
        return 0
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    data = find_data(args.data_dir, work, 3_000_000)
    results = run_all(data_dir=data["dir"], work=work, model_flags=GPT2_124M, steps=args.steps,
                      batch_size=args.batch_size, precision_flags=["--dtype", "bfloat16", "--compile", "true"],
                      device=device)
    results.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(device))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "GPU_CHECK.md").write_text(render(results))
    failed = [v["check"] for v in results["verdicts"] if not v["ok"]]
    verdict = f"FAILED: {'; '.join(failed)}" if failed else "all checks ok"
    print(f"gpu-check: wrote {out / 'GPU_CHECK.md'}; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
