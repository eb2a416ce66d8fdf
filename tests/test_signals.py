"""GracefulShutdown with real signals sent to real processes (and a 2-rank gloo group)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import env

from common.signals import GracefulShutdown

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "signal_worker.py"
ENV = env()


def _torchrun() -> list[str]:
    local = Path(sys.executable).with_name("torchrun")
    return [str(local)] if local.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        time.sleep(0.02)
    raise AssertionError(f"{path.name} did not appear within {timeout} s")


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "--out", str(tmp_path), *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        pid = int(_wait_for(tmp_path / "ready_rank0"))
    except AssertionError:
        proc.kill()
        raise
    assert pid == proc.pid
    return proc, pid


def _finish(proc: subprocess.Popen, timeout: float = 20.0) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"process did not exit within {timeout} s; stderr: {err}") from None
    return proc.returncode, out, err


def test_sigterm_sets_flag_and_process_exits_cleanly(tmp_path: Path) -> None:
    proc, pid = _start(tmp_path)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["signal"] == "SIGTERM"
    assert result["stopped_after"] >= 1


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_ctrl_c_after_window_exits_immediately_with_130(tmp_path: Path, second: signal.Signals) -> None:
    # SIGTERM after SIGINT is how torchrun passes a second Ctrl+C on to its workers.
    # Linger 30 s after the first stop, standing in for a long save the user won't wait for.
    proc, pid = _start(tmp_path, "--linger", "30")
    os.kill(pid, signal.SIGINT)
    _wait_for(tmp_path / "result_rank0.json", timeout=10)
    time.sleep(2.3)  # beyond the 2 s window in which a repeat counts as the same Ctrl+C
    assert proc.poll() is None, "a single SIGINT must not end the process"
    sent = time.monotonic()
    os.kill(pid, second)
    code, _, err = _finish(proc, timeout=10)
    assert code == 130
    assert time.monotonic() - sent < 5
    assert "second Ctrl+C" in err


@pytest.mark.parametrize("gap", [0.0, 0.3])
def test_sigint_repeated_within_window_counts_once(tmp_path: Path, gap: float) -> None:
    # What a worker sees for one Ctrl+C under torchrun: the terminal's SIGINT to the process
    # group, then torchrun's forwarded SIGINT moments later.
    proc, pid = _start(tmp_path, "--linger", "1.5")
    os.kill(pid, signal.SIGINT)
    time.sleep(gap)
    os.kill(pid, signal.SIGINT)
    code, out, err = _finish(proc)
    assert code == 0, err  # not 130: the repeat was not taken as a second Ctrl+C
    result = json.loads(out.strip().splitlines()[-1])
    assert result["signal"] == "SIGINT"
    assert result["received"] == ["SIGINT"]


@pytest.mark.slow
def test_two_ranks_stop_at_the_same_step_when_only_rank1_is_signalled(tmp_path: Path) -> None:
    cmd = _torchrun() + [
        "--standalone", "--nproc_per_node=2", str(WORKER), "--out", str(tmp_path), "--step_time", "0.02",
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        _wait_for(tmp_path / "ready_rank0", timeout=90)
        pid1 = int(_wait_for(tmp_path / "ready_rank1", timeout=90))
        time.sleep(0.3)  # let both ranks run a few lock-step iterations
        os.kill(pid1, signal.SIGUSR1)
        code, out, err = _finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err[-2000:]
    r0 = json.loads((tmp_path / "result_rank0.json").read_text())
    r1 = json.loads((tmp_path / "result_rank1.json").read_text())
    assert r1["signal"] == "SIGUSR1"
    assert r0["signal"] is None  # rank 0 got nothing itself ...
    assert r0["stopped_after"] == r1["stopped_after"]  # ... and stopped after the same step


def test_sigterm_alone_never_exits_at_once(tmp_path: Path) -> None:
    # Schedulers may send SIGTERM more than once; without a Ctrl+C first it only sets the flag.
    proc, pid = _start(tmp_path, "--linger", "3")
    os.kill(pid, signal.SIGTERM)
    _wait_for(tmp_path / "result_rank0.json", timeout=10)
    time.sleep(2.2)
    os.kill(pid, signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 0, err
    assert json.loads((tmp_path / "exit_rank0.json").read_text())["received"] == ["SIGTERM", "SIGTERM"]


@pytest.mark.slow
def test_double_ctrl_c_on_torchrun_ends_the_workers_at_once(tmp_path: Path) -> None:
    # A terminal's Ctrl+C goes to the foreground process group: torchrun's own group here (it
    # starts each worker in a new session, so the workers see only what torchrun forwards).
    cmd = _torchrun() + [
        "--standalone", "--nproc_per_node=2", str(WORKER), "--out", str(tmp_path), "--linger", "60",
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)
    try:
        _wait_for(tmp_path / "ready_rank0", timeout=90)
        _wait_for(tmp_path / "ready_rank1", timeout=90)
        os.killpg(proc.pid, signal.SIGINT)  # first Ctrl+C: graceful stop, the workers "save" for 60 s
        _wait_for(tmp_path / "result_rank0.json", timeout=20)
        _wait_for(tmp_path / "result_rank1.json", timeout=20)
        time.sleep(2.3)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # second Ctrl+C
        _finish(proc, timeout=40)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert elapsed < 20, f"workers kept running {elapsed:.0f} s after the second Ctrl+C"
    assert not (tmp_path / "exit_rank0.json").exists() and not (tmp_path / "exit_rank1.json").exists()


def test_in_process_install_uninstall_and_context_manager() -> None:
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGQUIT)
    before = {s: signal.getsignal(s) for s in handled}
    with GracefulShutdown() as shutdown:
        assert not shutdown.requested
        signal.raise_signal(signal.SIGUSR1)
        assert shutdown.requested and shutdown.signal_name == "SIGUSR1"
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGQUIT)  # Ctrl+\: a stop request like SIGTERM, not an abort
        assert shutdown.signal_name == "SIGUSR1"  # the first signal names the stop
        assert shutdown.received == ["SIGUSR1", "SIGTERM", "SIGQUIT"]
    after = {s: signal.getsignal(s) for s in before}
    assert after == before
