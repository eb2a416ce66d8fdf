"""FSDP2 and sharded DCP checkpoints (`--parallel fsdp`).

In-process tests use the DCP checkpointer of a single process (no process group: DCP saves and
loads without one) on real files; the multi-process tests run real torchrun processes with gloo
on CPU. The resume, signal and fault tests that concern the checkpoint format run in both modes
in their own modules (test_resume, test_faults, test_healing).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from runs import REPO, SRC, die_at_operation, env, load_checkpoint, step_losses, train

from common.checkpoint import (
    BAD_SIDECAR,
    CORRUPT_SHA256,
    CORRUPT_SIZE,
    DCP_MANIFEST,
    DCP_TRAIN_STATE,
    INCOMPLETE,
    NO_SIDECAR,
    OK,
    TMP_PREFIX,
    Checkpointer,
    sidecar_path,
    validate_checkpoint,
)
from common.dcp_checkpoint import DCPCheckpointer, load_dcp_weights, read_model_state
from common.dist import DistContext
from common.errors import UserError
from common.model import GPT, GPTConfig
from common.optim import build_adamw
from common.parallel import checkpoint_weights

SINGLE = DistContext(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)
TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
LIST_CKPT = REPO / "shell" / "list_checkpoints.sh"


# ----------------------------------------------------------------------------- in one process

def trained(seed: int, steps: int = 2) -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = GPT(TINY)
    optimizer = build_adamw(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    for _ in range(steps):
        x = torch.randint(0, TINY.vocab_size, (2, TINY.block_size))
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def dcp_state(model: GPT, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {**checkpoint_weights(model, optimizer, sharded=True), "step": step, "epoch": 0, "val_loss": None,
            "config": {"n_layer": TINY.n_layer}, "data_state": {"position": step}, "rng": [{"torch": torch.ones(3)}],
            "meta": {"world_size": 1, "tokens_seen": step}}


def dcp_save(ck: DCPCheckpointer, model: GPT, optimizer: torch.optim.Optimizer, step: int, tiers: set[str],
             wait: bool = True) -> None:
    ck.save(dcp_state(model, optimizer, step), step=step, epoch=0, val_loss=None, tiers=tiers, wait=wait)


def checkpointer(directory: Path, **kwargs: Any) -> DCPCheckpointer:
    options = {"keep_rolling": 3, "keep_epoch": 2, "async_save": True} | kwargs
    ck = DCPCheckpointer(directory, ctx=SINGLE, **options)
    ck.prepare(0)
    return ck


def same_state(a: tuple[GPT, torch.optim.Optimizer], b: tuple[GPT, torch.optim.Optimizer]) -> bool:
    (model_a, opt_a), (model_b, opt_b) = a, b
    weights = all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    moments = all(torch.equal(sa[k], sb[k]) for sa, sb in zip(opt_a.state.values(), opt_b.state.values()) for k in sa)
    return weights and moments and len(opt_a.state) == len(opt_b.state)


def test_a_dcp_save_is_a_directory_of_hashed_parts_under_every_name(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    source = trained(seed=1)
    dcp_save(ck, *source, 4, {"latest", "rolling"}, wait=False)  # asynchronous, then waited for
    ck.close()
    latest, rolling = tmp_path / "latest.dcp", tmp_path / "step_00000004.dcp"
    files = {p.name for p in latest.iterdir()}
    assert files == {".metadata", "__0_0.distcp", DCP_TRAIN_STATE, DCP_MANIFEST}  # the rank hashes merged away
    assert (latest / DCP_TRAIN_STATE).stat().st_ino == (rolling / DCP_TRAIN_STATE).stat().st_ino  # one write
    record = json.loads(sidecar_path(latest).read_text())
    assert record["format"] == "dcp" and record["file"] == "latest.dcp" and record["step"] == 4
    assert record["files"] == {name: (latest / name).stat().st_size for name in files}
    # The manifest is sha256sum's format: the directory checks itself with standard tools.
    check = subprocess.run(["sha256sum", "-c", DCP_MANIFEST], cwd=latest, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == 3, check.stdout + check.stderr
    assert validate_checkpoint(latest) == (True, "ok") and validate_checkpoint(rolling) == (True, "ok")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]

    resumed = Checkpointer(tmp_path, enabled=False)
    assert resumed.choose_resume("latest") == latest
    state = resumed.load(latest)
    assert state["dcp"] == str(latest) and state["step"] == 4 and "model" not in state
    target = trained(seed=2)
    assert not same_state(source, target)
    load_dcp_weights(*target, latest)
    assert same_state(source, target)  # weights, both moments and every step count, bit for bit
    assert all(torch.equal(v, source[0].state_dict()[k]) for k, v in read_model_state(latest).items())


def test_rotation_and_tiers_of_dcp_directories(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path, keep_rolling=2)
    model, optimizer = trained(seed=3, steps=1)
    for step in range(1, 6):
        dcp_save(ck, model, optimizer, step, {"latest", "rolling"} | ({"best"} if step == 2 else set()),
                 wait=step % 2 == 0)
    ck.close()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_00000004.dcp", "step_00000004.dcp.json", "step_00000005.dcp", "step_00000005.dcp.json"]
    infos = {i.name: i for i in Checkpointer(tmp_path, enabled=False).list(full=True)}
    assert set(infos) == {"step_00000004.dcp", "step_00000005.dcp", "best.dcp", "latest.dcp"}
    assert all(i.valid for i in infos.values()) and infos["best.dcp"].step == 2 and infos["latest.dcp"].step == 5
    assert Checkpointer(tmp_path, enabled=False).choose_resume("best") == tmp_path / "best.dcp"


def damage_a_part(directory: Path, how: str) -> Path:
    """Damage this name's copy of the rank's part only (the part is a hard link shared by names)."""
    part = directory / "__0_0.distcp"
    data = bytearray(part.read_bytes())
    part.unlink()
    if how == "delete":
        return part
    if how == "truncate":
        data = data[:-100]
    else:
        data[len(data) // 2] ^= 0x10
    part.write_bytes(bytes(data))
    return part


@pytest.mark.parametrize("how, quick, full", [("bitflip", OK, CORRUPT_SHA256), ("truncate", CORRUPT_SIZE, CORRUPT_SIZE),
                                              ("delete", INCOMPLETE, INCOMPLETE)])
def test_a_damaged_part_is_found_and_latest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str,
                                                      quick: str, full: str) -> None:
    ck = checkpointer(tmp_path)
    model, optimizer = trained(seed=4, steps=1)
    for step in (1, 2):
        dcp_save(ck, model, optimizer, step, {"latest", "rolling"})
    damage_a_part(tmp_path / "latest.dcp", how)
    listing = {i.name: i for i in Checkpointer(tmp_path, enabled=False).list()}
    assert listing["latest.dcp"].status == quick and listing["step_00000002.dcp"].valid
    assert {i.name: i.status for i in Checkpointer(tmp_path, enabled=False).list(full=True)}["latest.dcp"] == full
    assert Checkpointer(tmp_path, enabled=False).choose_resume("latest") == tmp_path / "step_00000002.dcp"
    assert "latest.dcp in" in caplog.text and "not usable" in caplog.text


def test_a_sidecar_without_files_is_bad_and_a_directory_without_sidecar_is_not_resumed(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    model, optimizer = trained(seed=5, steps=1)
    dcp_save(ck, model, optimizer, 1, {"latest"})
    record = json.loads(sidecar_path(tmp_path / "latest.dcp").read_text())
    sidecar_path(tmp_path / "latest.dcp").write_text(json.dumps({k: v for k, v in record.items() if k != "files"}))
    assert validate_checkpoint(tmp_path / "latest.dcp")[1] == "sidecar lacks files or sha256"
    assert Checkpointer(tmp_path, enabled=False).list()[0].status == BAD_SIDECAR
    sidecar_path(tmp_path / "latest.dcp").unlink()
    assert Checkpointer(tmp_path, enabled=False).list()[0].status == NO_SIDECAR
    with pytest.raises(UserError, match="no valid checkpoint"):
        Checkpointer(tmp_path, enabled=False).choose_resume("auto")  # never started over
    named = Checkpointer(tmp_path, enabled=False).choose_resume(str(tmp_path / "latest.dcp"))  # named: loaded
    assert named == tmp_path / "latest.dcp"


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


def test_dcp_metadata_is_read_without_running_foreign_code(tmp_path: Path) -> None:
    """DCP keeps its metadata in a pickle: a directory whose .metadata carries a callable is refused."""
    ck = checkpointer(tmp_path)
    model, optimizer = trained(seed=6, steps=1)
    dcp_save(ck, model, optimizer, 1, {"latest"})
    (tmp_path / "latest.dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UserError, match="posix.system is not part of a DCP checkpoint"):
        read_model_state(tmp_path / "latest.dcp")


def test_optimizer_hyperparameters_load_weights_only(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path)
    source = trained(seed=7)
    state = dcp_state(*source, 1)
    state["optimizer"]["param_groups"][0]["lr"] = _RunsCode()  # saved as bytes, like any non-tensor value
    ck.save(state, step=1, epoch=0, val_loss=None, tiers={"latest"}, wait=True)
    with pytest.raises(UserError, match="UnpicklingError: Weights only load failed"):
        load_dcp_weights(*trained(seed=8), tmp_path / "latest.dcp")


def _save_and_die_at_operation(template: Path, directory: Path, die_at: int) -> int:
    """A copy of `template` (two saves), then a third save that dies at file-system operation
    number `die_at` (link, replace, rename, unlink, fsync) in a forked child; see die_at_operation."""
    shutil.copytree(template, directory, copy_function=os.link)  # the names of a save share files too
    model, optimizer = trained(seed=9, steps=1)

    def work() -> Callable[[], None]:
        ck = checkpointer(directory, keep_rolling=1)
        return lambda: dcp_save(ck, model, optimizer, 3, {"latest", "rolling", "best"})

    return die_at_operation(die_at, ("link", "replace", "rename", "unlink", "fsync"), work)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_death_at_every_file_operation_of_a_dcp_save_keeps_the_invariants(tmp_path: Path) -> None:
    """The deterministic complement of the kill -9 rounds: die between every two file-system
    operations of one save (the parts, the manifest, three names, rotation); each time the
    sidecars vouch only for complete directories and the newest complete save is resumed."""
    template = tmp_path / "template"
    ck = checkpointer(template, keep_rolling=1)
    model, optimizer = trained(seed=9, steps=1)
    for step in (1, 2):
        dcp_save(ck, model, optimizer, step, {"latest", "rolling"})
    for die_at in range(400):
        directory = tmp_path / f"d{die_at}"
        code = _save_and_die_at_operation(template, directory, die_at)
        assert code in (0, 3), code
        infos = Checkpointer(directory, enabled=False).list(full=True)
        for info in infos:
            assert info.valid or not sidecar_path(info.path).exists(), (die_at, info.name, info.reason)
        chosen = Checkpointer(directory, enabled=False).choose_resume("latest")
        assert Checkpointer(directory, enabled=False).load(chosen)["step"] >= 2
        checkpointer(directory)  # prepare() clears what the dead save left
        assert not [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
        shutil.rmtree(directory)
        if code == 3:
            break
    else:
        raise AssertionError("the save never finished")
    assert die_at > 30


def test_the_lister_shows_dcp_directories_without_torch(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    ck = checkpointer(directory)
    model, optimizer = trained(seed=10, steps=1)
    dcp_save(ck, model, optimizer, 3, {"latest", "rolling"})
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text("raise ImportError('list_checkpoints.sh imported torch')\n")
    run_env = {**os.environ, "PYTHONPATH": str(poison)}
    listing = subprocess.run(["bash", str(LIST_CKPT), str(directory), "--verify"], capture_output=True, text=True,
                             env=run_env, timeout=60)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines() if re.match(r"  \S+\.dcp ", line)}
    assert set(rows) == {"latest.dcp", "step_00000003.dcp"}
    assert "ok (sha256)" in rows["latest.dcp"] and "<- latest" in rows["latest.dcp"]
    assert "same files as step_00000003.dcp" in rows["latest.dcp"]
    damage_a_part(directory / "step_00000003.dcp", "bitflip")
    damaged = subprocess.run(["bash", str(LIST_CKPT), str(directory), "--verify"], capture_output=True, text=True,
                             env=run_env, timeout=60)
    assert damaged.returncode == 1 and "step_00000003.dcp: __0_0.distcp: sha256 does not match" in damaged.stdout


def run_export(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SRC / "export_checkpoint.py"), *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=120)


def test_export_turns_a_dcp_directory_into_one_plain_file(tmp_path: Path) -> None:
    ck = checkpointer(tmp_path / "ckpt")
    model, optimizer = trained(seed=11)
    dcp_save(ck, model, optimizer, 7, {"latest"})
    done = run_export(tmp_path / "ckpt" / "latest.dcp", tmp_path / "weights.pt")
    assert done.returncode == 0, done.stderr
    exported = torch.load(tmp_path / "weights.pt", map_location="cpu", weights_only=True)
    assert exported["step"] == 7 and "optimizer" not in exported
    plain = GPT(TINY)
    plain.load_state_dict(exported["model"])  # strict
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in plain.state_dict().items())
    manifest = (tmp_path / "ckpt" / "latest.dcp" / DCP_MANIFEST).read_bytes()
    assert exported["meta"]["exported_from"]["sha256"] == hashlib.sha256(manifest).hexdigest()
    assert validate_checkpoint(tmp_path / "weights.pt") == (True, "ok")

    damage_a_part(tmp_path / "ckpt" / "latest.dcp", "bitflip")
    refused = run_export(tmp_path / "ckpt" / "latest.dcp", tmp_path / "again.pt")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "sha256 does not match" in refused.stderr and not (tmp_path / "again.pt").exists()


def test_a_model_state_round_trips_through_bytes_of_a_weights_only_file() -> None:
    """train_state.pt holds only what weights_only loads (the suite's rule for every file)."""
    buffer = io.BytesIO()
    torch.save({k: v for k, v in dcp_state(*trained(seed=12, steps=1), 1).items() if k not in ("model", "optimizer")},
               buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["data_state"] == {"position": 1}


# ----------------------------------------------------------------------------- real torchrun

STEPS = 20


def _flags(*extra: str) -> list[str]:
    # Two micro-steps per step: FSDP reduce-scatters at each, DDP all-reduces at the last.
    return ["--max_steps", str(STEPS), "--eval_freq", "10", "--checkpoint_freq", "10", "--dropout", "0.1",
            "--total_batch_size", "512", *extra]


@pytest.fixture(scope="module")
def runs(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """The same 2-rank run under ddp, fsdp, and fsdp with activation checkpointing."""
    out = {}
    for name, extra in (("ddp", []), ("fsdp", ["--parallel", "fsdp"]),
                        ("fsdp_ac", ["--parallel", "fsdp", "--activation_checkpointing", "full"])):
        tmp = tmp_path_factory.mktemp(name)
        proc = train(tmp, prepared_data, *_flags(*extra))
        out[name] = (tmp, proc.stderr)
    return out


def test_fsdp_computes_what_ddp_computes(runs: dict[str, tuple[Path, str]]) -> None:
    ddp = step_losses(runs["ddp"][0] / "logs")
    assert sorted(ddp) == list(range(1, STEPS + 1))
    for name in ("fsdp", "fsdp_ac"):
        losses = step_losses(runs[name][0] / "logs")
        assert sorted(losses) == sorted(ddp)
        for step, loss in ddp.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), (name, step)
    # Recomputing a block's activations replays its dropout masks: the same numbers.
    assert step_losses(runs["fsdp_ac"][0] / "logs") == step_losses(runs["fsdp"][0] / "logs")
    for _, stderr in runs.values():
        assert "terminate called" not in stderr  # teardown is clean (see common/dcp_checkpoint.py)


def test_each_rank_writes_about_half_of_the_state(runs: dict[str, tuple[Path, str]]) -> None:
    final = runs["fsdp"][0] / "ckpt" / "final.dcp"
    parts = sorted(final.glob("__*_0.distcp"))
    assert [p.name for p in parts] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [p.stat().st_size for p in parts]
    assert all(0.4 < size / sum(sizes) < 0.6 for size in sizes), sizes
    # Together about what the DDP run's one file holds (DCP stores the tied head under its own name).
    ddp_size = (runs["ddp"][0] / "ckpt" / "final.pt").stat().st_size
    assert 0.9 * ddp_size < sum(sizes) < 1.5 * ddp_size, (sizes, ddp_size)
    ddp, fsdp = load_checkpoint(runs["ddp"][0] / "ckpt" / "final.pt"), load_checkpoint(final)
    assert fsdp["step"] == ddp["step"] == STEPS and len(fsdp["rng"]) == 2
    assert fsdp["data_state"] == ddp["data_state"]
    for key, value in ddp["model"].items():
        torch.testing.assert_close(fsdp["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)

