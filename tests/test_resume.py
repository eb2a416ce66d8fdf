"""Graceful shutdown and exact resume with real torchrun processes and real signals: stopped
and resumed bit for bit (both scripts, dropout on), on another world size or in the other mode.
Under both `--parallel ddp` and `--parallel fsdp`. Checkpoint integrity and fallback:
test_checkpoint_recovery.py."""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
from runs import (
    TINY_FLAGS,
    checkpoint_suffix,
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

from common.checkpoint import validate_checkpoint

STEPS = 20  # stopped at step 6 or a little later: 12 or more steps after the resume to compare
SCRIPTS = ["train_improved.py", "train_fp8.py"]
MODES = ["ddp", "fsdp"]


DROPOUT = "0.1"  # exact resume must hold with random numbers drawn in every step


def _flags(script: str, *extra: str, dropout: str = DROPOUT, parallel: str = "ddp") -> list[str]:
    """The run every test here compares against (TINY_FLAGS and directories come on top)."""
    fp8 = ["--use_fp8"] if script == "train_fp8.py" else []  # falls back on this CPU machine
    return ["--max_steps", str(STEPS), "--eval_freq", "5", "--checkpoint_freq", "1000", "--use_tensorboard",
            "--dropout", dropout, "--parallel", parallel, *fp8, *extra]


def _interrupt(tmp: Path, data: Path, script: str, sig: signal.Signals, *, at_step: int = 6,
               every_process: bool = False, nproc: int = 2, dropout: str = DROPOUT,
               parallel: str = "ddp") -> tuple[str, float]:
    """Start a run, send `sig` once it reaches `at_step`; returns the run's stderr and the
    seconds every process of the run took to exit."""
    flags = _flags(script, dropout=dropout, parallel=parallel)
    proc = start(torchrun_cmd(script, nproc, [*TINY_FLAGS, *run_dirs(tmp, data), *flags]))
    try:
        wait_for_step(tmp / "logs", at_step, proc)
        tree = process_tree(proc)
        assert len(tree) >= 1 + nproc
        sent = time.monotonic()
        if every_process:
            for p in tree:  # every process at once, as `kill -INT -- -PGID` of a job would
                p.send_signal(sig)
        else:
            proc.send_signal(sig)  # what a scheduler does to the launcher
        _, stderr = proc.communicate(timeout=60)
        alive = wait_gone(tree, timeout=60)
        assert not alive, f"still running: {alive}"
        return stderr, time.monotonic() - sent
    finally:
        kill_tree(proc)


@pytest.fixture(scope="module")
def reference(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """reference(script, parallel): per-step losses of an uninterrupted 2-rank run (made once)."""
    made: dict[tuple[str, str], dict[int, float]] = {}

    def losses(script: str, parallel: str) -> dict[int, float]:
        if (script, parallel) not in made:
            tmp = tmp_path_factory.mktemp(f"ref_{script.split('.')[0]}_{parallel}")
            train(tmp, prepared_data, *_flags(script, parallel=parallel), script=script)
            made[script, parallel] = step_losses(tmp / "logs")
            assert sorted(made[script, parallel]) == list(range(1, STEPS + 1))
        return made[script, parallel]

    return losses


# The FP8 script falls back to the plain model here: under fsdp that is the sharded plain model.
@pytest.mark.parametrize("script, parallel", [(script, parallel) for parallel in MODES for script in SCRIPTS])
def test_sigterm_to_torchrun_then_resume_is_bit_identical(prepared_data: Path, tmp_path: Path, script: str,
                                                          parallel: str, reference) -> None:
    stderr, took = _interrupt(tmp_path, prepared_data, script, signal.SIGTERM, parallel=parallel)
    assert took < 30, f"shutdown took {took:.1f}s"
    saved = load_checkpoint(tmp_path / "ckpt" / f"latest{checkpoint_suffix(parallel)}")
    stopped_at = saved["step"]
    assert 6 <= stopped_at < STEPS
    assert max(step_losses(tmp_path / "logs")) == stopped_at  # the last completed step was saved
    assert "--resume latest" in stderr  # the log says how to resume

    resumed = train(tmp_path, prepared_data, *_flags(script, "--resume", "latest", parallel=parallel),
                    script=script)
    assert f"at step {stopped_at}" in resumed.stderr
    steps, _ = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # each step once, none missing
    losses = step_losses(tmp_path / "logs")
    for step in range(stopped_at + 1, STEPS + 1):
        assert losses[step] == reference(script, parallel)[step], f"step {step}"  # bit-identical
    # TensorBoard, read back with its own reader: every step exactly once across stop and resume.
    events = tensorboard_events(tmp_path / "logs")
    for tag in ("train/loss", "train/lr", "train_perf/tokens_per_sec"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    assert [e.step for e in events.Scalars("val/loss")] == [5, 10, 15, 20]  # before and after the stop
    tb_losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert all(tb_losses[s] == pytest.approx(losses[s]) for s in losses)


@pytest.fixture(scope="module")
def no_dropout_reference(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    ref_dir = tmp_path_factory.mktemp("ref_no_dropout")
    train(ref_dir, prepared_data, *_flags("train_improved.py", dropout="0"))
    return step_losses(ref_dir / "logs")


@pytest.fixture(scope="module")
def stopped_without_dropout(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """stopped(parallel, nproc): the directory (ckpt/, logs/) of a run without dropout that SIGTERM
    stopped (made once per mode and world size, with _interrupt's checks); tests resume copies."""
    made: dict[tuple[str, int], Path] = {}

    def stopped(parallel: str, nproc: int) -> Path:
        if (parallel, nproc) not in made:
            tmp = tmp_path_factory.mktemp(f"stopped_{parallel}_{nproc}")
            _interrupt(tmp, prepared_data, "train_improved.py", signal.SIGTERM, dropout="0", parallel=parallel,
                       nproc=nproc)
            made[parallel, nproc] = tmp
        return made[parallel, nproc]

    return stopped


@pytest.mark.parametrize("stopped, resumed, stopped_nproc, nproc", [
    ("ddp", "ddp", 2, 1), ("fsdp", "fsdp", 2, 1), ("fsdp", "fsdp", 1, 2), ("fsdp", "ddp", 2, 2), ("ddp", "fsdp", 2, 2)])
def test_stop_and_resume_on_another_world_size_or_mode(prepared_data: Path, tmp_path: Path, stopped: str,
                                                       resumed: str, stopped_nproc: int, nproc: int,
                                                       no_dropout_reference: dict[int, float],
                                                       stopped_without_dropout) -> None:
    """A 2-rank run stopped and resumed on 1 rank (DCP reshards a sharded checkpoint), a 1-rank
    fsdp run resumed on 2, or a run resumed in the other mode. Without dropout (one rank draws
    other masks than two): within fp32 noise of the uninterrupted 2-rank DDP run. A stopped run
    serves every case that resumes it (each resumes its own copy)."""
    shutil.copytree(stopped_without_dropout(stopped, stopped_nproc), tmp_path, dirs_exist_ok=True)
    stopped_at = load_checkpoint(tmp_path / "ckpt" / f"latest{checkpoint_suffix(stopped)}")["step"]
    proc = train(tmp_path, prepared_data, *_flags("train_improved.py", "--resume", "latest", dropout="0",
                                                  parallel=resumed), nproc=nproc)
    assert f"resumed from {tmp_path / 'ckpt' / ('latest' + checkpoint_suffix(stopped))}" in proc.stderr
    assert nproc == stopped_nproc or f"world size changed from {stopped_nproc} to {nproc}" in proc.stderr
    assert load_checkpoint(tmp_path / "ckpt" / f"final{checkpoint_suffix(resumed)}")["step"] == STEPS
    losses = step_losses(tmp_path / "logs")
    for step in range(stopped_at + 1, STEPS + 1):
        assert losses[step] == pytest.approx(no_dropout_reference[step], rel=1e-4), f"step {step}"


def test_sigint_to_every_process(prepared_data: Path, tmp_path: Path) -> None:
    """SIGINT to torchrun and every worker at once (torchrun also forwards its own to each worker,
    so a worker sees two within milliseconds: one request to stop, not a second Ctrl+C)."""
    _, took = _interrupt(tmp_path, prepared_data, "train_improved.py", signal.SIGINT, every_process=True)
    assert took < 30
    saved = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert saved["step"] == max(step_losses(tmp_path / "logs"))
    ok, why = validate_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert ok, why
