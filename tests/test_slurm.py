"""shell/slurm_train.sbatch under stand-ins for sbatch, srun and scontrol, and the device choice under
launchers that give each process one GPU.

SLURM cannot run here: tests/slurm_standins/ holds stand-ins that behave like the real commands as
far as the job file uses them and record every call (their docstrings say what they emulate and
what not). Everything else is real: two torchrun "nodes" (127.0.0.1 and 127.0.0.2, both this
machine) joined by a c10d rendezvous, gloo on CPU, real signals, real checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from runs import (
    REPO,
    TINY_FLAGS,
    env,
    free_port,
    kill_tree,
    process_tree,
    read_metrics,
    run_dirs,
    wait_for_step,
    wait_gone,
)

from common.dist import choose_device
from common.errors import UserError

JOB_FILE = REPO / "shell" / "slurm_train.sbatch"
STANDINS = REPO / "tests" / "slurm_standins"
JOB_ID = "4242"
STEPS = 30
WARNED_AT = 8  # the step after which the test sends the time limit warning
SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def slurm_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test environment with the stand-ins first on PATH, each run by this interpreter."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("sbatch", "srun", "scontrol"):
        wrapper = bin_dir / name
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDINS / name}.py" "$@"\n')
        wrapper.chmod(0o755)
    state = tmp / "slurm"
    state.mkdir(exist_ok=True)
    return env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_STANDIN_DIR=str(state),
               SLURM_STANDIN_JOB_ID=JOB_ID, TORCHRUN=str(Path(sys.executable).parent / "torchrun"),
               PYTHON=sys.executable, **extra)


def calls(tmp: Path, prog: str, event: str | None = None) -> list[dict[str, Any]]:
    path = tmp / "slurm" / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r["prog"] == prog and r.get("event") == event]


def submit_dir(tmp: Path) -> Path:
    """Somewhere outside the repository: the job must work from any submit directory."""
    path = tmp / "submit"
    path.mkdir(exist_ok=True)
    return path


def sidecar_step(path: Path) -> int:
    return json.loads(path.read_text())["step"]


@pytest.mark.slow
def test_job_stops_at_the_time_limit_warning_requeues_itself_and_the_requeued_job_finishes(
        prepared_data: Path, tmp_path: Path) -> None:
    port = free_port()
    extra = [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data), "--eval_freq", "0", "--checkpoint_freq", "5",
             "--use_tensorboard", "false", "--histogram_freq", "0", "--viz_freq", "0"]
    job_env = slurm_env(tmp_path, CONFIG="configs/tiny_cpu.json", EXTRA_ARGS=" ".join(extra), RDZV_PORT=str(port),
                        SHUTDOWN_TIMEOUT="60")
    # Two nodes with one GPU each (nominal: the trainers run on the CPU); trainer flags after the file.
    cmd = ["sbatch", "--wait", "--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1", str(JOB_FILE),
           "--max_steps", str(STEPS)]
    logs = tmp_path / "logs"
    sbatch = subprocess.Popen(cmd, cwd=submit_dir(tmp_path), env=job_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: set[psutil.Process] = set()
    try:
        wait_for_step(logs, WARNED_AT, sbatch, timeout=180)
        seen.update(process_tree(sbatch))
        first_job = calls(tmp_path, "sbatch", "job_start")[0]
        os.kill(first_job["batch_pid"], signal.SIGUSR1)  # what --signal=B:USR1@N does near the time limit
        deadline = time.monotonic() + 240
        while sbatch.poll() is None and time.monotonic() < deadline:
            seen.update(process_tree(sbatch))  # the requeued job's processes too
            time.sleep(0.5)
        out, err = sbatch.communicate(timeout=10)
        outlived = wait_gone(list(seen), timeout=5)
    finally:
        kill_tree(sbatch)
        for p in seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert sbatch.returncode == 0, f"{out}\n{err}\n{(submit_dir(tmp_path) / 'slurm-gpt-pretrain-4242.out').read_text()}"
    assert not outlived, f"processes of the job outlived it: {outlived}"

    # The #SBATCH header as the job ran it, the command line's options winning.
    starts = calls(tmp_path, "sbatch", "job_start")
    options = starts[0]["options"]
    assert re.fullmatch(r"B:USR1@\d+", options["signal"]) and int(options["signal"].split("@")[1]) >= 90
    assert "requeue" in options and options["open-mode"] == "append" and options["ntasks-per-node"] == "1"
    assert (options["nodes"], options["gpus-per-node"], options["cpus-per-task"]) == ("2", "1", "1")

    # Two jobs: the first requeued itself once (while it ran), the second finished without a requeue.
    assert [s["restart_count"] for s in starts] == [0, 1]
    ends = calls(tmp_path, "sbatch", "job_end")
    assert [e["exit_code"] for e in ends] == [0, 0]
    requeues = [c for c in calls(tmp_path, "scontrol") if c["argv"][0] == "requeue"]
    assert [c["argv"] for c in requeues] == [["requeue", JOB_ID]]
    assert starts[0]["time"] < requeues[0]["time"] < ends[0]["time"]
    assert [c["signal"] for c in calls(tmp_path, "srun", "signal")] == ["SIGUSR1"]  # passed on by the batch shell
    assert ["show", "hostnames", "127.0.0.[1-2]"] in [c["argv"] for c in calls(tmp_path, "scontrol")]

    # One srun per job with one task per node, each task the same torchrun command.
    assert [c["argv"][:3] for c in calls(tmp_path, "srun")] == [["--nodes=2", "--ntasks-per-node=1",
                                                                 "--cpus-per-task=1"]] * 2
    tasks = calls(tmp_path, "srun", "task")
    expected = [job_env["TORCHRUN"], "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={JOB_ID}", "--max-restarts=3", SIGNALS,
                "--shutdown-timeout=60", "src/train_improved.py", "--config", "configs/tiny_cpu.json", *extra,
                "--max_steps", str(STEPS), "--resume", "auto"]
    assert [t["argv"] for t in tasks] == [expected] * 4
    assert [(t["node_id"], t["host"], t["env"]["SLURM_PROCID"]) for t in tasks] == [
        (0, "127.0.0.1", "0"), (1, "127.0.0.2", "1")] * 2

    # The warning stopped the run at its last finished step, saved there; the requeued job resumed
    # from that checkpoint and trained to the end; every step is logged once.
    log = (logs / "log.txt").read_text()
    stop = re.search(r"stopping: saving step (\d+) to ", log)
    assert stop, log[-3000:]
    stopped_at = int(stop.group(1))
    assert WARNED_AT <= stopped_at < STEPS
    resumed = re.search(rf"resumed from \S+latest\.pt at step {stopped_at} ", log)
    assert resumed and resumed.start() > stop.end()
    assert max(int(s) for s in re.findall(r" step (\d+)/\d+ \|", log[:resumed.start()])) == stopped_at
    output = (submit_dir(tmp_path) / "slurm-gpt-pretrain-4242.out").read_text()
    assert f"with latest.pt at step {stopped_at}: requeueing job {JOB_ID}" in output
    steps, _ = read_metrics(logs)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert sidecar_step(tmp_path / "ckpt" / "final.json") == STEPS

    # The output of both jobs, in one file: appended, never truncated.
    headers = re.findall(r"job 4242 \(requeued (\d) times\)", output)
    assert headers == ["0", "1"]
    assert output.rstrip().endswith(f"the run is complete (final.pt at step {STEPS}): not requeued")


def test_job_command_from_the_allocation_and_no_requeue_after_a_failure(tmp_path: Path) -> None:
    """The #SBATCH defaults as they are (one node, 8 GPUs, 32 CPUs per task), the default config
    and port; srun records its task without running it and fails as a crashed run would."""
    job_env = slurm_env(tmp_path, SLURM_STANDIN_SRUN_RUN="0", SLURM_STANDIN_SRUN_EXIT="1")
    proc = subprocess.run(["sbatch", "--wait", str(JOB_FILE), "--checkpoint_dir", str(tmp_path / "ckpt")],
                          cwd=submit_dir(tmp_path), env=job_env, capture_output=True, text=True, timeout=120)
    output = (submit_dir(tmp_path) / "slurm-gpt-pretrain-4242.out").read_text()
    assert proc.returncode == 1, output
    assert calls(tmp_path, "srun")[0]["argv"][:3] == ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=32"]
    [task] = calls(tmp_path, "srun", "task")
    assert task["argv"][1:8] == ["--nnodes=1", "--nproc_per_node=8", "--rdzv_backend=c10d",
                                 f"--rdzv_endpoint=127.0.0.1:{29500 + int(JOB_ID) % 1000}", f"--rdzv_id={JOB_ID}",
                                 "--max-restarts=3", SIGNALS]
    assert task["argv"][9:] == ["src/train_improved.py", "--config", "configs/gpt2_124m.json", "--checkpoint_dir",
                                str(tmp_path / "ckpt"), "--resume", "auto"]
    assert not [c for c in calls(tmp_path, "scontrol") if c["argv"][0] == "requeue"]
    assert "the run ended (srun exit status 1) before final.pt: not requeued" in output


@pytest.mark.parametrize(("setting", "message"), [
    ({"CONFIG": "configs/missing.json"}, "no config file configs/missing.json in "),
    ({"EXTRA_ARGS": "--max_stepz 5"}, "--max_stepz"),
])
def test_a_mistake_ends_the_job_before_srun_with_one_line(tmp_path: Path, setting: dict[str, str],
                                                          message: str) -> None:
    proc = subprocess.run(["sbatch", "--wait", str(JOB_FILE)], cwd=submit_dir(tmp_path),
                          env=slurm_env(tmp_path, **setting), capture_output=True, text=True, timeout=120)
    output = (submit_dir(tmp_path) / "slurm-gpt-pretrain-4242.out").read_text()
    assert proc.returncode == 2, output
    assert len(output.strip().splitlines()) == 1 and message in output
    assert not calls(tmp_path, "srun")


@pytest.mark.parametrize(("visible", "local_rank", "expected"), [(1, 3, 0), (1, 0, 0), (4, 2, 2), (8, 7, 7)])
def test_choose_device_uses_the_one_visible_gpu_whatever_local_rank(
        monkeypatch: pytest.MonkeyPatch, visible: int, local_rank: int, expected: int) -> None:
    """`srun --gpus-per-task=1` leaves each process one visible GPU (CUDA_VISIBLE_DEVICES) while
    LOCAL_RANK counts the node's processes. No GPU exists here: torch.cuda.is_available and
    device_count are patched to describe one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    for preference in ("auto", "cuda"):
        assert choose_device(preference, local_rank) == torch.device("cuda", expected)


def test_choose_device_refuses_a_local_rank_beyond_several_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU exists here: torch.cuda.is_available and device_count are patched to describe two."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="LOCAL_RANK 3 has no GPU: only 2 visible"):
        choose_device("cuda", 3)


def test_choose_device_refuses_several_torchrun_processes_on_one_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc_per_node=2 on a node that shows one GPU would put both ranks on it. No GPU
    exists here: torch.cuda.is_available and device_count are patched to describe one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="2 processes on this node share its one visible GPU"):
        choose_device("cuda", 1, local_world_size=2)
