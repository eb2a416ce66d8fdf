"""Run src/train_improved.py unchanged, with wall-clock timers around the trainer's parts.

    BENCH_PROBE_OUT=timers.json python bench/trainer_probe.py [train_improved.py flags ...]

The entry script runs through `runpy` as `__main__` (its own code path, its own exit status);
before that, the methods below are wrapped with a `perf_counter` pair each (some tens of
microseconds per step in all), and a `gc.callbacks` hook times Python's garbage collections.
At exit the timers go to $BENCH_PROBE_OUT as JSON: for every part, a list of
[step, start unix time, seconds] (step: the optimizer step being computed, or just completed for
the evaluation and checkpoint that follow it), the collections as [generation, start, seconds],
the unix time at which each step's metrics were logged (the end of the step) and the process
launch time.

This tells where the trainer's time goes beyond the bare loop; `bench/trainer_overhead.py`
turns it into the attribution table of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import functools
import json
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STARTED_UNIX = time.time()
REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

TIMERS: dict[str, list[list[float]]] = {}
STEP_END_UNIX: dict[int, float] = {}
_current_step = [0]


def _wrap(owner: Any, name: str, label: str, on_return: Callable[[Any, tuple], None] | None = None,
          on_call: Callable[[tuple], None] | None = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if on_call is not None:
            on_call(args)
        step = _current_step[0]
        start_unix = time.time()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMERS.setdefault(label, []).append([step, start_unix, time.perf_counter() - start])
            if on_return is not None:
                on_return(original, args)

    setattr(owner, name, timed)


GC_EVENTS: list[list[float]] = []  # [generation, start unix time, seconds] of every collection
_gc_started = [0.0, 0.0]


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[0], _gc_started[1] = time.time(), time.perf_counter()
    else:
        GC_EVENTS.append([info.get("generation", -1), _gc_started[0], time.perf_counter() - _gc_started[1]])


def install() -> None:
    import gc

    import torch

    gc.callbacks.append(_gc_callback)

    from common import data, logger, trainer
    from common.checkpoint import Checkpointer

    def after_log_step(_orig: Any, args: tuple) -> None:
        self = args[0]
        STEP_END_UNIX[int(self.step)] = time.time()

    def entering_step(args: tuple) -> None:
        _current_step[0] = int(args[0].step) + 1  # the step _train_step is about to compute

    T = trainer.Trainer
    # Everything _train_step does: next_batch + forward + backward per micro-batch, clip, histograms.
    _wrap(T, "_train_step", "train_step (loader+fwd+bwd+clip)", on_call=entering_step)
    _wrap(data.ShardedTrainLoader, "next_batch", "loader.next_batch")
    _wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_")
    _wrap(logger.RunLogger, "log_histograms", "histograms")
    _wrap(T, "_log_step", "log_step (jsonl+tensorboard+progress)", on_return=after_log_step)
    _wrap(logger.RunLogger, "log_step", "RunLogger.log_step")
    _wrap(T, "_after_step", "after_step (eval+checkpoint)")
    _wrap(T, "evaluate", "evaluate")
    _wrap(T, "sample_text", "sample_text")
    _wrap(T, "save", "checkpoint save stall")
    _wrap(T, "_checkpoint_state", "checkpoint state dict")
    _wrap(Checkpointer, "prepare", "checkpointer.prepare")
    _wrap(T, "__init__", "Trainer.__init__ (startup)")
    _wrap(T, "_peak_flops", "startup matmul peak")
    # The optimizer class is patched before the trainer builds its instance.
    _wrap(torch.optim.AdamW, "step", "optimizer.step")
    _wrap(torch.optim.AdamW, "zero_grad", "optimizer.zero_grad")
    _wrap(T, "epochs_completed", "epochs_completed")
    from common.signals import GracefulShutdown
    _wrap(GracefulShutdown, "should_stop", "shutdown.should_stop")


def dump() -> None:
    path = os.environ.get("BENCH_PROBE_OUT")
    if not path:
        return
    Path(path).write_text(json.dumps({"started_unix": STARTED_UNIX, "timers": TIMERS, "gc": GC_EVENTS,
                                      "step_end_unix": {str(k): v for k, v in STEP_END_UNIX.items()}}))


def main() -> None:
    install()
    script = SRC / "train_improved.py"
    sys.argv = [str(script), *sys.argv[1:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        dump()


if __name__ == "__main__":
    main()
