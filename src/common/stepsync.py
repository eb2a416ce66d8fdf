"""What the ranks agree on after every step, and the host reading it one step late.

`StepAgreement.reduce` is one small all-reduce per optimizer step of [loss, grad norm, stop,
failed]: the mean loss over ranks, the gradient norm (identical on every rank under DDP, so the
mean is the value -- or non-finite when any rank's is, e.g. a corrupted gradient on one GPU),
whether any rank was asked to stop (a signal, the launcher's death) and whether any rank has a
failure to report (a failed checkpoint write). It runs in the device's stream: nothing waits on
the host, and the skip decision (common.faults.SpikeGuard) is taken on the device from its
result, identically on every rank.

`DelayedReadout` hands those numbers to the host one step late: the step's small report tensor
is copied to pinned host memory behind an event, and read after the next step's work has been
queued. On a GPU the host thus never drains the launch queue (a `.item()` per step would); on a
CPU the copy is already done. Stop requests are therefore acted on one or two steps after they
arrive, always at the same step on every rank.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from common.dist import DistContext, all_reduce_sum


class Agreed(NamedTuple):
    """The reduced values, on the device."""

    loss: torch.Tensor  # mean over ranks
    grad_norm: torch.Tensor  # mean over ranks (non-finite if any rank's is)
    stop: torch.Tensor  # > 0 when any rank was asked to stop
    failed: torch.Tensor  # > 0 when any rank has a failure to report


class StepAgreement:
    """One all-reduce per step carries everything the ranks must agree on."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def reduce(self, loss: torch.Tensor, grad_norm: torch.Tensor, *, stop: bool, failed: bool) -> Agreed:
        flags = torch.tensor([float(stop), float(failed)], device=self.ctx.device) if (stop or failed) \
            else torch.zeros(2, device=self.ctx.device)  # no host-to-device copy in the common case
        values = torch.cat([loss.detach().float().reshape(1), grad_norm.detach().float().reshape(1), flags])
        all_reduce_sum(values, self.ctx)
        world = float(self.ctx.world_size)
        return Agreed(values[0] / world, values[1] / world, values[2], values[3])


@dataclass
class Report:
    """One step's numbers for the host: `values` (read lazily) and host-side facts (`info`).

    A report is logged as soon as it is read (a metrics row) but acted on (skip bookkeeping,
    rollback, stop, failure) only at the end of the next step, whether or not a save or an
    evaluation read it earlier: the run then does the same thing at the same step whether it was
    interrupted and resumed in between or not.
    """

    step: int
    info: dict[str, Any]
    logged: bool = False
    _device: torch.Tensor | None = None
    _host: torch.Tensor | None = None
    _event: Any = None
    _values: list[float] | None = field(default=None, repr=False)

    def values(self) -> list[float]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()  # this step only: later steps stay queued
                self._values = self._host.tolist()
            else:
                self._values = self._device.tolist()
            self._device = self._host = self._event = None
        return self._values


class DelayedReadout:
    """Reports pushed after each step; each is acted on one step later."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: deque[Report] = deque()

    def push(self, step: int, values: torch.Tensor, info: dict[str, Any]) -> None:
        report = Report(step, info)
        if self.device.type == "cuda":
            report._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            report._host.copy_(values.detach(), non_blocking=True)
            report._event = torch.cuda.Event()
            report._event.record()
        else:
            report._device = values.detach()
        self._pending.append(report)

    def due(self) -> list[Report]:
        """Every report but the newest, removed: the steps to act on now. Reading them does not
        wait for the step just queued."""
        out = []
        while len(self._pending) > 1:
            out.append(self._pending.popleft())
        return out

    def pending(self) -> list[Report]:
        """Every report not yet acted on (reading the newest waits for its step: a host sync)."""
        return list(self._pending)

    def state_dict(self) -> list[dict[str, Any]]:
        """The reports not yet acted on (read: call at a step boundary, e.g. in a save)."""
        return [{"step": r.step, "values": r.values()} for r in self._pending]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Carry over what the saved run had not acted on yet; it was logged before the save."""
        self._pending = deque(Report(int(s["step"]), {}, logged=True, _values=[float(v) for v in s["values"]])
                              for s in state)
