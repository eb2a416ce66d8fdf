"""Faults a long unattended run meets, and what it does about them.

* `SpikeGuard` decides on the device, for every step, whether its update is applied: a step whose
  loss or gradient norm is non-finite, or an outlier against a rolling window of accepted steps
  (z-score above `--spike_zscore`, once the window of `--spike_window` steps is full), is
  skipped. The inputs are reduced across ranks first (common.stepsync), so every rank takes the
  same decision without a host sync; the optimizer applies it through fused AdamW's `found_inf`
  (a skipped step changes neither weights, moments nor the step count). Its data is consumed.
* `Recovery` is the host's side: it counts skips, and after `--max_consecutive_skips` skips in a
  row asks for a rollback to the last good checkpoint (the data that caused them is not replayed:
  the loader keeps its position); after `--max_rollbacks` rollbacks it stops the run.
* `FaultPlan` injects faults for tests and operator drills: `--inject_fault KIND@STEP[:RANK],...`
  with KIND one of nan_loss, nan_grad, loss_spike, crash, hang; STEP may be a range `A-B` for a
  fault that persists. Off by default, never inherited by a resumed or restarted run.
* `Heartbeat` keeps LOG_DIR/heartbeat.json current for external monitors: each rank's last step,
  phase and time.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.fsutil import atomic_write_text
from common.parallel import local_tensor

log = logging.getLogger(__name__)

FAULT_KINDS = ("nan_loss", "nan_grad", "loss_spike", "crash", "hang")
LOSS_SPIKE_FACTOR = 1000.0  # the injected spike multiplies the loss (and so its gradients)
CRASH_EXIT_CODE = 17


# ----------------------------------------------------------------------------- drills

@dataclass(frozen=True)
class Fault:
    kind: str
    first: int  # optimizer steps, 1-based, inclusive
    last: int
    rank: int | None  # None: every rank

    def hits(self, kind: str, step: int, rank: int) -> bool:
        return self.kind == kind and self.first <= step <= self.last and self.rank in (None, rank)


_FORMAT = f"KIND@STEP[:RANK] (KIND one of {', '.join(FAULT_KINDS)}; STEP a number or a range A-B)"


def parse_fault_plan(spec: str) -> tuple[Fault, ...]:
    """`nan_grad@12,hang@8:1,loss_spike@20-24` -> Faults; UserError naming the bad part."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        kind, at, where = part.partition("@")
        steps, colon, rank = where.partition(":")
        first, dash, last = steps.partition("-")
        try:
            fault = Fault(kind, int(first), int(last) if dash else int(first), int(rank) if colon else None)
        except ValueError:
            fault = None
        if not at or fault is None or kind not in FAULT_KINDS or fault.first < 1 or fault.last < fault.first \
                or (fault.rank is not None and fault.rank < 0):
            raise UserError(f"--inject_fault {part!r} is not {_FORMAT}")
        faults.append(fault)
    return tuple(faults)


class FaultPlan:
    """The drills of --inject_fault for this rank. Each method is a no-op without one."""

    def __init__(self, spec: str, rank: int) -> None:
        self.faults = parse_fault_plan(spec)
        self.rank = rank
        if self.faults:
            log.warning("fault drill on: %s (--inject_fault; not inherited by a resumed run)", spec)

    def _hits(self, kind: str, step: int) -> bool:
        return any(f.hits(kind, step, self.rank) for f in self.faults)

    def before_step(self, step: int) -> None:
        """crash: the rank exits non-zero at once; hang: the rank stops answering for good."""
        if self._hits("crash", step):
            log.error("drill: rank %d crashes before step %d", self.rank, step)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
        if self._hits("hang", step):
            log.error("drill: rank %d hangs before step %d", self.rank, step)
            while True:  # like a stuck kernel or a deadlock: no step boundary is ever reached again
                time.sleep(3600)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """nan_loss: the loss (and every gradient) becomes NaN; loss_spike: both jump 1000x."""
        if self._hits("nan_loss", step):
            return loss * float("nan")
        if self._hits("loss_spike", step):
            return loss * LOSS_SPIKE_FACTOR
        return loss

    def after_backward(self, step: int, model: torch.nn.Module) -> None:
        """nan_grad: a finite loss, but one gradient entry NaN on this rank only."""
        if self._hits("nan_grad", step):
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            local_tensor(grad).view(-1)[0] = float("nan")  # under fsdp: this rank's shard


# ----------------------------------------------------------------------------- skip decision

class SpikeGuard:
    """Skip-or-step on the device: non-finite values always, outliers once the window is full."""

    def __init__(self, *, zscore: float, window: int, device: torch.device) -> None:
        self.zscore = float(zscore)
        self.window = int(window)
        self.history = torch.zeros(2, self.window, device=device)  # loss, grad norm of accepted steps
        self.count = torch.zeros((), dtype=torch.long, device=device)  # accepted values held (<= window)
        self.next = torch.zeros((), dtype=torch.long, device=device)  # ring-buffer position

    def decide(self, loss: torch.Tensor, grad_norm: torch.Tensor,
               veto: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip as 0./1., z-scores of [loss, grad norm]); updates the window with accepted steps.
        `veto` > 0 skips the step whatever its values (a rank failed to produce it)."""
        values = torch.stack([loss.float(), grad_norm.float()])
        finite = torch.isfinite(values).all()
        mean = self.history.mean(dim=1)
        # A floor on sigma: a window of near-identical values would make every wiggle an outlier.
        std = self.history.std(dim=1).clamp_min(1e-4 * mean.abs() + 1e-12)
        z = torch.where(torch.isfinite(values), (values - mean) / std, torch.zeros_like(values))
        spike = (z > self.zscore).any() & (self.count >= self.window) if self.zscore > 0 else torch.zeros_like(finite)
        skip = (~finite | spike).float()
        if veto is not None:
            skip = torch.maximum(skip, (veto > 0).float())
        accept = 1 - skip
        column = self.history[:, self.next]
        self.history[:, self.next] = torch.where(accept.bool(), torch.nan_to_num(values), column)
        self.next = (self.next + accept.long()) % self.window
        self.count = torch.clamp(self.count + accept.long(), max=self.window)
        return skip, z

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.cpu(), "count": int(self.count), "next": int(self.next)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state["history"].to(self.history.device, self.history.dtype)
        if history.shape != self.history.shape:  # --spike_window changed: start the window afresh
            log.info("spike window changed from %d to %d steps: its statistics start afresh",
                     history.shape[1], self.window)
            return
        self.history.copy_(history)
        self.count.fill_(int(state["count"]))
        self.next.fill_(int(state["next"]))


# ----------------------------------------------------------------------------- host policy

@dataclass
class Recovery:
    """Skip counts and rollbacks, as the host sees them one step late."""

    max_consecutive: int
    max_rollbacks: int
    skipped: int = 0
    streak: list[int] | None = None  # steps of the current run of skips
    rollbacks: list[dict[str, Any]] | None = None  # {"at": step, "to": step, "skipped": [...]}

    def __post_init__(self) -> None:
        self.streak = list(self.streak or [])
        self.rollbacks = list(self.rollbacks or [])

    def record(self, step: int, skipped: bool) -> bool:
        """Note one step; True when it completes `max_consecutive` skips in a row (roll back)."""
        assert self.streak is not None
        if not skipped:
            self.streak = []
            return False
        self.skipped += 1
        self.streak.append(step)
        return len(self.streak) >= self.max_consecutive

    def rolled_back(self, at: int, to: int) -> None:
        assert self.rollbacks is not None and self.streak is not None
        self.rollbacks.append({"at": at, "to": to, "skipped": list(self.streak)})
        self.streak = []

    @property
    def exhausted(self) -> bool:
        assert self.rollbacks is not None
        return len(self.rollbacks) >= self.max_rollbacks

    def history(self) -> str:
        """The skipped steps of every rollback so far and of the current streak, for one line."""
        assert self.rollbacks is not None and self.streak is not None
        parts = [_span(r["skipped"]) + f" (rolled back to step {r['to']})" for r in self.rollbacks]
        if self.streak:
            parts.append(_span(self.streak))
        return "; ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "streak": list(self.streak or []), "rollbacks": list(self.rollbacks or [])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.streak = [int(s) for s in state.get("streak", [])]
        self.rollbacks = [dict(r) for r in state.get("rollbacks", [])]


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"


def describe_skip(values: dict[str, float], zscore: float) -> str:
    """Why a step was skipped, for the log line and the metrics row."""
    loss, grad_norm = values["loss"], values["grad_norm"]
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    return (f"outlier: loss {loss:.4g} (z {values['z_loss']:.1f}), grad norm {grad_norm:.4g} "
            f"(z {values['z_grad']:.1f}), limit {zscore:g} sigma")


# ----------------------------------------------------------------------------- heartbeat

class Heartbeat:
    """LOG_DIR/heartbeat.json: {"time", "world_size", "ranks": {rank: {step, phase, time, pid, host}}}.

    Every rank updates its own entry (read-modify-write under a lock file, written atomically so a
    monitor never reads half a file), at most every `interval_s` seconds unless the phase changes.
    A monitor compares each rank's time with the clock: a rank whose entry stops moving is stuck.
    """

    NAME = "heartbeat.json"

    def __init__(self, log_dir: str | Path, rank: int, world_size: int, interval_s: float = 5.0) -> None:
        self.path = Path(log_dir) / self.NAME
        self.lock = Path(log_dir) / ".heartbeat.lock"
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._last = (-math.inf, "")
        self._host = socket.gethostname()

    def beat(self, step: int, phase: str = "train", reason: str | None = None) -> None:
        now = time.time()
        if phase == self._last[1] and now - self._last[0] < self.interval_s:
            return
        self._last = (now, phase)
        entry = {"step": step, "phase": phase, "time": now, "pid": os.getpid(), "host": self._host,
                 **({"reason": reason} if reason else {})}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.lock, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    record = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    record = {}
                ranks = record.get("ranks") if isinstance(record.get("ranks"), dict) else {}
                # entries of ranks beyond this world size are from an earlier run of the directory
                ranks = {k: v for k, v in ranks.items() if k.isdigit() and int(k) < self.world_size}
                ranks[str(self.rank)] = entry
                record = {"time": now, "world_size": self.world_size, "ranks": ranks}
                atomic_write_text(self.path, json.dumps(record, indent=1) + "\n", durable=False)
        except OSError as err:  # monitoring must never end a run
            log.debug("heartbeat not written: %s", err)
