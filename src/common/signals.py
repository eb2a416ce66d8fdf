"""Graceful shutdown: signal handlers only set a flag; ranks agree at step boundaries.

SIGINT (Ctrl+C), SIGTERM (torchrun, schedulers, `kill`) and SIGUSR1 (SLURM's warning before the
time limit, `#SBATCH --signal=USR1@90`) set `requested`. The training loop calls `should_stop()`
at every step boundary; under torch.distributed that is one tiny all_reduce(MAX), so every rank
stops after the same step even when only one rank (or only one node) received the signal. The
trainer then saves latest.pt and exits well within torchrun's 30-second kill window.

A second Ctrl+C exits at once (status 130) without saving -- for a user who does not want to
wait for the save. How a second press reaches a worker depends on the launcher:

- When the workers share the terminal's foreground process group (plain `python`, older
  torchrun, shell or MPI launchers), the terminal's SIGINT reaches every worker *and* the
  launcher forwards one of its own, so a worker sees two SIGINTs within milliseconds for a
  single Ctrl+C. A repeat within `repeat_window` seconds (default 2 s) of the first SIGINT is
  therefore taken as the same press and ignored; only a later one counts as the second press.
- torchrun of torch 2.13 starts each worker in a session of its own: the terminal's SIGINT
  reaches torchrun alone, which forwards one SIGINT; on a second Ctrl+C torchrun starts its
  shutdown again and sends the workers SIGTERM. So a SIGTERM that follows a SIGINT by more than
  `repeat_window` also counts as the second press. (A SIGTERM without an earlier SIGINT -- from
  a scheduler, `kill`, or torchrun on its own SIGTERM -- is a normal stop request.)

The handlers do no logging and no I/O (a handler runs between two bytecodes of the main thread,
possibly inside the logging module's own lock); `should_stop()` logs once from normal code. The
only exception is the immediate exit on a second SIGINT, which writes one fixed line to stderr
with os.write before os._exit.

Call `should_stop()` on every rank at the same points: it is a collective.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None
)
EXIT_SECOND_SIGINT = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl+C

_Handler = Callable[[int, FrameType | None], Any] | int | None


class GracefulShutdown:
    """Turn stop signals into a flag that all ranks agree on at step boundaries."""

    def __init__(
        self,
        signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS,
        *,
        repeat_window: float = 2.0,
        exit_on_second_sigint: bool = True,
    ) -> None:
        self.signals = tuple(signals)
        self.repeat_window = float(repeat_window)
        self.exit_on_second_sigint = exit_on_second_sigint
        self.requested = False
        self.signal_name: str | None = None
        self.received: list[str] = []  # every counted signal, in order (for logs and tests)
        self._first_sigint: float | None = None
        self._previous: dict[int, _Handler] = {}
        self._announced = False

    # ---- installation -----------------------------------------------------------------------

    def install(self) -> GracefulShutdown:
        """Install the handlers (main thread only), remembering the previous ones."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were installed before `install()`."""
        for sig, previous in self._previous.items():
            # None means "installed from C": the closest restorable choice is the default.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> GracefulShutdown:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # ---- the handler: flag only -------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self._first_sigint is not None and signum in (signal.SIGINT, signal.SIGTERM):
            if now - self._first_sigint >= self.repeat_window:
                # A second Ctrl+C: directly (SIGINT), or through torchrun (SIGTERM).
                if self.exit_on_second_sigint:
                    os.write(2, b"second Ctrl+C: exiting now without saving; the last checkpoint is intact\n")
                    os._exit(EXIT_SECOND_SIGINT)
            elif signum == signal.SIGINT:
                return  # the same Ctrl+C delivered twice (terminal + launcher): not a second press
        elif signum == signal.SIGINT:
            self._first_sigint = now
        self.received.append(name)
        if self.signal_name is None:
            self.signal_name = name
        self.requested = True

    # ---- the decision at a step boundary ----------------------------------------------------

    def should_stop(self, device: Any = None) -> bool:
        """True when any rank received a stop signal. A collective under torch.distributed.

        `device` holds the one-element flag tensor: the rank's CUDA device with nccl, CPU (the
        default) with gloo.
        """
        local = self.requested
        stop = local
        # No import here: if torch.distributed was never imported, no process group exists (and
        # a non-distributed caller need not pay for importing torch).
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            import torch

            flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device or "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop and not self._announced:
            self._announced = True
            if local:
                logger.warning("received %s: stopping after this step and saving a checkpoint", self.signal_name)
            else:
                logger.warning("another rank received a stop signal: stopping after this step")
        return stop

    def reset(self) -> None:
        """Forget a request (for tests and for loops that handle one stop and go on)."""
        self.requested = False
        self.signal_name = None
        self.received.clear()
        self._first_sigint = None
        self._announced = False
