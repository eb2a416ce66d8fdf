"""train_improved.py under real torchrun on CPU (gloo): training, determinism, two nodes, refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO, SRC, TINY_FLAGS, env, load_checkpoint, read_metrics, run, run_dirs, step_losses, train

STEPS = 12


@pytest.fixture(scope="module")
def two_rank_runs(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The same 2-rank run twice (for determinism); each returns its working directory."""
    out = []
    for i in range(2):
        tmp = tmp_path_factory.mktemp(f"run{i}")
        # Saves written in the loop, so log.txt shows the order of sample and save (see below).
        train(tmp, prepared_data, "--max_steps", str(STEPS), "--eval_freq", "5", "--checkpoint_freq", "10",
              "--async_checkpoint", "false")
        out.append(tmp)
    return out


def test_two_ranks_train_and_log_each_step_once(two_rank_runs: list[Path]) -> None:
    tmp = two_rank_runs[0]
    steps, evals = read_metrics(tmp / "logs")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for row in steps:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= row.keys()
    losses = [r["loss"] for r in steps]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # clearly falling
    assert [r["step"] for r in evals] == [5, 10, STEPS]
    assert all(0 < r["val_seconds"] < 60 for r in evals), evals  # what each evaluation cost the run
    samples = [json.loads(line) for line in (tmp / "logs" / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [5, 10] and all(0 < r["seconds"] < 60 for r in samples), samples
    ckpt = load_checkpoint(tmp / "ckpt" / "latest.pt")
    assert ckpt["step"] == STEPS and ckpt["meta"]["world_size"] == 2
    assert {"model", "optimizer", "val_loss", "config", "data_state", "rng", "epoch", "best_val_loss"} <= ckpt.keys()
    assert len(ckpt["rng"]) == 2
    log_text = (tmp / "logs" / "log.txt").read_text()
    assert "world size 2 (gloo)" in log_text and "precision fp32" in log_text
    # The sample is drawn before the save starts, so an async write does not compete with it
    # (this run saves synchronously: its "saved" line marks where the save was called).
    assert log_text.index("sample at step 10") < log_text.index("saved checkpoint step 10")


def test_same_seed_same_losses(two_rank_runs: list[Path]) -> None:
    first, second = (step_losses(t / "logs") for t in two_rank_runs)
    assert first == second  # bit-identical on CPU


def test_two_nodes_on_localhost(prepared_data: Path, tmp_path: Path) -> None:
    """Two torchrun agents (one rank each) joined through a c10d rendezvous on 127.0.0.1."""
    from runs import free_port
    port = free_port()
    args = [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data), "--max_steps", "4", "--eval_freq", "4"]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-node-test",
         str(SRC / "train_improved.py"), *args],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    steps, _ = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "ckpt" / "latest.pt")["meta"]["world_size"] == 2


def _single(tmp: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS, *run_dirs(tmp, data_dir), *args],
               timeout=120)


@pytest.mark.parametrize("args, fragment", [
    (["--n_layr", "2"], "unknown flag --n_layr (did you mean --n_layer?)"),
    (["--total_batch_size", "300"], "--total_batch_size 300 is not divisible"),
    (["--resume", "latest"], "no checkpoint"),
    (["--data_dir", "/nonexistent/dataset"], "/nonexistent/dataset"),
])
def test_bad_input_exits_2_with_one_line(prepared_data: Path, tmp_path: Path, args: list[str], fragment: str) -> None:
    proc = _single(tmp_path, prepared_data, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fragment in lines[0], lines[0]


def test_unknown_config_key_exits_2(prepared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"extends": "tiny_cpu.json", "n_layers": 2}')
    proc = _single(tmp_path, prepared_data, "--config", str(bad))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown config key 'n_layers'" in proc.stderr and "did you mean n_layer" in proc.stderr


def test_refusal_under_torchrun_is_printed_once(prepared_data: Path, tmp_path: Path) -> None:
    from runs import torchrun_cmd
    proc = run(torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
                                                     "--resume", "latest"]), timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("train_improved.py: error:") == 1, proc.stderr


def test_version_and_print_config() -> None:
    proc = run([sys.executable, str(SRC / "train_improved.py"), "--version"])
    assert proc.returncode == 0 and proc.stdout.startswith("llm-pretrain-suite ")
    proc = run([sys.executable, str(SRC / "train_improved.py"), "--config", "configs/tiny_cpu.json", "--print_config"])
    assert proc.returncode == 0 and '"n_embd": 128' in proc.stdout


def test_fp8_script_on_cpu_refuses_require_fp8_and_prints_its_checkpoint_dir(prepared_data: Path,
                                                                             tmp_path: Path) -> None:
    script = [sys.executable, str(SRC / "train_fp8.py")]
    proc = run([*script, "--print_config"])
    assert proc.returncode == 0 and '"checkpoint_dir": "./checkpoints_fp8"' in proc.stdout
    proc = run([*script, *TINY_FLAGS, *run_dirs(tmp_path, prepared_data), "--use_fp8", "--require_fp8"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "--require_fp8" in line and "TransformerEngine" in line
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
