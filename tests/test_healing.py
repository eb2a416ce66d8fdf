"""Unattended runs heal themselves, with real torchrun processes: elastic restarts resume by
themselves, spikes are skipped then rolled back, a hung rank ends the run instead of blocking it.
Restarts and rollbacks load checkpoints: they run under both --parallel ddp and fsdp."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from runs import (
    REPO,
    SRC,
    TINY_FLAGS,
    checkpoint_suffix,
    env,
    kill_tree,
    load_checkpoint,
    process_tree,
    read_metrics,
    run_dirs,
    start,
    step_losses,
    tensorboard_events,
    torchrun_cmd,
    train,
    wait_for_step,
    wait_gone,
)

STEPS = 30  # the spike drill: skips at 20-25, rollbacks at 23 and 26
PLAIN_STEPS = 20  # the runs without it
SPIKE = ["--spike_window", "8", "--spike_zscore", "6", "--max_consecutive_skips", "3",
         "--inject_fault", "loss_spike@20-25"]


MODES = ["ddp", "fsdp"]


def _flags(*extra: str, parallel: str = "ddp", steps: int = STEPS) -> list[str]:
    return ["--max_steps", str(steps), "--eval_freq", "10", "--checkpoint_freq", "5", "--keep_rolling", "20",
            "--dropout", "0.1", "--use_tensorboard", "--parallel", parallel, *extra]


def _tb_steps(log_dir: Path, tag: str) -> list[int]:
    return [e.step for e in tensorboard_events(log_dir).Scalars(tag)]


def _events(log_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == kind]


@pytest.fixture(scope="module")
def uninterrupted(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """uninterrupted(name, parallel): (per-step losses, run directory) of an uninterrupted run,
    "plain" or with the persistent loss "spike" (made once)."""
    made: dict[tuple[str, str], tuple[dict[int, float], Path]] = {}

    def run(name: str, parallel: str) -> tuple[dict[int, float], Path]:
        if (name, parallel) not in made:
            tmp = tmp_path_factory.mktemp(f"uninterrupted_{name}_{parallel}")
            spike = name == "spike"
            train(tmp, prepared_data, *_flags(*(SPIKE if spike else []), parallel=parallel,
                                              steps=STEPS if spike else PLAIN_STEPS))
            made[name, parallel] = step_losses(tmp / "logs"), tmp
        return made[name, parallel]

    return run


@pytest.mark.parametrize("parallel", MODES)
def test_elastic_restart_after_a_killed_worker_resumes_by_itself(prepared_data: Path, tmp_path: Path,
                                                                 uninterrupted, parallel: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(SRC / "train_improved.py"), *TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
           *_flags(parallel=parallel, steps=PLAIN_STEPS)]
    proc = start(cmd)
    try:
        wait_for_step(tmp_path / "logs", 12, proc)
        beats = json.loads((tmp_path / "logs" / "heartbeat.json").read_text())["ranks"]
        psutil.Process(beats["1"]["pid"]).send_signal(signal.SIGKILL)  # rank 1 dies mid-run
        _, stderr = proc.communicate(timeout=240)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr[-4000:]
    assert "elastic restart 1" in (tmp_path / "logs" / "log.txt").read_text()
    steps, _ = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in steps] == list(range(1, PLAIN_STEPS + 1))  # no step twice, none missing
    losses = step_losses(tmp_path / "logs")
    reference, _ = uninterrupted("plain", parallel)
    assert all(losses[s] == reference[s] for s in range(1, PLAIN_STEPS + 1))  # bit for bit
    assert _tb_steps(tmp_path / "logs", "train/loss") == list(range(1, PLAIN_STEPS + 1))


@pytest.mark.parametrize("parallel", MODES)
def test_persistent_spike_is_skipped_then_rolled_back(uninterrupted, parallel: str) -> None:
    losses, run_dir = uninterrupted("spike", parallel)
    logs = run_dir / "logs"
    skips = _events(logs, "skip")
    assert [r["skipped_step"] for r in skips] == list(range(20, 26))
    assert all("outlier" in r["reason"] for r in skips)
    rollbacks = _events(logs, "rollback")
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(23, 15), (26, 20)]
    assert _tb_steps(logs, "train/skipped_steps") == [r["step"] for r in skips]
    assert _tb_steps(logs, "train/rollbacks") == [23, 26]
    assert max(losses) == STEPS  # the run completed
    log_text = (logs / "log.txt").read_text()
    assert "step 20 skipped: outlier" in log_text and "rollback 2/3 at step 26" in log_text


@pytest.mark.parametrize("parallel", MODES)
def test_stop_and_resume_across_skips_and_a_rollback_is_exact(prepared_data: Path, tmp_path: Path,
                                                              uninterrupted, parallel: str) -> None:
    """Stopped by SIGTERM in the middle of a streak of skipped steps (after the first rollback),
    resumed with the same drill: every step equals the uninterrupted run's."""
    proc = start(torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
                                                       *_flags(*SPIKE, parallel=parallel)]))
    try:
        wait_for_step(tmp_path / "logs", 23, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    stopped_at = load_checkpoint(tmp_path / "ckpt" / f"latest{checkpoint_suffix(parallel)}")["step"]
    assert 23 <= stopped_at < STEPS
    train(tmp_path, prepared_data, *_flags(*SPIKE, "--resume", "latest", parallel=parallel))
    losses = step_losses(tmp_path / "logs")
    reference, reference_dir = uninterrupted("spike", parallel)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(losses[s] == reference[s] for s in losses), stopped_at
    expected = [(r["step"], r["to_step"]) for r in _events(reference_dir / "logs", "rollback")]
    assert [(r["step"], r["to_step"]) for r in _events(tmp_path / "logs", "rollback")] == expected


def test_a_hung_rank_ends_the_run_and_resume_continues(prepared_data: Path, tmp_path: Path) -> None:
    """Rank 1 hangs for good; rank 0's next collective times out (a step takes well under a second
    here, so 10 s of silence is a hang, not a slow step) and ends the run; torchrun then SIGKILLs
    the hung rank, which ignores its SIGTERM, after its fixed 30 s."""
    proc = start(torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
                                                       *_flags("--inject_fault", "hang@8:1",
                                                               "--collective_timeout_s", "10",
                                                               steps=PLAIN_STEPS)]))
    try:
        wait_for_step(tmp_path / "logs", 5, proc)
        tree = process_tree(proc)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        alive = wait_gone(tree, timeout=max(1.0, 90 - (time.monotonic() - started)))
    finally:
        kill_tree(proc)
    assert not alive and proc.returncode != 0
    assert "another rank stopped answering" in stderr and "step 5" in stderr, stderr[-3000:]
    beats = json.loads((tmp_path / "logs" / "heartbeat.json").read_text())["ranks"]
    assert beats["0"]["phase"] == "failed" and beats["1"]["phase"] == "train"  # rank 1 went silent
    assert beats["1"]["step"] <= 7
    done = subprocess.run(torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
                                                                *_flags("--resume", "latest", steps=PLAIN_STEPS)]),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max(step_losses(tmp_path / "logs")) == PLAIN_STEPS
