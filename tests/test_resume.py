"""Checkpoints, graceful shutdown and exact resume with real torchrun processes and real signals."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import prepare_ok
from runs import (
    SRC,
    TINY_FLAGS,
    kill_tree,
    load_checkpoint,
    process_tree,
    read_metrics,
    run,
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

STEPS = 30
SCRIPTS = ["train_improved.py", "train_fp8.py"]


DROPOUT = "0.1"  # exact resume must hold with random numbers drawn in every step


def _flags(script: str, *extra: str, dropout: str = DROPOUT) -> list[str]:
    """The run every test here compares against (TINY_FLAGS and directories come on top)."""
    fp8 = ["--use_fp8"] if script == "train_fp8.py" else []  # falls back on this CPU machine
    return ["--max_steps", str(STEPS), "--eval_freq", "10", "--checkpoint_freq", "1000", "--use_tensorboard",
            "--dropout", dropout, *fp8, *extra]


def _interrupt(tmp: Path, data: Path, script: str, sig: signal.Signals, *, at_step: int = 6,
               every_process: bool = False, nproc: int = 2, dropout: str = DROPOUT) -> tuple[str, float]:
    """Start a run, send `sig` once it reaches `at_step`; returns the run's stderr and the
    seconds every process of the run took to exit."""
    flags = _flags(script, dropout=dropout)
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
def reference(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    """Per-step losses of uninterrupted 2-rank runs, one per script."""
    out = {}
    for script in SCRIPTS:
        tmp = tmp_path_factory.mktemp(f"ref_{script.split('.')[0]}")
        train(tmp, prepared_data, *_flags(script), script=script)
        out[script] = step_losses(tmp / "logs")
        assert sorted(out[script]) == list(range(1, STEPS + 1))
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_to_torchrun_then_resume_is_bit_identical(prepared_data: Path, tmp_path: Path, script: str,
                                                          reference: dict[str, dict[int, float]]) -> None:
    stderr, took = _interrupt(tmp_path, prepared_data, script, signal.SIGTERM)
    assert took < 30, f"shutdown took {took:.1f}s"
    saved = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    stopped_at = saved["step"]
    assert 6 <= stopped_at < STEPS
    assert max(step_losses(tmp_path / "logs")) == stopped_at  # the last completed step was saved
    assert "--resume latest" in stderr  # the log says how to resume

    resumed = train(tmp_path, prepared_data, *_flags(script, "--resume", "latest"), script=script)
    assert f"at step {stopped_at}" in resumed.stderr
    steps, _ = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # each step once, none missing
    losses = step_losses(tmp_path / "logs")
    for step in range(stopped_at + 1, STEPS + 1):
        assert losses[step] == reference[script][step], f"step {step}"  # bit-identical
    # TensorBoard, read back with its own reader: every step exactly once across stop and resume.
    events = tensorboard_events(tmp_path / "logs")
    for tag in ("train/loss", "train/lr", "train_perf/tokens_per_sec"):
        assert [e.step for e in events.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    assert [e.step for e in events.Scalars("val/loss")] == [10, 20, 30]
    tb_losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert all(tb_losses[s] == pytest.approx(losses[s]) for s in losses)


def test_stop_at_two_ranks_resume_at_one(prepared_data: Path, tmp_path: Path, tmp_path_factory) -> None:
    """Without dropout (one rank draws other masks than two), 2 -> 1 ranks matches within fp32 noise."""
    ref_dir = tmp_path_factory.mktemp("ref_no_dropout")
    train(ref_dir, prepared_data, *_flags("train_improved.py", dropout="0"))
    reference = step_losses(ref_dir / "logs")
    _interrupt(tmp_path, prepared_data, "train_improved.py", signal.SIGTERM, dropout="0")
    stopped_at = load_checkpoint(tmp_path / "ckpt" / "latest.pt")["step"]
    resumed = train(tmp_path, prepared_data, *_flags("train_improved.py", "--resume", "latest", dropout="0"),
                    nproc=1)
    assert "world size changed from 2 to 1" in resumed.stderr
    losses = step_losses(tmp_path / "logs")
    for step in range(stopped_at + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), f"step {step}"


def test_sigint_to_every_process(prepared_data: Path, tmp_path: Path) -> None:
    """SIGINT to torchrun and every worker at once (torchrun also forwards its own to each worker,
    so a worker sees two within milliseconds: one request to stop, not a second Ctrl+C)."""
    _, took = _interrupt(tmp_path, prepared_data, "train_improved.py", signal.SIGINT, every_process=True)
    assert took < 30
    saved = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert saved["step"] == max(step_losses(tmp_path / "logs"))
    ok, why = validate_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert ok, why


def test_kill_9_during_saves_never_corrupts(prepared_data: Path, tmp_path: Path) -> None:
    """SIGKILL to every process at random moments while a checkpoint is written every step."""
    rng = random.Random(1234)
    ckpt_dir = tmp_path / "ckpt"
    # Larger state than TINY so a write takes long enough to be hit.
    args = [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data), "--n_embd", "128", "--max_steps", "100000",
            "--checkpoint_freq", "1", "--keep_rolling", "3", "--eval_freq", "1000", "--resume", "auto"]
    for _ in range(4):
        proc = start(torchrun_cmd("train_improved.py", 2, args))
        try:
            wait_for_step(tmp_path / "logs", 1, proc, timeout=120)
            time.sleep(rng.uniform(0.2, 2.0))
        finally:
            kill_tree(proc)  # kill -9 of every process of the run at once
        sidecars = sorted(ckpt_dir.glob("*.json"))
        assert sidecars, "no checkpoint written"
        for sidecar in sidecars:
            pt = sidecar.with_suffix(".pt")
            if pt.exists():  # a sidecar may be left behind by a rotation that was cut short
                ok, why = validate_checkpoint(pt)
                assert ok or pt.name == "latest.pt", f"{pt.name}: {why}"
                load_checkpoint(pt)
        assert load_checkpoint(ckpt_dir / "latest.pt")["step"] >= 1


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupt_latest_falls_back_to_newest_valid(prepared_data: Path, tmp_path: Path, damage: str) -> None:
    train(tmp_path, prepared_data, "--max_steps", "8", "--checkpoint_freq", "3", "--eval_freq", "100")
    latest = tmp_path / "ckpt" / "latest.pt"
    data = bytearray(latest.read_bytes())
    os.unlink(latest)  # latest.pt is a hard link: damage only this name
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    latest.write_bytes(bytes(data))
    resumed = train(tmp_path, prepared_data, "--max_steps", "10", "--checkpoint_freq", "3", "--eval_freq", "100",
                    "--resume", "latest")
    # final.pt (a hard link of the old latest.pt, step 8) is the newest valid checkpoint.
    assert "latest.pt" in resumed.stderr and "final.pt" in resumed.stderr
    assert "at step 8" in resumed.stderr
    assert load_checkpoint(tmp_path / "ckpt" / "latest.pt")["step"] == 10


@pytest.fixture(scope="module")
def few_epoch_data(small_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset so small that an epoch lasts a few steps of TINY's 8 windows."""
    out = tmp_path_factory.mktemp("few_epochs") / "data"
    prepare_ok("--dataset", small_corpus_dir, "--out", out, "--max_tokens", "3000", "--val_tokens", "1000",
               "--shard_tokens", "1000", "--compress", "none")
    return out


def test_rotation_tiers_and_best(few_epoch_data: Path, tmp_path: Path) -> None:
    train(tmp_path, few_epoch_data, "--max_steps", "40", "--checkpoint_freq", "4", "--keep_rolling", "3",
          "--keep_epoch", "2", "--eval_freq", "2")
    ckpt = tmp_path / "ckpt"
    rolling = sorted(p.name for p in ckpt.glob("step_*.pt"))
    assert rolling == ["step_00000032.pt", "step_00000036.pt", "step_00000040.pt"]
    epochs = sorted(ckpt.glob("epoch_*.pt"))
    assert len(epochs) == 2
    final_epoch = load_checkpoint(ckpt / "final.pt")["epoch"]
    assert [load_checkpoint(p)["epoch"] for p in epochs] == [final_epoch - 1, final_epoch]
    _, evals = read_metrics(tmp_path / "logs")
    best = min(evals, key=lambda r: r["val_loss"])
    best_meta = json.loads((ckpt / "best.json").read_text())
    assert best_meta["step"] == best["step"] and best_meta["val_loss"] == pytest.approx(best["val_loss"])
    # One write per checkpoint: the names saved at one step share the bytes.
    inodes = {(ckpt / name).stat().st_ino for name in ("final.pt", "latest.pt", "step_00000040.pt")}
    assert len(inodes) == 1
    for pt in ckpt.glob("*.pt"):
        ok, why = validate_checkpoint(pt)
        assert ok, f"{pt.name}: {why}"


def test_resume_refusals_and_auto(prepared_data: Path, tmp_path: Path) -> None:
    single = [sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS, *run_dirs(tmp_path, prepared_data)]
    fresh = run([*single, "--max_steps", "2", "--resume", "auto"])  # nothing to resume: starts fresh
    assert fresh.returncode == 0, fresh.stderr
    again = run([*single, "--max_steps", "2"])  # would overwrite the run already there
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr
    before = (tmp_path / "ckpt" / "latest.pt").read_bytes()
    shape = run([*single, "--max_steps", "4", "--n_embd", "64", "--resume", "latest"])
    assert shape.returncode == 2 and "model shape differs" in shape.stderr and "n_embd" in shape.stderr
    assert len(shape.stderr.strip().splitlines()) == 1
    assert (tmp_path / "ckpt" / "latest.pt").read_bytes() == before  # nothing saved was touched
    done = run([*single, "--max_steps", "2", "--resume", "auto"])
    assert done.returncode == 0 and "nothing left to train" in done.stderr
    # `--resume latest` alone continues with the checkpoint's own config (model, data, batch).
    bare = run([sys.executable, str(SRC / "train_improved.py"), "--checkpoint_dir", str(tmp_path / "ckpt"),
                "--resume", "latest", "--max_steps", "3"])
    assert bare.returncode == 0, bare.stderr
    resumed = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert resumed["step"] == 3 and resumed["config"]["n_embd"] == 32
    assert resumed["config"]["data_dir"] == str(prepared_data)


def _single(tmp: Path, data: Path, ckpt: Path, *args: str) -> list[str]:
    """One plain process of train_improved.py (the choice of checkpoint is rank 0's alone)."""
    return [sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS, "--data_dir", str(data),
            "--checkpoint_dir", str(ckpt), "--log_dir", str(tmp / "logs"), "--eval_freq", "100", *args]


def _files(directory: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (size, mtime_ns, sha256) of every file: equal before and after means untouched."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.iterdir())}


def test_resume_auto_refuses_checkpoints_copied_without_sidecars(prepared_data: Path, tmp_path: Path) -> None:
    """A run's directory copied without its .json files (`cp ckpt/*.pt copy/`): --resume auto must not
    start fresh over it (its saves would replace latest.pt and best.pt and rotate the step files away)."""
    first = run(_single(tmp_path, prepared_data, tmp_path / "ckpt", "--max_steps", "4", "--checkpoint_freq", "2"))
    assert first.returncode == 0, first.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    for pt in (tmp_path / "ckpt").glob("*.pt"):
        shutil.copyfile(pt, copy / pt.name)
    assert {"latest.pt", "final.pt", "step_00000002.pt", "step_00000004.pt"} <= set(_files(copy))
    before = _files(copy)

    auto = run(_single(tmp_path, prepared_data, copy, "--max_steps", "6", "--resume", "auto"))
    assert auto.returncode == 2, auto.stderr
    lines = auto.stderr.strip().splitlines()
    assert len(lines) == 1, auto.stderr
    assert lines[0].startswith(f"train_improved.py: error: no valid checkpoint in {copy} (")
    assert "no sidecar" in lines[0] and "does not start fresh" in lines[0] and "--resume PATH" in lines[0]
    assert _files(copy) == before  # same names, sizes, mtimes and bytes: nothing written, nothing new

    # Named explicitly, a file without a sidecar is loaded after a warning (here into a new directory).
    named = run(_single(tmp_path, prepared_data, tmp_path / "resumed", "--max_steps", "6",
                        "--resume", str(copy / "latest.pt")))
    assert named.returncode == 0, named.stderr
    assert "integrity cannot be verified" in named.stderr and "at step 4" in named.stderr
    assert load_checkpoint(tmp_path / "resumed" / "latest.pt")["step"] == 6
    assert _files(copy) == before


def test_fallback_after_resuming_from_an_earlier_step_skips_the_abandoned_steps(prepared_data: Path,
                                                                                tmp_path: Path) -> None:
    """Run A saves steps 2..8; run B resumes from step 4 and ends at 6; latest.pt is then damaged.
    --resume latest must fall back to B's step 6 (written last), not A's abandoned step 8."""
    ckpt = tmp_path / "ckpt"
    a = run(_single(tmp_path, prepared_data, ckpt, "--max_steps", "8", "--checkpoint_freq", "2"))
    assert a.returncode == 0, a.stderr
    b = run(_single(tmp_path, prepared_data, ckpt, "--max_steps", "6", "--resume", str(ckpt / "step_00000004.pt")))
    assert b.returncode == 0, b.stderr
    assert load_checkpoint(ckpt / "step_00000008.pt")["step"] == 8  # the abandoned run's higher step is there
    latest = ckpt / "latest.pt"
    data = latest.read_bytes()
    latest.unlink()  # a hard link of B's step 6 files: damage this name only
    latest.write_bytes(data[: len(data) // 2])

    c = run(_single(tmp_path, prepared_data, ckpt, "--max_steps", "8", "--resume", "latest"))
    assert c.returncode == 0, c.stderr
    assert "latest.pt" in c.stderr and "resuming from step_00000006.pt" in c.stderr
    assert "at step 6" in c.stderr
