"""shell/start_tensorboard.sh as a real process for tests: start it, wait on its HTTP API, stop it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runs import REPO

START_TB = REPO / "shell" / "start_tensorboard.sh"
TB_STARTUP_TIMEOUT = 120.0  # TensorBoard can take 10 s+ to start on a loaded 2-core box


def start_tensorboard(log_dir: Path, port: int, out_dir: Path) -> tuple[subprocess.Popen, Path, Path]:
    """start_tensorboard.sh LOG_DIR PORT, run from `out_dir` in a session of its own; (process,
    stdout file, stderr file)."""
    out_file, err_file = out_dir / "tensorboard.stdout.txt", out_dir / "tensorboard.stderr.txt"
    with out_file.open("w") as out, err_file.open("w") as err:
        proc = subprocess.Popen(["bash", str(START_TB), str(log_dir), str(port)], cwd=out_dir,
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, out_file, err_file


def stop_tensorboard(proc: subprocess.Popen) -> None:
    """TensorBoard was exec'd in place of the script, in its own session: end that group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


def poll(fn: Callable[[], Any], proc: subprocess.Popen, timeout: float, what: str, err_file: Path) -> Any:
    """Call fn() until it returns a truthy value; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"start_tensorboard.sh exited ({proc.returncode}) before {what}:\n{err_file.read_text()}")
        try:
            result = fn()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{err_file.read_text()}")
