"""shell/start_tensorboard.sh and shell/list_checkpoints.sh, run as real processes from another cwd."""
from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from runs import REPO, free_port
from tensorboard_server import START_TB, TB_STARTUP_TIMEOUT, http_json, poll, start_tensorboard, stop_tensorboard

from common.logger import RunLogger

LIST_CKPT = REPO / "shell" / "list_checkpoints.sh"


# --------------------------------------------------------------------------- start_tensorboard.sh


def expected_ssh_line(port: int) -> str:
    user = os.environ.get("USER") or pwd.getpwuid(os.getuid()).pw_name
    fqdn = subprocess.run(["hostname", "-f"], capture_output=True, text=True)
    host = fqdn.stdout.strip() if fqdn.returncode == 0 and fqdn.stdout.strip() else socket.gethostname()
    return f"ssh -N -L {port}:localhost:{port} {user}@{host}"


def log_resumed_run(log_dir: Path) -> None:
    """Steps 1..7, a stop, then a resume from step 5 logging 6..10: the UI must show 1..10 once."""
    with RunLogger(log_dir, enabled=True, use_tensorboard=True) as run:
        for step in range(1, 8):
            run.log_step(step, {"loss": 10.0 - step, "lr": 1e-3})
    time.sleep(1.05 - (time.time() % 1.0))  # event file names carry whole seconds
    with RunLogger(log_dir, enabled=True, use_tensorboard=True, resume_step=5) as run:
        for step in range(6, 11):
            run.log_step(step, {"loss": 100.0 - step, "lr": 1e-3})


def test_start_tensorboard_serves_the_run_and_prints_the_ssh_line(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_resumed_run(log_dir)
    port = free_port()
    proc, out_file, err_file = start_tensorboard(log_dir, port, tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        runs = poll(lambda: http_json(f"{base}/data/runs"), proc, TB_STARTUP_TIMEOUT, "the run list", err_file)
        assert runs == ["logs"]  # named after the log directory (no --run_name), not "tensorboard"
        query = urllib.parse.urlencode({"run": "logs", "tag": "train/loss"})

        def full_curve() -> list | None:  # [[wall_time, step, value], ...] once loaded through step 10
            points = http_json(f"{base}/data/plugin/scalars/scalars?{query}")
            return points if points and points[-1][1] == 10 else None

        points = poll(full_curve, proc, 60, "the train/loss scalars", err_file)
        assert [step for _, step, _ in points] == list(range(1, 11))  # purged on resume: once each
        assert [value for _, step, value in points if step in (5, 6)] == [5.0, 94.0]

        lines = [line.strip() for line in out_file.read_text().splitlines()]
        assert expected_ssh_line(port) in lines
        assert f"http://localhost:{port}/" in out_file.read_text()
        assert lines[0] == f"TensorBoard on {log_dir / 'tensorboard'}"
        with pytest.raises(OSError):  # bound to localhost only: the port is taken on 127.0.0.1
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
    finally:
        stop_tensorboard(proc)
    assert proc.returncode is not None


def test_start_tensorboard_on_a_folder_of_several_runs_lists_each(tmp_path: Path) -> None:
    for name in ("gpt2_124m", "gpt2_350m"):
        with RunLogger(tmp_path / "runs" / name, enabled=True, use_tensorboard=True) as run:
            run.log_step(1, {"loss": 1.0})
    port = free_port()
    proc, _, err_file = start_tensorboard(tmp_path / "runs", port, tmp_path)
    try:
        runs = poll(lambda: http_json(f"http://127.0.0.1:{port}/data/runs"), proc, TB_STARTUP_TIMEOUT,
                    "the run list", err_file)
        assert sorted(runs) == ["gpt2_124m/tensorboard/gpt2_124m", "gpt2_350m/tensorboard/gpt2_350m"]
    finally:
        stop_tensorboard(proc)
    assert not (tmp_path / "runs" / "tensorboard").exists()  # served as it is


def test_start_tensorboard_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(["bash", str(START_TB), str(tmp_path), str(port)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"port {port} is already in use" in proc.stderr
    assert "pick another port" in proc.stderr and str(port + 1) in proc.stderr
    assert "ssh -N" not in proc.stdout  # nothing started


def test_start_tensorboard_missing_tensorboard_names_the_install(tmp_path: Path) -> None:
    fake_repo = tmp_path / "repo"
    (fake_repo / "shell").mkdir(parents=True)
    shutil.copy(START_TB, fake_repo / "shell" / START_TB.name)
    path = "/usr/bin:/bin"
    if any(Path(d, "tensorboard").exists() for d in path.split(":")):
        pytest.skip("a system-wide tensorboard is installed")
    proc = subprocess.run(["bash", str(fake_repo / "shell" / START_TB.name)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})
    assert proc.returncode == 2
    assert "tensorboard not found" in proc.stderr and "pip install tensorboard" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_start_tensorboard_rejects_a_bad_port(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(START_TB), str(tmp_path), "http"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "PORT must be a number" in proc.stderr


# --------------------------------------------------------------------------- list_checkpoints.sh


def save_checkpoint(directory: Path, name: str, step: int, epoch: int, val_loss: float | None) -> Path:
    """A real torch.save file and the sidecar the checkpointer writes beside it."""
    path = directory / name
    torch.save({"model": {"w": torch.randn(32, 32)}, "step": step, "epoch": epoch, "val_loss": val_loss}, path)
    write_sidecar(path, step, epoch, val_loss)
    return path


def write_sidecar(path: Path, step: int, epoch: int, val_loss: float | None) -> None:
    data = path.read_bytes()
    sidecar = {"file": path.name, "step": step, "epoch": epoch, "val_loss": val_loss,
               "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
               "written_at": "2026-01-02T03:04:05+00:00", "meta": {"world_size": 2}}
    path.with_suffix(".json").write_text(json.dumps(sidecar))


def run_list(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LIST_CKPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env)


def table(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("  ")]
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if not cells[0].endswith(".pt"):
            break  # the problem list below the table
        rows[cells[0]] = dict(zip(header[:7], cells[:7])) | {"NOTE": "  ".join(cells[7:])}
    return rows


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints"
    d.mkdir()
    save_checkpoint(d, "step_00000100.pt", 100, 0, 4.75)
    save_checkpoint(d, "step_00000200.pt", 200, 0, 4.25)
    save_checkpoint(d, "epoch_000.pt", 150, 0, 4.5)
    save_checkpoint(d, "best.pt", 200, 0, 4.25)
    save_checkpoint(d, "step_00000300.pt", 300, 1, 4.5)
    os.link(d / "step_00000300.pt", d / "latest.pt")  # a hard link, as the checkpointer may make
    write_sidecar(d / "latest.pt", 300, 1, 4.5)
    return d


def test_list_checkpoints_table_marks_and_no_torch(checkpoint_dir: Path, tmp_path: Path) -> None:
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text("raise ImportError('list_checkpoints.sh imported torch')\n")
    proc = run_list(str(checkpoint_dir), cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(poison)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert set(rows) == {"step_00000100.pt", "step_00000200.pt", "epoch_000.pt", "best.pt",
                         "step_00000300.pt", "latest.pt"}
    assert (rows["step_00000100.pt"]["STEP"], rows["step_00000100.pt"]["VAL_LOSS"]) == ("100", "4.7500")
    assert (rows["epoch_000.pt"]["STEP"], rows["epoch_000.pt"]["EPOCH"]) == ("150", "0")
    latest = rows["latest.pt"]
    assert (latest["STEP"], latest["EPOCH"], latest["VAL_LOSS"]) == ("300", "1", "4.5000")
    assert all(r["STATUS"] == "ok" for r in rows.values())
    assert "<- latest" in rows["latest.pt"]["NOTE"] and "<- best" in rows["best.pt"]["NOTE"]
    assert "same file as step_00000300.pt" in rows["latest.pt"]["NOTE"]
    assert rows["step_00000200.pt"]["WRITTEN"].startswith("2026-01-0")
    # Sizes in IEC binary units, as `ls -lh` shows them: one unit everywhere in the suite.
    size = (checkpoint_dir / "best.pt").stat().st_size
    assert rows["best.pt"]["SIZE"] == f"{size / 1024:.1f} KiB"
    assert re.search(r"^Total disk use: \d+\.\d KiB ", proc.stdout, re.M)


def test_list_checkpoints_flags_corrupt_files(checkpoint_dir: Path, tmp_path: Path) -> None:
    truncated = checkpoint_dir / "step_00000100.pt"
    truncated.write_bytes(truncated.read_bytes()[:-64])
    flipped = checkpoint_dir / "step_00000200.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content
    flipped.write_bytes(bytes(data))
    (checkpoint_dir / "epoch_000.json").write_text('{"file": "epoch_000.pt", "st')
    (checkpoint_dir / "step_00000400.pt").write_bytes(b"\0" * 100)  # no sidecar

    proc = run_list(str(checkpoint_dir), cwd=tmp_path)
    assert proc.returncode == 1
    rows = table(proc.stdout)
    assert rows["step_00000100.pt"]["STATUS"] == "CORRUPT (size)"
    assert rows["step_00000100.pt"]["STEP"] == "100" and rows["step_00000100.pt"]["VAL_LOSS"] == "4.7500"
    assert rows["step_00000200.pt"]["STATUS"] == "ok"  # sizes only without --verify
    assert rows["epoch_000.pt"]["STATUS"] == "BAD SIDECAR"
    assert rows["step_00000400.pt"]["STATUS"] == "NO SIDECAR"
    assert "step_00000100.pt: " in proc.stdout and "sidecar says" in proc.stdout

    verified = run_list("--verify", str(checkpoint_dir), cwd=tmp_path)
    assert verified.returncode == 1
    rows = table(verified.stdout)
    assert rows["step_00000200.pt"]["STATUS"] == "CORRUPT (sha256)"
    assert rows["step_00000300.pt"]["STATUS"] == "ok (sha256)"
    assert rows["best.pt"]["STATUS"] == "ok (sha256)"


def test_list_checkpoints_missing_dir_exits_2(tmp_path: Path) -> None:
    proc = run_list(str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("list_checkpoints.sh: error: no checkpoint directory")
