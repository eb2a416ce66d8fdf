"""Checkpoints that cannot be corrupted, with real torchrun processes and real files: kill -9
during saves, damaged files and the fallback to the newest valid one, rotation and tiers, and
what `--resume` refuses. Under both `--parallel ddp` (`.pt` files) and `--parallel fsdp`
(sharded `.dcp` directories) where the format matters. Exact resume itself: test_resume.py."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import prepare_ok
from runs import (
    SRC,
    TINY_FLAGS,
    checkpoint_suffix,
    kill_tree,
    load_checkpoint,
    read_metrics,
    run,
    run_dirs,
    start,
    torchrun_cmd,
    train,
    wait_for_step,
)

from common.checkpoint import Checkpointer, sidecar_path

MODES = ["ddp", "fsdp"]


@pytest.mark.parametrize("parallel", MODES)
def test_kill_9_during_saves_never_corrupts(prepared_data: Path, tmp_path: Path, parallel: str) -> None:
    """SIGKILL to every process at random moments while a checkpoint is written every step (under
    fsdp: every rank writing its part of an asynchronous DCP save); each round resumes."""
    rng = random.Random(1234)
    ckpt_dir = tmp_path / "ckpt"
    # Larger state than TINY so a write takes long enough to be hit.
    args = [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data), "--n_embd", "128", "--max_steps", "100000",
            "--checkpoint_freq", "1", "--keep_rolling", "3", "--eval_freq", "1000", "--resume", "auto",
            "--parallel", parallel]
    newest = 0
    for _ in range(4):
        proc = start(torchrun_cmd("train_improved.py", 2, args))
        try:
            wait_for_step(tmp_path / "logs", newest + 1, proc, timeout=120)
            time.sleep(rng.uniform(0.2, 2.0))
        finally:
            kill_tree(proc)  # kill -9 of every process of the run at once
        infos = Checkpointer(ckpt_dir, enabled=False).list(full=True)
        assert any(sidecar_path(i.path).exists() for i in infos), "no checkpoint written"
        for info in infos:
            if sidecar_path(info.path).exists() and info.path.exists():  # a rotation cut short may leave a sidecar
                assert info.valid or info.path.stem == "latest", f"{info.name}: {info.reason}"
                load_checkpoint(info.path)
        chosen = Checkpointer(ckpt_dir, enabled=False).choose_resume("latest")
        assert chosen.suffix == checkpoint_suffix(parallel)
        step = load_checkpoint(chosen)["step"]
        assert step >= max(newest, 1)  # the previous checkpoint stayed valid, and the next round resumes
        newest = step


@pytest.mark.parametrize("parallel, damage", [("ddp", "truncate"), ("ddp", "bitflip"), ("fsdp", "bitflip")])
def test_corrupt_latest_falls_back_to_newest_valid(prepared_data: Path, tmp_path: Path, parallel: str,
                                                   damage: str) -> None:
    suffix = checkpoint_suffix(parallel)
    flags = ["--max_steps", "8", "--checkpoint_freq", "3", "--eval_freq", "100", "--parallel", parallel]
    train(tmp_path, prepared_data, *flags)
    latest = tmp_path / "ckpt" / f"latest{suffix}"
    damaged = latest / "__1_0.distcp" if parallel == "fsdp" else latest  # rank 1's part of a DCP checkpoint
    data = bytearray(damaged.read_bytes())
    os.unlink(damaged)  # a hard link: damage only this name
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    resumed = train(tmp_path, prepared_data, *flags[2:], "--max_steps", "10", "--resume", "latest")
    # final (a hard link of the old latest, step 8) is the newest valid checkpoint.
    assert f"latest{suffix}" in resumed.stderr and f"final{suffix}" in resumed.stderr
    assert "at step 8" in resumed.stderr
    assert load_checkpoint(latest)["step"] == 10


@pytest.fixture(scope="module")
def few_epoch_data(small_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset so small that an epoch lasts a few steps of TINY's 8 windows."""
    out = tmp_path_factory.mktemp("few_epochs") / "data"
    prepare_ok("--dataset", small_corpus_dir, "--out", out, "--max_tokens", "3000", "--val_tokens", "1000",
               "--shard_tokens", "1000", "--compress", "none")
    return out


@pytest.mark.parametrize("parallel", MODES)
def test_rotation_tiers_and_best(few_epoch_data: Path, tmp_path: Path, parallel: str) -> None:
    suffix = checkpoint_suffix(parallel)
    # 28 steps: 7 rolling saves of which 3 stay, and more than 3 epochs of which 2 stay.
    train(tmp_path, few_epoch_data, "--max_steps", "28", "--checkpoint_freq", "4", "--keep_rolling", "3",
          "--keep_epoch", "2", "--eval_freq", "2", "--parallel", parallel)
    ckpt = tmp_path / "ckpt"
    rolling = sorted(p.name for p in ckpt.glob(f"step_*{suffix}"))
    assert rolling == [f"step_{step:08d}{suffix}" for step in (20, 24, 28)]
    epochs = sorted(ckpt.glob(f"epoch_*{suffix}"))
    assert [p.stem for p in epochs] == ["epoch_002", "epoch_003"]  # three epochs saved, the first rotated away
    final_epoch = load_checkpoint(ckpt / f"final{suffix}")["epoch"]
    assert [load_checkpoint(p)["epoch"] for p in epochs] == [final_epoch - 1, final_epoch]
    _, evals = read_metrics(tmp_path / "logs")
    best = min(evals, key=lambda r: r["val_loss"])
    best_meta = json.loads(sidecar_path(ckpt / f"best{suffix}").read_text())
    assert best_meta["step"] == best["step"] and best_meta["val_loss"] == pytest.approx(best["val_loss"])
    # One write per checkpoint: the names saved at one step share the bytes (a DCP directory's files).
    shared = "train_state.pt" if parallel == "fsdp" else ""
    inodes = {(ckpt / name / shared).stat().st_ino for name in (f"final{suffix}", f"latest{suffix}", rolling[-1])}
    assert len(inodes) == 1
    for info in Checkpointer(ckpt, enabled=False).list(full=True):
        assert info.valid, f"{info.name}: {info.reason}"


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
