"""Helpers for tests that run the real entry points as processes (torchrun, signals, files)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# A model small enough for 2 ranks on 2 cores to take a step in well under a second.
TINY_FLAGS = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
              "--total_batch_size", "256", "--learning_rate", "3e-3", "--warmup_steps", "5",
              "--eval_batches", "2", "--sample_tokens", "8", "--log_freq", "1", "--seed", "7"]


def env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts: one thread each (two ranks share two
    cores), offline hubs, and src/ importable."""
    out = dict(os.environ)
    out.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)})
    out.update(extra)
    return out


def torchrun_cmd(script: str, nproc: int, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(SRC / script), *args]


def run_dirs(tmp: Path, data_dir: Path) -> list[str]:
    return ["--data_dir", str(data_dir), "--checkpoint_dir", str(tmp / "ckpt"), "--log_dir", str(tmp / "logs")]


def run(cmd: Sequence[str], timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def train(tmp: Path, data_dir: Path, *args: str, nproc: int = 2, script: str = "train_improved.py",
          timeout: float = 300) -> subprocess.CompletedProcess:
    """A complete torchrun training run; fails the test with the run's output if it fails."""
    proc = run(torchrun_cmd(script, nproc, [*TINY_FLAGS, *run_dirs(tmp, data_dir), *args]), timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def read_metrics(log_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-step rows, evaluation rows) of metrics.jsonl."""
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def step_losses(log_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(log_dir)[0]}


def tensorboard_events(log_dir: Path, run: str = "logs") -> EventAccumulator:
    """The scalars of TensorBoard run `run` (LOG_DIR/tensorboard/RUN/, named after the log
    directory unless --run_name is given), read by TensorBoard's own reader."""
    events = EventAccumulator(str(log_dir / "tensorboard" / run), size_guidance={"scalars": 0})
    events.Reload()
    return events


def checkpoint_suffix(parallel: str) -> str:
    """The checkpoints a run writes: `.pt` files under ddp, `.dcp` directories under fsdp."""
    return ".dcp" if parallel == "fsdp" else ".pt"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint as one dict: a `.pt` file as saved; a `.dcp` directory's train_state.pt with
    "model", the full state dict assembled from every rank's part."""
    if path.is_dir():
        from common.dcp_checkpoint import read_model_state

        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        return {**state, "model": read_model_state(path)}
    return torch.load(path, map_location="cpu", weights_only=True)


def wait_for_step(log_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Poll metrics.jsonl until a row for `step` (or later) appears; the last step seen."""
    deadline = time.monotonic() + timeout
    path = log_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before step {step}")
        if path.exists():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def start(cmd: Sequence[str]) -> subprocess.Popen:
    """Start a run in its own session, as a terminal would start a job."""
    return subprocess.Popen(list(cmd), cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def process_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process below it. torchrun starts each worker in a session of its
    own, so a process group does not reach them."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait for every process to exit; the ones still alive after `timeout`."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return alive


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and all its workers at once; nothing of a run outlives its test."""
    tree = process_tree(proc)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    wait_gone(tree, timeout=30)
    proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_at_step(cmd: Sequence[str], log_dir: Path, step: int, sig: signal.Signals = signal.SIGTERM) -> str:
    """Start a run, send `sig` to its launcher once metrics.jsonl reaches `step`, wait for it to
    end; its stderr. Nothing of the run outlives the call."""
    proc = start(cmd)
    try:
        wait_for_step(log_dir, step, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        return stderr
    finally:
        kill_tree(proc)


def die_at_operation(die_at: int, operations: Sequence[str], work: Callable[[], Callable[[], None]]) -> int:
    """Run `work()` in a forked child, then the function it returns with the `os` functions named in
    `operations` trapped: the child dies (os._exit(0), like kill -9) when it is about to make call
    number `die_at` of them. The child's exit code: 0 died as planned, 3 finished first, 4 raised."""
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    try:
        last = work()
        counter = [0]

        def trap(real: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if counter[0] == die_at:
                    os._exit(0)
                counter[0] += 1
                return real(*args, **kwargs)
            return wrapper

        for name in operations:
            setattr(os, name, trap(getattr(os, name)))
        last()
        os._exit(3)
    except BaseException:
        os._exit(4)
