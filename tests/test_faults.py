"""Faults that used to lose work, with real torchrun processes, real signals and real files:
a dropped terminal (SIGHUP), a killed launcher, a non-finite gradient, a failed write on rank 0,
refusals that must come before the first step."""
from __future__ import annotations

import json
import os
import pty
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import prepare_ok
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
    run,
    run_dirs,
    start,
    step_losses,
    torchrun_cmd,
    train,
    wait_for_step,
    wait_gone,
)

STEPS = 20


def _args(tmp: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY_FLAGS, *run_dirs(tmp, data), "--max_steps", str(STEPS), "--eval_freq", "10",
            "--checkpoint_freq", "1000", "--dropout", "0.1", *extra]


@pytest.fixture(scope="module")
def reference(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("reference")
    train(tmp, prepared_data, *_args(tmp, prepared_data)[len(TINY_FLAGS):])
    return step_losses(tmp / "logs")


def _resume_matches(tmp: Path, data: Path, reference: dict[int, float], stopped_at: int) -> None:
    train(tmp, data, *_args(tmp, data, "--resume", "latest")[len(TINY_FLAGS):])
    steps, _ = read_metrics(tmp / "logs")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    losses = step_losses(tmp / "logs")
    assert all(losses[s] == reference[s] for s in range(stopped_at + 1, STEPS + 1))


def test_sighup_from_a_dropped_terminal_saves_the_last_step(prepared_data: Path, tmp_path: Path,
                                                           reference: dict[int, float]) -> None:
    """torchrun in a pseudo-terminal that goes away (the ssh session drops): the terminal is
    closed, so every write to it fails, and torchrun forwards SIGHUP to the workers."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(torchrun_cmd("train_improved.py", 2, _args(tmp_path, prepared_data)), cwd=REPO,
                            env=env(), stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    reader = threading.Thread(target=_drain, args=(master,), daemon=True)
    reader.start()
    try:
        wait_for_step(tmp_path / "logs", 9, proc)
        tree = process_tree(proc)
        os.close(master)  # the terminal is gone: writes to it now fail with EIO
        proc.send_signal(signal.SIGHUP)
        alive = wait_gone(tree, timeout=60)
        assert not alive, f"still running: {alive}"
    finally:
        kill_tree(proc)
    saved = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert saved["step"] == max(step_losses(tmp_path / "logs"))  # the last finished step
    assert "received SIGHUP" in (tmp_path / "logs" / "log.txt").read_text()
    _resume_matches(tmp_path, prepared_data, reference, saved["step"])


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


def test_killed_launcher_leaves_no_worker_and_resume_continues(prepared_data: Path, tmp_path: Path,
                                                               reference: dict[int, float]) -> None:
    proc = start(torchrun_cmd("train_improved.py", 2, _args(tmp_path, prepared_data)))
    try:
        wait_for_step(tmp_path / "logs", 7, proc)
        workers = process_tree(proc)[1:]
        assert len(workers) >= 2
        proc.send_signal(signal.SIGKILL)  # torchrun alone, as the OOM killer would
        alive = wait_gone(workers, timeout=30)
        assert not alive, f"orphaned workers still running 30 s later: {alive}"
    finally:
        kill_tree(proc)
    saved = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert saved["step"] == max(step_losses(tmp_path / "logs")) < STEPS  # stopped, did not train on alone
    assert "launcher (torchrun) is gone" in (tmp_path / "logs" / "log.txt").read_text()
    _resume_matches(tmp_path, prepared_data, reference, saved["step"])


def _finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_non_finite_gradient_on_one_rank_is_skipped_by_every_rank(prepared_data: Path, tmp_path: Path,
                                                                  parallel: str) -> None:
    """A finite loss with a NaN gradient on rank 1 only: rank 0's own gradient is finite, yet it
    skips too (the decision is agreed), so the weights of step 12 are those of step 11. Under fsdp
    the NaN is in rank 1's shard, and fused AdamW skips the DTensor parameters through the same
    `found_inf`, decided on the device."""
    suffix = checkpoint_suffix(parallel)
    train(tmp_path, prepared_data, "--max_steps", str(STEPS), "--eval_freq", "10", "--checkpoint_freq", "1",
          "--keep_rolling", "30", "--inject_fault", "nan_grad@12:1", "--parallel", parallel)
    ckpt = tmp_path / "ckpt"
    before = load_checkpoint(ckpt / f"step_00000011{suffix}")
    after = load_checkpoint(ckpt / f"step_00000012{suffix}")
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert not all(torch.equal(after["model"][k], load_checkpoint(ckpt / f"step_00000013{suffix}")["model"][k])
                   for k in after["model"])  # step 13 is applied again
    assert all(_finite(p) for p in ckpt.glob(f"*{suffix}"))
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in rows if r.get("event") == "skip"]
    assert [r["skipped_step"] for r in skips] == [12] and "gradient norm is nan" in skips[0]["reason"]
    assert "step 12 skipped" in (tmp_path / "logs" / "log.txt").read_text()
    losses = step_losses(tmp_path / "logs")
    assert losses[12] is not None and all(losses[s] is not None for s in range(13, STEPS + 1))


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _failing_run(tmp_path: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    """A run whose checkpoint writes fail with EFBIG (a real file-size limit, inherited by every
    process; larger than the limit: rank 0's files under ddp, every rank's part under fsdp)."""
    cmd = torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, data), *extra])
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: _limit_file_size(8 << 20))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["async", "final"])
def test_failed_write_on_rank0_ends_every_rank_with_one_reason(prepared_data: Path, tmp_path: Path,
                                                               kind: str, parallel: str) -> None:
    extra = ["--max_steps", "12", "--eval_freq", "100", "--parallel", parallel]
    extra += ["--checkpoint_freq", "5"] if kind == "async" else ["--checkpoint_freq", "1000"]
    proc = _failing_run(tmp_path, prepared_data, *extra)
    assert proc.returncode != 0
    assert f'File "{SRC}' not in proc.stderr, proc.stderr[-3000:]  # no worker traceback (torchrun adds its own)
    assert proc.stderr.count("stopped: checkpoint write") == 1, proc.stderr[-3000:]  # rank 0's line, once
    beats = json.loads((tmp_path / "logs" / "heartbeat.json").read_text())["ranks"]
    assert {r: b["phase"] for r, b in beats.items()} == {"0": "failed", "1": "failed"}
    assert beats["0"]["reason"] == beats["1"]["reason"] and "File too large" in beats["1"]["reason"]
    if kind == "async":
        assert max(step_losses(tmp_path / "logs")) <= 8  # stopped within a few steps of the failed write


def test_refusals_before_the_first_step(prepared_data: Path, small_corpus_dir: Path, tmp_path: Path) -> None:
    single = [sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS]
    no_val = tmp_path / "no_val"
    prepare_ok("--dataset", small_corpus_dir, "--out", no_val, "--val_tokens", "10", "--max_tokens", "40000")
    for extra, fragment in [
        (["--data_dir", str(no_val)], "fewer than one batch"),
        (["--data_dir", str(prepared_data), "--eval_batches", "0"], "--eval_batches 0"),
        (["--data_dir", str(prepared_data), "--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--data_dir", str(prepared_data), "--beta1", "1.5"], "--beta1 must be in [0, 1), got 1.5"),
        (["--data_dir", str(prepared_data), "--epochs", "inf"], "--epochs must be a finite number"),
        (["--data_dir", str(prepared_data), "--weight_decay", "nan"], "--weight_decay must be a finite number"),
        (["--data_dir", str(prepared_data), "--dtype", "float16"], "loss scaling"),
    ]:
        proc = run([*single, "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs"),
                    *extra])
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (extra, proc.stderr)
        assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
        assert not (tmp_path / "logs" / "metrics.jsonl").exists()


def test_changed_block_size_on_resume_is_one_line(prepared_data: Path, tmp_path: Path) -> None:
    single = [sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS, *run_dirs(tmp_path, prepared_data)]
    assert run([*single, "--max_steps", "2"]).returncode == 0
    before = (tmp_path / "ckpt" / "latest.pt").read_bytes()
    proc = run([*single, "--max_steps", "4", "--block_size", "64", "--resume", "latest"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "block_size=32 in the checkpoint but 64 now" in proc.stderr
    assert (tmp_path / "ckpt" / "latest.pt").read_bytes() == before


def test_epochs_sized_horizon_survives_a_grown_dataset(small_corpus_dir: Path, tmp_path: Path) -> None:
    """A run sized by --epochs keeps its schedule's horizon when resumed after the dataset grew."""
    data = tmp_path / "data"
    # 10,000 training tokens in shards of 4,000 (the last one partial): an epoch of 40 steps.
    prepare_ok("--dataset", small_corpus_dir, "--out", data, "--val_tokens", "5000", "--max_tokens", "15000",
               "--shard_tokens", "4000")
    args = [*TINY_FLAGS, *run_dirs(tmp_path, data), "--max_steps", "0", "--epochs", "1", "--eval_freq", "1000",
            "--checkpoint_freq", "1000"]
    proc = start(torchrun_cmd("train_improved.py", 2, args))
    try:
        wait_for_step(tmp_path / "logs", 5, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    planned = load_checkpoint(tmp_path / "ckpt" / "latest.pt")["scheduler"]["max_steps"]
    assert planned == -(-10000 // 256)  # ceil(train tokens / tokens per step)
    prepare_ok("--dataset", small_corpus_dir, "--out", data, "--val_tokens", "5000", "--max_tokens", "30000",
               "--shard_tokens", "4000")  # the dataset doubles while the run is stopped
    train(tmp_path, data, "--max_steps", "0", "--epochs", "1", "--eval_freq", "1000", "--checkpoint_freq", "1000",
          "--resume", "latest")
    final = load_checkpoint(tmp_path / "ckpt" / "final.pt")
    assert final["step"] == planned and final["scheduler"]["max_steps"] == planned


def test_damaged_shard_found_mid_run_stops_every_rank_with_one_line(small_corpus_dir: Path, tmp_path: Path) -> None:
    """A shard whose bytes changed after preparation is refused when the loader first reads it,
    on whichever rank reads it; the others learn it through the step's agreement."""
    data = tmp_path / "data"
    prepare_ok("--dataset", small_corpus_dir, "--out", data, "--val_tokens", "5000", "--max_tokens", "40000",
               "--shard_tokens", "3000", "--compress", "none")
    victim = sorted(data.glob("train_*.bin"))[5]
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0x01  # a token changes; the header and the size stay valid
    victim.write_bytes(bytes(raw))
    proc = run(torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, data), "--max_steps", "200",
                                                     "--eval_freq", "1000", "--checkpoint_freq", "1000"]), timeout=300)
    assert proc.returncode != 0
    assert f'File "{SRC}' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f"error: {victim}") == 1, proc.stderr[-3000:]
    beats = json.loads((tmp_path / "logs" / "heartbeat.json").read_text())["ranks"]
    assert beats["0"]["phase"] == beats["1"]["phase"] == "failed" and beats["0"]["reason"] == beats["1"]["reason"]
