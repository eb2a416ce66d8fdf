"""The trainer's PNG charts, drawn by a child process so the training loop never waits on matplotlib.

A render of the charts costs about 2 s of CPU (more on the first, which imports matplotlib): drawn
in the loop every `viz_freq` steps it stalled a small CPU run by several percent. The child
(`python src/plot_metrics.py LOG_DIR`) reads metrics.jsonl, which the logger flushes row by row, and
runs at the lowest CPU priority, so on a machine without a spare core it takes only idle time.

- At most one render at a time: a request while one is running is remembered, and the next
  request or `close` draws it, so charts are never more than one render behind.
- `close(wait=True)` (a run that finished) waits for the last render, so the final step's charts
  exist when the trainer exits; `close(wait=False)` (a run that is stopping: a scheduler's grace
  period is short) ends a running render instead.
- The child dies with the trainer (Linux: PR_SET_PDEATHSIG, which fires when the thread that
  started the child ends: the trainer requests charts from its main thread), so a killed run
  leaves no process.
- A failed render logs a warning; a chart never ends a run.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

PLOT_SCRIPT = Path(__file__).resolve().parents[1] / "plot_metrics.py"  # puts its own src/ on sys.path
LOWEST_PRIORITY = 19
PARENT_ENV = "LLM_SUITE_CHART_PARENT"  # set for the child: the pid it must not outlive
CLOSE_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def die_with_parent_if_asked() -> None:
    """In the child: be killed when the trainer dies (Linux), or exit now if it already has."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # the parent died before the line above took effect
        os._exit(1)


class BackgroundCharts:
    """Renders `log_dir`'s charts in a child process, one render at a time."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._process: subprocess.Popen[bytes] | None = None
        self._pending = False

    @property
    def pid(self) -> int | None:
        """The drawing child's pid while one runs."""
        return self._process.pid if self._running() else None

    def request(self) -> None:
        """Draw the charts as of now, in the background (or once the running render ends)."""
        if self._running():
            self._pending = True
            return
        self._start()

    def close(self, wait: bool) -> None:
        if self._process is None:
            return
        if not wait:
            self._end()
            return
        try:
            self._wait_for_render()
            if self._pending:
                self._start()
                self._wait_for_render()
        except subprocess.TimeoutExpired:
            log.warning("the PNG charts took over %.0f s; stopped drawing them", CLOSE_TIMEOUT_S)
            self._end()

    def _running(self) -> bool:
        if self._process is None:
            return False
        if self._process.poll() is None:
            return True
        self._collect()
        return False

    def _start(self) -> None:
        self._pending = False
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        try:
            self._process = subprocess.Popen([sys.executable, str(PLOT_SCRIPT), str(self.log_dir)], env=env,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)
        except OSError as err:
            log.warning("could not start drawing the PNG charts: %s", err)
            self._process = None
            return
        try:
            os.setpriority(os.PRIO_PROCESS, self._process.pid, LOWEST_PRIORITY)
        except (OSError, AttributeError):  # not permitted, or no setpriority (Windows)
            pass

    def _wait_for_render(self) -> None:
        if self._process is not None:  # None: the render could not start
            self._process.wait(CLOSE_TIMEOUT_S)
            self._collect()

    def _collect(self) -> None:
        """Read a finished render's outcome; warn when it failed."""
        assert self._process is not None
        _, err = self._process.communicate()
        if self._process.returncode:
            lines = err.decode(errors="replace").strip().splitlines()
            log.warning("could not write the PNG charts: %s", lines[-1] if lines else
                        f"exit status {self._process.returncode}")
        self._process = None

    def _end(self) -> None:
        assert self._process is not None
        self._process.kill()
        self._process.communicate()
        self._process = None
