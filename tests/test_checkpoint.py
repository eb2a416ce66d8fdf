"""Checkpointer: atomic writes, tiers, hard links, sidecars, validation, choose_resume, async, failures.

The failure tests use real OS failures, not mocks: RLIMIT_FSIZE makes write() fail with EFBIG in
a child process, and a 8 MB tmpfs in a private mount namespace gives a real ENOSPC (skipped where
unprivileged user namespaces are not allowed). The kill -9 test kills a saving process with
SIGKILL at random moments, many times, and checks the directory after each kill.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch
from runs import die_at_operation, env

from common.checkpoint import (
    NO_SIDECAR,
    OK,
    TMP_PREFIX,
    Checkpointer,
    estimate_state_bytes,
    sidecar_path,
    snapshot_state,
    validate_checkpoint,
)
from common.errors import UserError
from common.fsutil import format_bytes

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "checkpoint_worker.py"
ENV = env()


def make_state(step: int, numel: int = 1000, val_loss: float | None = None) -> dict:
    return {
        "model": {"w": torch.full((numel,), float(step)), "b": torch.arange(10.0)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(numel)}}, "param_groups": [{"lr": 0.1}]},
        "step": step,
        "epoch": 0,
        "val_loss": val_loss,
        "config": {"n_layer": 1},
        "data_state": {"position": step},
        "meta": {"version": "test", "tokens_seen": step * 10},
    }


def save(ck: Checkpointer, step: int, tiers: set[str], *, epoch: int = 0, val_loss: float | None = None,
         wait: bool = True, numel: int = 1000) -> None:
    ck.save(make_state(step, numel, val_loss), step=step, epoch=epoch, val_loss=val_loss, tiers=tiers, wait=wait)


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def snapshot_dir(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every file's (size, mtime_ns, sha256): equal before and after means nothing was touched."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.iterdir())}


def flip_byte(path: Path, offset: int = 200) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


# ---- writing, names, sidecars -----------------------------------------------------------------


def test_sidecar_contents_and_load(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    save(ck, 250, {"latest", "rolling"}, epoch=1, val_loss=3.25)
    assert names(tmp_path) == {"latest.pt", "latest.json", "step_00000250.pt", "step_00000250.json"}
    record = json.loads((tmp_path / "latest.json").read_text())
    data = (tmp_path / "latest.pt").read_bytes()
    assert record["file"] == "latest.pt"
    assert (record["step"], record["epoch"], record["val_loss"]) == (250, 1, 3.25)
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()  # hashed while writing, matches a re-read
    assert record["meta"] == {"version": "test", "tokens_seen": 2500}
    assert datetime.fromisoformat(record["written_at"]).tzinfo is not None
    assert set(record["saved_as"]) == {"latest.pt", "step_00000250.pt"}
    assert json.loads((tmp_path / "step_00000250.json").read_text())["file"] == "step_00000250.pt"
    loaded = ck.load(tmp_path / "latest.pt")
    assert loaded["step"] == 250 and torch.equal(loaded["model"]["w"], torch.full((1000,), 250.0))


def test_names_saved_together_share_one_inode(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    save(ck, 8, {"latest", "rolling", "epoch", "best"}, epoch=2, val_loss=1.0)
    inodes = {os.stat(tmp_path / n).st_ino for n in ("latest.pt", "step_00000008.pt", "epoch_002.pt", "best.pt")}
    assert len(inodes) == 1
    assert os.stat(tmp_path / "latest.pt").st_nlink == 4


def test_copies_when_hard_links_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # Injected at the OS boundary: os.link fails as it does on file systems without hard links.
    def no_link(src: object, dst: object, *a: object, **k: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    ck = Checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING):
        save(ck, 5, {"latest", "rolling"})
    assert "hard links are not available" in caplog.text
    assert os.stat(tmp_path / "latest.pt").st_ino != os.stat(tmp_path / "step_00000005.pt").st_ino
    assert validate_checkpoint(tmp_path / "latest.pt") == (True, "ok")
    assert validate_checkpoint(tmp_path / "step_00000005.pt") == (True, "ok")


def test_rotation_keeps_exactly_keep_rolling_and_keep_epoch(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_rolling=3, keep_epoch=2)
    for step in range(1, 8):
        tiers = {"latest", "rolling"} | ({"epoch"} if step % 2 == 0 else set())
        save(ck, step, tiers, epoch=step // 2)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == [
        "step_00000005.pt", "step_00000006.pt", "step_00000007.pt"]
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_002.pt", "epoch_003.pt"]
    for pt in tmp_path.glob("*.pt"):
        assert sidecar_path(pt).exists()
    assert not list(tmp_path.glob("step_0000000[1-4].json"))  # no orphan sidecars either
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 7


def test_rotation_prefers_newly_written_files_after_resuming_from_older_step(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_rolling=2)
    for step in (10, 20):
        save(ck, step, {"rolling"})
    time.sleep(0.01)
    save(ck, 15, {"rolling"})  # a run resumed from an older checkpoint writes smaller steps
    # The abandoned future (step 10 is oldest written) goes first; the just-written file stays.
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000015.pt", "step_00000020.pt"]


def test_best_follows_lowest_val_loss_when_told(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    best = float("inf")
    for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5), (4, 1.5)):
        tiers = {"latest"} | ({"best"} if loss < best else set())
        best = min(best, loss)
        save(ck, step, tiers, val_loss=loss)
    record = json.loads((tmp_path / "best.json").read_text())
    assert (record["step"], record["val_loss"]) == (4, 1.5)


def test_tier_with_keep_zero_is_disabled_and_leaves_files_alone(tmp_path: Path) -> None:
    save(Checkpointer(tmp_path, keep_rolling=5), 1, {"rolling"})
    ck = Checkpointer(tmp_path, keep_rolling=0)
    save(ck, 2, {"latest", "rolling"})
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000001.pt"]


def test_unknown_tier_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown checkpoint tier"):
        Checkpointer(tmp_path).save(make_state(1), step=1, epoch=0, val_loss=None, tiers={"lastest"})


def test_disabled_checkpointer_writes_nothing(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path / "ckpt", enabled=False)
    ck.prepare(10**18)  # no disk check either
    save(ck, 1, {"latest", "final"})
    ck.wait()
    ck.check_failed()
    assert not (tmp_path / "ckpt").exists()


# ---- validation ----------------------------------------------------------------------------------


def test_validation_detects_truncation_bitflip_and_missing_sidecar(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    save(ck, 1, {"latest", "rolling", "best"})
    latest, step, best = tmp_path / "latest.pt", tmp_path / "step_00000001.pt", tmp_path / "best.pt"
    assert validate_checkpoint(latest) == (True, "ok")

    # Break the hard links first so each file can be damaged on its own.
    for path in (latest, step, best):
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)

    with open(latest, "r+b") as f:
        f.truncate(len(latest.read_bytes()) - 100)
    ok, reason = validate_checkpoint(latest)
    assert not ok and "truncated" in reason

    flip_byte(step)
    ok, reason = validate_checkpoint(step)
    assert not ok and "sha256" in reason
    assert validate_checkpoint(step, full=False)[0]  # a quick check sees size only

    sidecar_path(best).unlink()
    ok, reason = validate_checkpoint(best)
    assert not ok and "no sidecar" in reason

    sidecar_path(best).write_text("{not json")
    ok, reason = validate_checkpoint(best)
    assert not ok and "not valid JSON" in reason
    assert validate_checkpoint(tmp_path / "nope.pt") == (False, "file missing")


def test_format_bytes_uses_iec_binary_units() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 1536, 91_331_648, 1_493_172_224, (1 << 20) - 1)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "87.1 MiB", "1.4 GiB", "1.0 MiB"]


def test_list_reports_every_name_with_validity(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    save(ck, 3, {"latest", "rolling"}, val_loss=2.0)
    (tmp_path / "step_00000001.json").write_text(json.dumps({"step": 1, "size": 1, "sha256": "x"}))
    (tmp_path / f"{TMP_PREFIX}1-abc.data").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    infos = {i.name: i for i in ck.list(full=True)}
    assert set(infos) == {"latest.pt", "step_00000003.pt", "step_00000001.pt"}
    assert infos["latest.pt"].valid and infos["latest.pt"].step == 3 and infos["latest.pt"].val_loss == 2.0
    assert infos["latest.pt"].meta["tokens_seen"] == 30 and infos["latest.pt"].size > 0
    assert not infos["step_00000001.pt"].valid and infos["step_00000001.pt"].reason == "file missing"
    assert infos["latest.pt"].status == OK and infos["latest.pt"].written_from == "sidecar"


# ---- choose_resume -------------------------------------------------------------------------------


def _populate(tmp_path: Path) -> Checkpointer:
    """step 2 and 4 rolling, best at step 3, epoch_001 at step 5, latest (step 6) on its own."""
    ck = Checkpointer(tmp_path, keep_rolling=10)
    save(ck, 2, {"rolling"})
    save(ck, 3, {"best"}, val_loss=1.0)
    save(ck, 4, {"rolling"})
    save(ck, 5, {"epoch"}, epoch=1)
    save(ck, 6, {"latest"})
    return ck


def test_choose_latest_prefers_valid_latest(tmp_path: Path) -> None:
    ck = _populate(tmp_path)
    assert ck.choose_resume("latest") == tmp_path / "latest.pt"
    assert ck.choose_resume("auto") == tmp_path / "latest.pt"


def test_choose_latest_falls_back_to_newest_valid_of_any_tier(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    ck = _populate(tmp_path)
    flip_byte(tmp_path / "latest.pt")
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        path = ck.choose_resume("latest")
    assert path == tmp_path / "epoch_001.pt"  # highest step among the others
    assert "epoch_001.pt" in caplog.text and "sha256" in caplog.text and "latest.pt" in caplog.text

    # Truncate that one too: next is step 4, then best (step 3).
    with open(tmp_path / "epoch_001.pt", "r+b") as f:
        f.truncate(100)
    assert ck.choose_resume("latest") == tmp_path / "step_00000004.pt"
    (tmp_path / "step_00000004.json").unlink()
    assert ck.choose_resume("latest") == tmp_path / "best.pt"


def test_choose_latest_when_latest_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = _populate(tmp_path)
    (tmp_path / "latest.pt").unlink()
    with caplog.at_level(logging.WARNING):
        assert ck.choose_resume("latest") == tmp_path / "epoch_001.pt"
    assert "is not usable (file missing)" in caplog.text


def test_choose_latest_with_nothing_valid_is_a_user_error(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    save(ck, 1, {"latest", "rolling"})
    for p in tmp_path.glob("*.json"):
        p.unlink()
    with pytest.raises(UserError) as info:
        ck.choose_resume("latest")
    message = str(info.value)
    assert "\n" not in message and "no valid checkpoint" in message and "start fresh" in message


def test_choose_latest_in_empty_or_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint to resume"):
        Checkpointer(tmp_path).choose_resume("latest")
    with pytest.raises(UserError, match="no checkpoint to resume"):
        Checkpointer(tmp_path / "missing").choose_resume("latest")


def test_choose_auto_starts_fresh_only_without_checkpoint_data(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "missing").choose_resume("auto") is None
    assert Checkpointer(tmp_path).choose_resume("auto") is None
    (tmp_path / f"{TMP_PREFIX}1-abc.data").write_bytes(b"an interrupted first save")
    assert Checkpointer(tmp_path).choose_resume("auto") is None  # temporary files are not checkpoints
    ck = Checkpointer(tmp_path)
    save(ck, 1, {"latest"})
    flip_byte(tmp_path / "latest.pt")
    before = snapshot_dir(tmp_path)
    with pytest.raises(UserError) as info:
        ck.choose_resume("auto")
    message = str(info.value)
    assert "\n" not in message and "latest.pt: sha256 does not match" in message
    assert "does not start fresh" in message and "--resume PATH" in message
    assert snapshot_dir(tmp_path) == before


def test_choose_auto_refuses_checkpoints_copied_without_sidecars(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path / "run", keep_rolling=3)
    for step in (2, 4, 6):
        save(ck, step, {"latest", "rolling"})
    copy = tmp_path / "copy"
    copy.mkdir()
    for pt in (tmp_path / "run").glob("*.pt"):  # `cp run/*.pt copy/`: the sidecars stay behind
        shutil.copyfile(pt, copy / pt.name)
    assert {i.status for i in Checkpointer(copy).list()} == {NO_SIDECAR}
    before = snapshot_dir(copy)
    for spec in ("auto", "latest"):
        with pytest.raises(UserError) as info:
            Checkpointer(copy).choose_resume(spec)
        message = str(info.value)
        assert "\n" not in message and "no valid checkpoint" in message
        assert "latest.pt, step_00000002.pt, step_00000004.pt and 1 more: no sidecar" in message
        assert "restore their .json sidecars" in message and "move them aside" in message
    assert snapshot_dir(copy) == before


def test_fresh_run_is_refused_where_checkpoint_data_exists(tmp_path: Path) -> None:
    assert Checkpointer(tmp_path / "missing").choose_resume("") is None
    (tmp_path / f"{TMP_PREFIX}1-abc.data").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert Checkpointer(tmp_path).choose_resume("") is None
    (tmp_path / "step_00000003.json").write_text("{}")  # even a lone sidecar: a run was here
    with pytest.raises(UserError, match="already holds checkpoints"):
        Checkpointer(tmp_path).choose_resume("")


def test_fallback_prefers_the_most_recently_written_over_a_higher_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(tmp_path, keep_rolling=10)
    for step in (10, 20, 30):  # the first run, abandoned after step 30
        save(ck, step, {"latest", "rolling"})
    for step in (15, 25):  # a run resumed from step 10 (e.g. after a loss spike)
        save(ck, step, {"latest", "rolling"})
    latest = tmp_path / "latest.pt"
    data = latest.read_bytes()
    latest.unlink()  # damage this name only, not its hard link step_00000025.pt
    latest.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        assert ck.choose_resume("latest") == tmp_path / "step_00000025.pt"
    assert "the most recently written valid checkpoint" in caplog.text
    (tmp_path / "step_00000025.json").unlink()
    assert ck.choose_resume("latest") == tmp_path / "step_00000015.pt"  # not step 30 of the abandoned run


def test_choose_best(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path)
    with pytest.raises(UserError, match="no best.pt"):
        ck.choose_resume("best")
    save(ck, 3, {"best"}, val_loss=1.0)
    assert ck.choose_resume("best") == tmp_path / "best.pt"
    flip_byte(tmp_path / "best.pt")
    with pytest.raises(UserError, match="not usable"):
        ck.choose_resume("best")


def test_choose_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = Checkpointer(tmp_path / "ck")
    save(ck, 4, {"rolling", "latest"})
    assert ck.choose_resume(str(tmp_path / "ck" / "step_00000004.pt")) == tmp_path / "ck" / "step_00000004.pt"
    monkeypatch.chdir(tmp_path)
    assert ck.choose_resume("step_00000004.pt") == tmp_path / "ck" / "step_00000004.pt"  # found in the dir
    with pytest.raises(UserError, match="not found"):
        ck.choose_resume("nope.pt")
    with pytest.raises(UserError, match="is a directory"):
        ck.choose_resume(str(tmp_path / "ck"))
    broken = tmp_path / "ck" / "step_00000004.pt"
    broken.unlink()
    broken.write_bytes((tmp_path / "ck" / "latest.pt").read_bytes()[:-10])
    with pytest.raises(UserError, match="not usable: size is"):
        ck.choose_resume(str(broken))


def test_choose_path_without_sidecar_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(tmp_path / "ck")
    save(ck, 4, {"latest"})
    copy = tmp_path / "copy.pt"
    copy.write_bytes((tmp_path / "ck" / "latest.pt").read_bytes())  # copied without its sidecar
    with caplog.at_level(logging.WARNING, logger="common.checkpoint"):
        assert ck.choose_resume(str(copy)) == copy
    assert "integrity cannot be verified" in caplog.text
    assert ck.load(copy)["step"] == 4


def test_load_refuses_a_file_a_resume_cannot_use(tmp_path: Path) -> None:
    weights_only = tmp_path / "exported.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "config": {}, "meta": {}}, weights_only)
    with pytest.raises(UserError) as info:
        Checkpointer(tmp_path).load(weights_only)
    assert "no optimizer, step, data_state" in str(info.value) and "\n" not in str(info.value)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="no model, optimizer"):
        Checkpointer(tmp_path).load(tmp_path / "list.pt")


def test_load_of_unsafe_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"obj": Path("not allowed by weights_only")}, path)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        Checkpointer(tmp_path).load(path)


# ---- asynchronous saving ----------------------------------------------------------------------


def test_async_snapshot_is_decoupled_from_later_in_place_changes(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, async_save=True)
    state = make_state(1, numel=2_000_000)
    ck.save(state, step=1, epoch=0, val_loss=None, tiers={"latest"})
    state["model"]["w"].add_(100.0)  # the next optimizer step, while the write may be running
    state["optimizer"]["state"][0]["exp_avg"].fill_(7.0)
    state["meta"]["tokens_seen"] = -1
    ck.wait()
    loaded = ck.load(tmp_path / "latest.pt")
    assert torch.equal(loaded["model"]["w"], torch.full((2_000_000,), 1.0))
    assert torch.count_nonzero(loaded["optimizer"]["state"][0]["exp_avg"]) == 0
    assert json.loads((tmp_path / "latest.json").read_text())["meta"]["tokens_seen"] == 10


def test_snapshot_copies_storage_and_keeps_sharing() -> None:
    weight = torch.randn(8, 4)
    state = {"wte": weight, "lm_head": weight.detach(), "row": weight[2], "n": 3, "t": (1, [2.0])}
    snap = snapshot_state(state)
    assert snap["wte"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
    # Tied weights and views still share memory, as torch.save would store them.
    assert snap["wte"].untyped_storage().data_ptr() == snap["lm_head"].untyped_storage().data_ptr()
    assert torch.equal(snap["row"], weight[2]) and snap["row"].storage_offset() == 8
    assert snap["t"] == (1, [2.0])
    module_sd = torch.nn.Linear(2, 2).state_dict()
    assert snapshot_state(module_sd)._metadata == module_sd._metadata


def test_final_save_is_synchronous_and_saves_wait_for_each_other(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(make_state(1, 500_000), step=1, epoch=0, val_loss=None, tiers={"latest", "rolling"})
    ck.save(make_state(2, 500_000), step=2, epoch=0, val_loss=None, tiers={"latest", "rolling"})
    ck.save(make_state(3), step=3, epoch=0, val_loss=None, tiers={"final"})
    assert not ck.in_flight
    for name in ("step_00000001.pt", "step_00000002.pt", "latest.pt", "final.pt"):
        assert validate_checkpoint(tmp_path / name)[0], name
    assert ck.load(tmp_path / "latest.pt")["step"] == 2
    ck.check_failed()


def test_async_saves_reuse_snapshot_memory_without_mixing_contents(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, async_save=True, keep_rolling=10)
    state = make_state(0, numel=300_000)
    pointers = []
    for step in range(1, 5):
        state["model"]["w"].fill_(float(step))
        state["step"] = step
        ck.save(state, step=step, epoch=0, val_loss=None, tiers={"rolling"})
        pointers.append(ck._buffers._in_use[0][1].data_ptr())
    ck.wait()
    assert len(set(pointers)) <= 2  # after the first save the same host buffers are reused
    for step in range(1, 5):
        loaded = ck.load(tmp_path / f"step_{step:08d}.pt")
        assert loaded["step"] == step and torch.equal(loaded["model"]["w"], torch.full((300_000,), float(step)))
    ck.wait()


def _run_fail_worker(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_fail_report(report: dict, reason: str, directory: str) -> None:
    for key in ("async_error", "sync_error"):
        message = report[key]
        assert message is not None, key
        assert message == f"checkpoint write to {directory} failed: {reason}; earlier checkpoints are intact"
    assert report["temps"] == []  # the failed writes cleaned up after themselves
    assert report["valid"] == {"latest.pt": True, "step_00000001.pt": True}
    assert report["latest_step"] == 1


def test_failed_write_efbig_surfaces_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    report = _run_fail_worker([sys.executable, str(WORKER), "fail", "efbig", str(tmp_path)])
    _check_fail_report(report, "File too large", str(tmp_path))


def _can_mount_private_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs \"$d\""],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare + tmpfs in a user namespace")
def test_failed_write_disk_full_surfaces_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    # A real full disk: an 8 MB tmpfs mounted over tmp_path in a private mount namespace (gone
    # when the worker exits); the 16 MB checkpoint cannot fit.
    directory = tmp_path / "small_disk"
    directory.mkdir()
    script = 'mount -t tmpfs -o size=8m tmpfs "$1" && exec "$2" "$3" fail enospc "$1"'
    report = _run_fail_worker(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script,
                               "sh", str(directory), sys.executable, str(WORKER)])
    _check_fail_report(report, "No space left on device", str(directory))


# ---- prepare: stale temps, disk check, estimate -------------------------------------------------


def test_prepare_removes_only_stale_temp_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(tmp_path)
    save(ck, 1, {"latest"})
    temps = [f"{TMP_PREFIX}123-abc.data", f"{TMP_PREFIX}123-abc.link-latest.pt", f"{TMP_PREFIX}9-x.json-best.pt"]
    for name in temps:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep me")
    assert {i.name for i in ck.list()} == {"latest.pt"}  # temps are never listed as checkpoints
    with caplog.at_level(logging.INFO):
        ck.prepare(1000)
    assert names(tmp_path) == {"latest.pt", "latest.json", "notes.txt"}
    assert "removed 3 temporary file(s)" in caplog.text


def test_prepare_refuses_when_one_checkpoint_does_not_fit(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not enough disk space for one checkpoint") as info:
        Checkpointer(tmp_path / "ck").prepare(10**18)
    assert "\n" not in str(info.value)
    assert (tmp_path / "ck").is_dir()


def test_prepare_warns_when_the_kept_set_does_not_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    free = shutil.disk_usage(tmp_path).free
    ck = Checkpointer(tmp_path, keep_rolling=10, keep_epoch=5)
    assert ck.kept_set_checkpoints() == 17  # 10 + 5 + 3 names, 2 shared by hard links, +1 in flight
    with caplog.at_level(logging.WARNING):
        ck.prepare(free // 5)
    assert "Lower --keep_rolling/--keep_epoch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ck.prepare(1000)
    assert not caplog.records


def test_estimate_matches_file_size_before_the_first_step(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    estimate = estimate_state_bytes(model, optimizer)
    params = sum(p.numel() for p in model.parameters())
    assert estimate >= params * 4 * 3  # weights + 2 fp32 moments
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "x.pt")
    actual = (tmp_path / "x.pt").stat().st_size
    assert abs(actual - estimate) < 0.02 * actual + 64 * 1024
    assert estimate_state_bytes(model, optimizer) == estimate  # after the step: real state, same size


def test_estimate_counts_tied_weights_once() -> None:
    emb = torch.nn.Embedding(100, 16)
    head = torch.nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    assert estimate_state_bytes(model) == 100 * 16 * 4


# ---- kill -9 torture ----------------------------------------------------------------------------


def _check_directory_after_kill(directory: Path, stats: dict) -> int:
    """Every invariant a crash must keep. Returns the newest valid step."""
    newest = 0
    for path in directory.iterdir():
        if path.name.startswith(TMP_PREFIX):
            stats["temps"] += 1
            continue
        assert path.suffix in (".pt", ".json"), path.name
    for side in directory.glob("*.json"):
        data = side.with_suffix(".pt")
        assert data.exists(), f"sidecar {side.name} without its data file"
        ok, reason = validate_checkpoint(data)
        assert ok, f"{data.name} has a sidecar but is invalid: {reason}"
        record = json.loads(side.read_text())
        loaded = torch.load(data, map_location="cpu", weights_only=True)
        assert loaded["step"] == record["step"]
        assert loaded["model"]["w"][0].item() == float(record["step"])
        newest = max(newest, record["step"])
    for data in directory.glob("*.pt"):
        if not sidecar_path(data).exists():
            stats["no_sidecar"] += 1
    if (directory / "latest.pt").exists():
        loaded = torch.load(directory / "latest.pt", map_location="cpu", weights_only=True)
        assert loaded["model"]["w"][0].item() == float(loaded["step"])
    return newest


def _save_and_die_at_operation(directory: Path, die_at: int) -> int:
    """In a forked child: 3 saves, then a 4th that dies (os._exit, like kill -9) at file-system
    operation number `die_at` (os.link/replace/unlink/fsync). Returns the child's exit code:
    0 = died as planned, 3 = the save finished before reaching that operation."""
    def work() -> Callable[[], None]:
        ck = Checkpointer(directory, keep_rolling=3, keep_epoch=1)
        for step in (1, 2, 3):
            save(ck, step, {"latest", "rolling", "epoch"}, epoch=step, val_loss=1.0 / step)
        return lambda: save(ck, 4, {"latest", "rolling", "epoch", "best"}, epoch=4, val_loss=0.1)

    return die_at_operation(die_at, ("link", "replace", "unlink", "fsync"), work)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_death_at_every_file_operation_of_a_save_keeps_the_invariants(tmp_path: Path) -> None:
    # Deterministic complement to the random kill -9 test: die between every two file-system
    # operations of one save (publish of four names plus rotation) and check the directory.
    stats = {"temps": 0, "no_sidecar": 0}
    for die_at in range(200):
        directory = tmp_path / f"d{die_at}"
        code = _save_and_die_at_operation(directory, die_at)
        assert code in (0, 3), code
        newest = _check_directory_after_kill(directory, stats)
        assert newest >= 3  # the checkpoint before the interrupted save is still valid somewhere
        resolved = Checkpointer(directory).choose_resume("latest")
        assert Checkpointer(directory).load(resolved)["step"] >= 3
        shutil.rmtree(directory)
        if code == 3:
            assert newest == 4
            break
    else:
        raise AssertionError("the save never finished")
    assert die_at > 20 and stats["no_sidecar"] > 0


@pytest.mark.slow
def test_kill_9_at_random_moments_never_corrupts_a_checkpoint(tmp_path: Path) -> None:
    rounds = 20
    rng = random.Random(20240520)
    directory = tmp_path / "ck"
    directory.mkdir()
    zygote = subprocess.Popen([sys.executable, str(WORKER), "zygote"], env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    stats = {"temps": 0, "no_sidecar": 0}
    newest = 0
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            zygote.stdin.write(f"go {directory}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(pid, signal.SIGKILL)
            status = zygote.stdout.readline().split()
            assert status[0] == "reaped" and os.WIFSIGNALED(int(status[1])), status

            now = _check_directory_after_kill(directory, stats)
            assert now >= newest, "the newest valid checkpoint went backwards"
            newest = now
            ck = Checkpointer(directory, keep_rolling=3, keep_epoch=2)
            if newest:
                resolved = ck.choose_resume("latest")
                assert resolved is not None and not resolved.name.startswith(TMP_PREFIX)
                assert validate_checkpoint(resolved)[0]
            ck.prepare(0)
            assert not [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
    finally:
        if zygote.poll() is None:
            zygote.stdin.close()
            zygote.wait(timeout=30)
    assert newest > rounds  # saves made progress across the rounds
    assert stats["temps"] > 0, "no kill landed during a write; the test exercised nothing"
    # One clean save after all the kills: rotation is back to exactly keep_rolling files.
    ck = Checkpointer(directory, keep_rolling=3, keep_epoch=2)
    save(ck, newest + 1, {"latest", "rolling"})
    assert len(list(directory.glob("step_*.pt"))) == 3
    assert ck.choose_resume("latest") == directory / "latest.pt"


# ---- shell/resume_training.sh -------------------------------------------------------------------


def _resume_dry_run(tmp_path: Path, *args: str, **env: str) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "shell" / "resume_training.sh"), *args],
        env=dict(ENV, DRY_RUN="1", PATH="/usr/bin:/bin", **env), cwd=tmp_path,
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_resume_script_builds_the_command_from_any_cwd(tmp_path: Path) -> None:
    line = _resume_dry_run(tmp_path, "--max_steps", "2000", NPROC="3")
    assert "--nproc_per_node=3" in line
    assert line.endswith("src/train_improved.py --resume latest --max_steps 2000")
    fp8 = _resume_dry_run(tmp_path, "--fp8", "--resume", "best", NPROC="1")
    assert fp8.endswith("src/train_fp8.py --resume best")
    own = _resume_dry_run(tmp_path, "--resume=step_00000250.pt", NPROC="1")
    assert own.endswith("--resume step_00000250.pt")


def test_resume_script_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "shell" / "resume_training.sh")]).returncode == 0
