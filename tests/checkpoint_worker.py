"""Helper process for tests/test_checkpoint.py (not a test module itself).

    checkpoint_worker.py zygote
        Imports torch once, then for each "go DIR" line on stdin forks a child that saves
        checkpoints into DIR in a tight loop (async, all tiers, keep_rolling=3) until it is
        killed; prints the child's pid, reaps it, prints "reaped STATUS". Forking from a warm
        parent keeps each kill -9 round cheap (no torch import per round).

    checkpoint_worker.py fail efbig|enospc DIR
        Saves a small checkpoint, then makes the disk refuse a larger one for real and prints a
        JSON report of what the Checkpointer did. efbig: RLIMIT_FSIZE (any Linux/macOS).
        enospc: DIR is a tiny tmpfs the caller mounted (see the test).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from common.checkpoint import TMP_PREFIX, Checkpointer, CheckpointError, validate_checkpoint  # noqa: E402


def make_state(step: int, megabytes: float) -> dict:
    numel = max(int(megabytes * (1 << 20) / 4 / 3), 1)
    return {
        "model": {"w": torch.full((numel,), float(step))},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(numel), "exp_avg_sq": torch.rand(numel)}}},
        "step": step,
        "epoch": step // 4,
        "val_loss": None,
        "rng": [{"torch": torch.get_rng_state()}],
        "meta": {"tokens_seen": step * 1000, "world_size": 1},
    }


def newest_valid_step(directory: Path) -> int:
    steps = [i.step for i in Checkpointer(directory, enabled=False).list() if i.valid and i.step is not None]
    return max(steps, default=0)


def save_forever(directory: Path) -> None:
    ck = Checkpointer(directory, keep_rolling=3, keep_epoch=2, async_save=True)
    step = newest_valid_step(directory) + 1
    state = make_state(step, 3.0)
    while True:
        state["step"] = step
        state["model"]["w"].fill_(float(step))
        tiers = {"latest", "rolling"}
        if step % 4 == 0:
            tiers.add("epoch")
        if step % 3 == 0:
            tiers.add("best")
        if step % 7 == 0:
            tiers.add("final")  # synchronous path
        ck.save(state, step=step, epoch=step // 4, val_loss=1.0 / step, tiers=tiers)
        step += 1


def zygote() -> int:
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        pid = os.fork()
        if pid == 0:  # child: never returns
            try:
                save_forever(Path(parts[1]))
            finally:
                os._exit(1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {status}", flush=True)
    return 0


def fail(mechanism: str, directory: Path) -> int:
    ck = Checkpointer(directory, keep_rolling=3, async_save=True)
    ck.prepare(0)
    ck.save(make_state(1, 0.25), step=1, epoch=0, val_loss=2.0, tiers={"latest", "rolling"}, wait=True)
    if mechanism == "efbig":
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    big = make_state(2, 16.0)
    report: dict = {}

    ck.save(big, step=2, epoch=0, val_loss=1.0, tiers={"latest", "rolling"})  # async
    deadline = time.monotonic() + 60
    report["async_error"] = None
    while time.monotonic() < deadline:
        try:
            ck.check_failed()  # non-blocking, as the trainer calls it every step
        except CheckpointError as err:
            report["async_error"] = str(err)
            break
        if not ck.in_flight:
            try:
                ck.check_failed()
            except CheckpointError as err:
                report["async_error"] = str(err)
            break
        time.sleep(0.01)

    try:
        ck.save(big, step=3, epoch=0, val_loss=1.0, tiers={"latest", "rolling"}, wait=True)
        report["sync_error"] = None
    except CheckpointError as err:
        report["sync_error"] = str(err)

    report["files"] = sorted(p.name for p in directory.iterdir())
    report["temps"] = [n for n in report["files"] if n.startswith(TMP_PREFIX)]
    report["valid"] = {n: validate_checkpoint(directory / n)[0] for n in report["files"] if n.endswith(".pt")}
    report["latest_step"] = torch.load(directory / "latest.pt", weights_only=True)["step"]
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "zygote":
        sys.exit(zygote())
    sys.exit(fail(sys.argv[2], Path(sys.argv[3])))
