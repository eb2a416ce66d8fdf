"""common.logger: log.txt, metrics.jsonl, TensorBoard events (read back with TensorBoard's own
reader) and offline wandb runs (read back with wandb's own reader)."""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from common.errors import UserError
from common.logger import SCALAR_TAGS, RunLogger, log_to_file, setup_logging

ALL_KEYS = ["loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "step_time",
            "mem_allocated_mb", "mem_reserved_mb", "mem_rss_mb", "epoch", "tokens"]


def step_metrics(step: int, offset: float = 0.0) -> dict[str, Any]:
    """Every key the trainer logs, with values that identify the step (and the process)."""
    return {"loss": 10.0 - 0.5 * step + offset, "lr": 1e-4 * step, "grad_norm": 1.0 + step / 100,
            "tokens_per_sec": 1000.0 + step, "mfu": 0.3, "step_time": 0.25, "mem_allocated_mb": 100.0,
            "mem_reserved_mb": 120.0, "mem_rss_mb": 900.0 + step, "epoch": 0, "tokens": 512 * step,
            "time": 1.7e9 + step}


def read_events(tb_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def tb_run(log_dir: Path) -> Path:
    """A run's events folder when no run name is given: named after the log directory."""
    return log_dir / "tensorboard" / log_dir.name


def scalar_steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).sum().backward()
    return model


def next_second() -> None:
    """Event file names carry whole seconds; a resumed writer must sort after the first one
    (in real runs the restart takes far longer than this)."""
    time.sleep(1.05 - (time.time() % 1.0))


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


# --------------------------------------------------------------------------- setup_logging


def test_setup_logging_main_rank_writes_log_txt_once(tmp_path: Path, capsys, restore_logging) -> None:
    setup_logging(is_main=True)
    setup_logging(is_main=True)  # idempotent: no duplicated handlers
    logging.getLogger("common.test").info("said before the log directory is known")
    log_to_file(tmp_path)
    logging.getLogger("common.test").info("hello from rank zero")
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("INFO common.test: said before the log directory is known")
    assert lines[1].endswith("INFO common.test: hello from rank zero")
    assert lines[0][:4].isdigit() and lines[0][4] == "-"  # starts with a date
    assert capsys.readouterr().err.count("hello from rank zero") == 1


def test_setup_logging_other_ranks_warnings_only_prefixed(tmp_path: Path, capsys, restore_logging) -> None:
    setup_logging(is_main=False, rank=3)
    log_to_file(tmp_path / "r3")
    logging.getLogger("x").info("quiet")
    logging.getLogger("x").warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err
    assert err.startswith("[rank 3]") and "loud" in err
    assert not (tmp_path / "r3" / "log.txt").exists()


# --------------------------------------------------------------------------- TensorBoard + jsonl


def test_tensorboard_scalars_histograms_text_hparams(tmp_path: Path) -> None:
    with RunLogger(tmp_path, enabled=True, use_tensorboard=True) as run:
        for step in range(1, 11):
            run.log_step(step, step_metrics(step))
            if step % 5 == 0:
                run.log_eval(step, 5.0 - step / 10, seconds=None if step == 5 else 0.25)
                run.log_histograms(step, tiny_model())
                run.log_sample(step, f"sample {step}:\n  indented line", seconds=None if step == 5 else 0.5)
        run.log_hparams({"learning_rate": 6e-4, "model": {"n_layer": 2}, "device": "cpu", "betas": (0.9, 0.95),
                         "compile": False, "warmup": None}, {"hparam/best_val_loss": 4.0})

    acc = read_events(tb_run(tmp_path))
    tags = acc.Tags()
    for key in ALL_KEYS:
        tag = SCALAR_TAGS.get(key, f"train/{key}")
        assert scalar_steps(acc, tag) == list(range(1, 11)), tag
    assert "train/time" not in tags["scalars"]  # the wall clock is no curve (it stays in metrics.jsonl)
    groups = sorted({tag.split("/")[0] for tag in tags["scalars"]})  # TensorBoard's order of chart groups
    assert groups == ["train", "train_memory", "train_perf", "val"]
    assert [e.value for e in acc.Scalars("train/loss")] == [step_metrics(s)["loss"] for s in range(1, 11)]
    assert scalar_steps(acc, "val/loss") == [5, 10]
    assert acc.Scalars("val/perplexity")[0].value == pytest.approx(math.exp(4.5), rel=1e-6)

    expected_hists = {f"{kind}/{name}" for kind in ("params", "grads")
                      for name in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert expected_hists <= set(tags["histograms"])
    assert [h.step for h in acc.Histograms("params/0.weight")] == [5, 10]
    assert acc.Histograms("grads/2.bias")[0].histogram_value.num == 2

    texts = acc.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [5, 10]
    assert "sample 10:\n  indented line" in texts[1].tensor_proto.string_val[0].decode()

    hp_content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/session_start_info"])
    hp = session.session_start_info.hparams
    assert hp["learning_rate"].number_value == pytest.approx(6e-4)
    assert hp["model.n_layer"].number_value == 2
    assert hp["device"].string_value == "cpu"
    assert hp["betas"].string_value == "(0.9, 0.95)"
    assert hp["compile"].bool_value is False
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hp_content["_hparams_/experiment"]).experiment
    # The HParams tab reads the best val loss from the last point of the val/best_loss curve: no
    # one-point hparam/* chart, which TensorBoard would sort before the training curves.
    assert [m.name.tag for m in experiment.metric_infos] == ["val/best_loss"]
    assert not [t for t in tags["scalars"] if t.startswith("hparam/")]
    assert [(e.step, e.value) for e in acc.Scalars("val/best_loss")] == [(5, 4.5), (10, 4.0)]

    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))
    assert rows[0] == {"step": 1, **step_metrics(1)}  # with its "time"
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0] == {"step": 5, "val_loss": 4.5, "val_perplexity": pytest.approx(math.exp(4.5))}
    assert evals[1] == {"step": 10, "val_loss": 4.0, "val_perplexity": pytest.approx(math.exp(4.0)),
                        "val_seconds": 0.25}  # an evaluation's cost: metrics.jsonl only, no chart
    assert not [t for t in tags["scalars"] if "seconds" in t]
    assert [r.get("seconds") for r in read_jsonl(tmp_path / "samples.jsonl")] == [None, 0.5]


def test_resume_after_stop_logs_every_step_exactly_once(tmp_path: Path) -> None:
    # First process: steps 1..7, checkpoint at step 5, stopped (SIGTERM) after step 7.
    first = RunLogger(tmp_path, enabled=True, use_tensorboard=True)
    for step in range(1, 8):
        first.log_step(step, step_metrics(step))
        if step == 5:
            first.log_eval(step, 4.5)
            first.log_histograms(step, tiny_model())
            first.log_sample(step, "first run")
        if step == 7:
            first.log_eval(step, 3.0)  # after the checkpoint: dropped, and no longer the best
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "loss": 6.')  # a crash in the middle of a row
    next_second()

    # Second process: resumes from the step-5 checkpoint and runs to 10 (values differ by +100),
    # under another --run_name: the TensorBoard run continues in its folder all the same.
    second = RunLogger(tmp_path, enabled=True, use_tensorboard=True, resume_step=5, state=first.state_dict(),
                       run_name="renamed")
    for step in range(6, 11):
        second.log_step(step, step_metrics(step, offset=100.0))
        if step == 10:
            second.log_eval(step, 4.8)
            second.log_histograms(step, tiny_model())
            second.log_sample(step, "second run")
    second.close()

    acc = read_events(tb_run(tmp_path))
    for key in ALL_KEYS:
        tag = SCALAR_TAGS.get(key, f"train/{key}")
        assert scalar_steps(acc, tag) == list(range(1, 11)), tag
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert losses[5] == step_metrics(5)["loss"]
    assert losses[6] == step_metrics(6, offset=100.0)["loss"]  # the resumed run's value, not the purged one
    assert scalar_steps(acc, "val/loss") == [5, 10]
    assert [(e.step, e.value) for e in acc.Scalars("val/best_loss")] == [(5, 4.5), (10, 4.5)]
    assert [h.step for h in acc.Histograms("params/0.weight")] == [5, 10]
    assert [t.step for t in acc.Tensors("samples/text_summary")] == [5, 10]
    assert [d.name for d in (tmp_path / "tensorboard").iterdir()] == [tmp_path.name]

    rows = read_jsonl(tmp_path / "metrics.jsonl")  # also proves the truncated row is gone
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert train[6]["loss"] == step_metrics(7, offset=100.0)["loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 10]


def test_tensorboard_run_is_named_after_run_name_else_the_log_dir(tmp_path: Path) -> None:
    with RunLogger(tmp_path / "exp7", enabled=True, use_tensorboard=True, run_name="gpt2 124m/lr 6e-4") as run:
        run.log_step(1, {"loss": 1.0})
    with RunLogger(tmp_path / "exp8", enabled=True, use_tensorboard=True) as run:
        run.log_step(1, {"loss": 2.0})
    assert [d.name for d in (tmp_path / "exp7" / "tensorboard").iterdir()] == ["gpt2 124m_lr 6e-4"]  # one folder
    assert [d.name for d in (tmp_path / "exp8" / "tensorboard").iterdir()] == ["exp8"]
    assert [e.value for e in read_events(tb_run(tmp_path / "exp8")).Scalars("train/loss")] == [2.0]


def test_samples_and_val_accuracy_rows_each_step_once_after_resume(tmp_path: Path) -> None:
    """samples.jsonl rows {step, prompt, text} and val_accuracy beside val_loss; a run that crashed
    after writing samples past its checkpoint (step 4) leaves none of them to the resumed run."""
    first = RunLogger(tmp_path, enabled=True, use_tensorboard=True)
    for step in (2, 4, 6):
        first.log_eval(step, 5.0 - step / 10, accuracy=step / 100)
        first.log_sample(step, f"def first {step}", prompt="def ")
    first.close()
    next_second()
    second = RunLogger(tmp_path, enabled=True, use_tensorboard=True, resume_step=4)
    for step in (6, 8):
        second.log_eval(step, 4.0, accuracy=0.5)
        second.log_sample(step, f"def second {step}", prompt="def ")
    second.close()

    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 2, "prompt": "def ", "text": "def first 2"}, {"step": 4, "prompt": "def ", "text": "def first 4"},
        {"step": 6, "prompt": "def ", "text": "def second 6"}, {"step": 8, "prompt": "def ", "text": "def second 8"}]
    evals = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["val_accuracy"]) for r in evals] == [(2, 0.02), (4, 0.04), (6, 0.5), (8, 0.5)]
    acc = read_events(tb_run(tmp_path))
    assert {e.step: round(e.value, 6) for e in acc.Scalars("val/accuracy")} == {2: 0.02, 4: 0.04, 6: 0.5, 8: 0.5}

    with RunLogger(tmp_path, enabled=True) as fresh:  # a new run moves the old samples aside with the metrics
        fresh.log_sample(1, "new")
    (archived,) = (tmp_path / "previous").iterdir()
    assert len(read_jsonl(archived / "samples.jsonl")) == 4
    assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 1, "prompt": "", "text": "new"}]


def test_fresh_start_moves_an_earlier_run_aside(tmp_path: Path) -> None:
    with RunLogger(tmp_path, enabled=True, use_tensorboard=True) as old:
        for step in range(1, 4):
            old.log_step(step, {"loss": 1.0})
    with RunLogger(tmp_path, enabled=True, use_tensorboard=True) as new:
        new.log_step(1, {"loss": 2.0})
    archived = list((tmp_path / "previous").iterdir())
    assert len(archived) == 1
    assert [r["step"] for r in read_jsonl(archived[0] / "metrics.jsonl")] == [1, 2, 3]
    assert scalar_steps(read_events(archived[0] / "tensorboard" / tmp_path.name), "train/loss") == [1, 2, 3]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]
    assert [e.value for e in read_events(tb_run(tmp_path)).Scalars("train/loss")] == [2.0]


def test_disabled_logger_is_a_no_op(tmp_path: Path) -> None:
    run = RunLogger(tmp_path / "rank1", enabled=False, use_tensorboard=True, use_wandb=True)
    run.log_step(1, step_metrics(1))
    run.log_eval(1, 3.0)
    run.log_sample(1, "x")
    run.log_histograms(1, tiny_model())
    run.log_hparams({"a": 1}, {"hparam/best_val_loss": 1.0})
    run.flush()
    run.close()
    assert run.state_dict() == {"wandb_run_id": None, "tensorboard_run": "rank1"}
    assert not (tmp_path / "rank1").exists()


class CompiledLike(torch.nn.Module):
    """The shape of what torch.compile returns (the model under `_orig_mod`), without importing
    the compiler stack, which takes seconds."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = model


def test_histograms_unwrap_ddp_and_compiled_model_and_skip_non_finite(tmp_path: Path, caplog) -> None:
    import torch.distributed as dist

    model = tiny_model()
    with torch.no_grad():
        model[2].bias.fill_(float("nan"))  # a diverged parameter must not crash the logger
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = CompiledLike(torch.nn.parallel.DistributedDataParallel(model))
        assert next(iter(wrapped.named_parameters()))[0] == "_orig_mod.module.0.weight"
        with RunLogger(tmp_path / "logs", enabled=True, use_tensorboard=True) as run:
            run.log_step(3, {"loss": torch.tensor(2.5), "tokens": torch.tensor(7)})  # tensors accepted
            run.log_histograms(3, wrapped)
    finally:
        dist.destroy_process_group()
    hists = read_events(tb_run(tmp_path / "logs")).Tags()["histograms"]
    assert {"params/0.weight", "grads/0.weight", "params/0.bias", "params/2.weight"} <= set(hists)
    assert "params/2.bias" not in hists  # all NaN: left out, with a warning in the log
    assert "params/2.bias has 2 non-finite values" in caplog.text
    assert not any("module." in t or "_orig_mod" in t for t in hists)
    assert read_jsonl(tmp_path / "logs" / "metrics.jsonl") == [{"step": 3, "loss": 2.5, "tokens": 7}]


def test_histogram_names_containing_a_wrapper_name_are_kept(tmp_path: Path) -> None:
    """The wrappers are unwrapped as objects, so a parameter whose own name contains "module."
    or "_orig_mod." keeps it (a string replace once turned "submodule.weight" into "subweight")."""
    model = torch.nn.ModuleDict({"submodule": torch.nn.Linear(2, 2), "my_orig_mod": torch.nn.Linear(2, 2)})
    with RunLogger(tmp_path / "logs", enabled=True, use_tensorboard=True) as run:
        run.log_histograms(1, CompiledLike(model))
    hists = set(read_events(tb_run(tmp_path / "logs")).Tags()["histograms"])
    assert {"params/submodule.weight", "params/my_orig_mod.bias"} <= hists


# --------------------------------------------------------------------------- wandb


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch) -> Path:
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_root"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return wandb_dir


def inspect_wandb_file(path: Path) -> list[dict[str, Any]]:
    """Records of a .wandb transaction log, decoded by wandb's own reader (`wandb leet inspect`)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    if not wandb_cli.exists():
        wandb_cli = Path(shutil.which("wandb") or "wandb")
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(path)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 and "No such command" in proc.stderr:
        pytest.skip("this wandb has no `leet inspect` reader for .wandb files")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def run_dirs(wandb_dir: Path, run_id: str) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_offline_run_holds_the_metrics_and_resumes_same_run(offline_wandb: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    config = {"learning_rate": 6e-4, "n_layer": 2}
    first = RunLogger(log_dir, enabled=True, use_wandb=True, config=config, run_name="t")
    for step in range(1, 6):
        first.log_step(step, step_metrics(step))
    first.log_eval(5, 4.5)
    first.log_sample(5, "once upon a time")
    first.log_hparams(config, {"hparam/best_val_loss": 4.5})
    state = first.state_dict()
    first.close()
    run_id = state["wandb_run_id"]
    assert run_id

    (run_dir,) = run_dirs(offline_wandb, run_id)
    wandb_file = run_dir / f"run-{run_id}.wandb"
    assert wandb_file.is_file() and wandb_file.stat().st_size > 0

    records = inspect_wandb_file(wandb_file)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r.get("type") == "history"}
    assert sorted(history) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        for key in ALL_KEYS:
            assert history[step][SCALAR_TAGS.get(key, f"train/{key}")] == pytest.approx(step_metrics(step)[key])
        assert "train/time" not in history[step]
    assert history[5]["val/loss"] == 4.5
    assert history[5]["samples._type"] == "table-file"  # the sample, as a wandb.Table file
    table = json.loads((run_dir / "files" / history[5]["samples.path"]).read_text())
    assert table["columns"] == ["step", "text"] and table["data"] == [[5, "once upon a time"]]
    run_record = next(r["run"] for r in records if r.get("type") == "run")
    assert run_record["config"]["update"]["learning_rate"] == 6e-4
    summary = {}
    for r in records:
        if r.get("type") == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["hparam/best_val_loss"] == 4.5

    # A resumed process continues the same wandb run id.
    second = RunLogger(log_dir, enabled=True, use_wandb=True, config=config, resume_step=5, state=state)
    assert second.state_dict() == {"wandb_run_id": run_id, "tensorboard_run": "t"}
    second.log_step(6, step_metrics(6))
    second.close()
    dirs = run_dirs(offline_wandb, run_id)
    assert len(dirs) == 2  # offline: one directory per process, same run id; `wandb sync` merges them
    resumed = inspect_wandb_file(dirs[-1] / f"run-{run_id}.wandb")
    assert [r["history"]["step"]["num"] for r in resumed if r.get("type") == "history"] == [6]


def test_use_wandb_without_wandb_installed_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(UserError, match=r"--use_wandb needs wandb: pip install -e '\.\[wandb\]'"):
        RunLogger(tmp_path, enabled=True, use_wandb=True)
