"""Graceful shutdown: signal handlers only set a flag; the ranks agree at step boundaries.

Every stop request ends the same way -- the run finishes its step, the ranks agree, latest.pt is
saved, the log says how to resume -- whatever asked for it:

* SIGINT (Ctrl+C), SIGTERM (torchrun, schedulers, `kill`), SIGUSR1 (SLURM's warning before the
  time limit, `#SBATCH --signal=USR1@90`);
* SIGHUP: the terminal or the ssh session is gone. torchrun forwards it to every worker; the
  console is then detached (stdout and stderr to /dev/null) so that writing to a dead terminal
  cannot end the run before its save; log.txt keeps the lines;
* SIGQUIT (Ctrl+\\): also forwarded by torchrun, treated like SIGTERM rather than Python's
  default of dying at once without a save (the immediate exit is the second Ctrl+C);
* the launcher's death: under torchrun each worker watches its parent, the torchrun agent. When
  the agent dies (OOM killer, `kill -9`, a scheduler killing it) its workers, which torchrun
  starts in sessions of their own, would train on as orphans; instead they stop and save.

The flag is agreed across ranks by the trainer's per-step all-reduce (common.stepsync), so every
rank stops after the same step even when only one rank (or one node) received the signal.

A second Ctrl+C exits at once (status 130) without saving -- for a user who does not want to
wait for the save. How a second press reaches a worker depends on the launcher:

- When the workers share the terminal's foreground process group (plain `python`, shell or MPI
  launchers), the terminal's SIGINT reaches every worker *and* the launcher forwards one of its
  own, so a worker sees two SIGINTs within milliseconds for a single Ctrl+C. A repeat within
  `repeat_window` seconds (default 2 s) of the first SIGINT is therefore the same press.
- torchrun starts each worker in a session of its own: the terminal's SIGINT reaches torchrun
  alone, which forwards one SIGINT; on a second Ctrl+C torchrun sends the workers SIGTERM. So a
  SIGTERM that follows a SIGINT by more than `repeat_window` also counts as the second press.

The handlers do no logging and no I/O (a handler runs between two bytecodes of the main thread,
possibly inside the logging module's own lock). The one exception is the immediate exit on a
second Ctrl+C, which writes one fixed line to stderr with os.write before os._exit.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None), getattr(signal, "SIGHUP", None),
                getattr(signal, "SIGQUIT", None)) if s is not None
)
EXIT_SECOND_SIGINT = 130  # 128 + SIGINT, what a shell reports for a process killed by Ctrl+C
LAUNCHER_GONE = "launcher exit"
_PARENT_POLL_S = 0.5

_Handler = Callable[[int, FrameType | None], Any] | int | None


class GracefulShutdown:
    """Turn stop signals (and the launcher's death) into a flag the ranks agree on."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS, *, repeat_window: float = 2.0,
                 exit_on_second_sigint: bool = True, watch_launcher: bool = False) -> None:
        self.signals = tuple(signals)
        self.repeat_window = float(repeat_window)
        self.exit_on_second_sigint = exit_on_second_sigint
        self.watch_launcher = watch_launcher
        self.requested = False
        self.signal_name: str | None = None  # what asked first: "SIGTERM", ..., or LAUNCHER_GONE
        self.received: list[str] = []  # every counted request, in order (for logs and tests)
        self._first_sigint: float | None = None
        self._previous: dict[int, _Handler] = {}
        self._watcher: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self._console_detached = False

    # ---- installation -----------------------------------------------------------------------

    def install(self) -> GracefulShutdown:
        """Install the handlers (main thread only), remembering the previous ones; start watching
        the launcher when asked to."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        if self.watch_launcher and self._watcher is None:
            self._stop_watching.clear()
            self._watcher = threading.Thread(target=self._watch_parent, args=(os.getppid(),),
                                             name="launcher-watch", daemon=True)
            self._watcher.start()
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were installed before `install()`; stop the watch."""
        for sig, previous in self._previous.items():
            # None means "installed from C": the closest restorable choice is the default.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._stop_watching.set()
        self._watcher = None

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
        self._request(name)

    def _request(self, name: str) -> None:
        self.received.append(name)
        if self.signal_name is None:
            self.signal_name = name
        self.requested = True

    def _watch_parent(self, parent: int) -> None:
        # When the parent dies the kernel re-parents this process (to init or a subreaper), so the
        # parent pid changes: polled, because PR_SET_PDEATHSIG is Linux-only and fires when the
        # parent *thread* that forked exits.
        while not self._stop_watching.wait(_PARENT_POLL_S):
            if os.getppid() != parent:
                self._request(LAUNCHER_GONE)
                return

    # ---- after the ranks agreed to stop -----------------------------------------------------

    def announce(self, *, local: bool) -> None:
        """Log the stop once (normal code, not a handler); after SIGHUP, detach the console."""
        if local and self.signal_name == LAUNCHER_GONE:
            logger.warning("the launcher (torchrun) is gone: stopping after this step and saving a checkpoint")
        elif local:
            logger.warning("received %s: stopping after this step and saving a checkpoint", self.signal_name)
        else:
            logger.warning("another rank was asked to stop: stopping after this step")
        if "SIGHUP" in self.received:
            self.detach_console()

    def detach_console(self) -> None:
        """Point stdout and stderr at /dev/null: the terminal is gone, and a write to it (a log
        line, the progress bar) would raise and end the run before its checkpoint."""
        if self._console_detached:
            return
        self._console_detached = True
        null = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            try:
                os.dup2(null, fd)
            except OSError:
                pass
        os.close(null)
