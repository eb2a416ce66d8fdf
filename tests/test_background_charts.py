"""The trainer's charts are drawn by a child process: the loop does not wait for matplotlib, the
child runs at the lowest priority, never outlives the trainer, and its failures are warnings."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from test_plot_metrics import BASE_CHARTS, write_run

from common.background_charts import LOWEST_PRIORITY, BackgroundCharts
from common.plots import OVERVIEW_FILE

REPO = Path(__file__).resolve().parents[1]


def test_request_returns_while_a_low_priority_child_draws_and_close_waits_for_the_last_charts(
        tmp_path: Path) -> None:
    write_run(tmp_path)
    charts = BackgroundCharts(tmp_path)
    charts.request()
    pid = charts.pid
    assert pid is not None  # drawing takes seconds (matplotlib alone imports in ~0.5 s): still running
    child = psutil.Process(pid)
    assert child.nice() == LOWEST_PRIORITY
    deadline = time.monotonic() + 30
    while not any(part.endswith("plot_metrics.py") for part in child.cmdline()):  # /proc may lag the exec
        assert time.monotonic() < deadline, child.cmdline()
        time.sleep(0.01)
    charts.request()  # the run went on while the child draws: remembered, not a second child
    assert charts.pid == pid
    overview = tmp_path / "plots" / OVERVIEW_FILE
    deadline = time.monotonic() + 60
    while not (overview.exists() and child.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)):
        assert time.monotonic() < deadline, "the first render did not finish"
        time.sleep(0.05)
    first_render = overview.stat().st_ino
    charts.close(wait=True)
    assert charts.pid is None and not psutil.pid_exists(pid)
    for name in [*BASE_CHARTS, OVERVIEW_FILE]:
        assert (tmp_path / "plots" / name).stat().st_size > 1000
    assert overview.stat().st_ino != first_render  # close drew the remembered request (a new file)


def test_close_without_waiting_ends_a_running_render(tmp_path: Path) -> None:
    write_run(tmp_path)
    charts = BackgroundCharts(tmp_path)
    charts.request()
    pid = charts.pid
    assert pid is not None
    charts.close(wait=False)  # a stopping run: its scheduler's grace period is for the checkpoint
    assert not psutil.pid_exists(pid)
    assert not (tmp_path / "plots" / OVERVIEW_FILE).exists()


def test_a_failed_render_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    charts = BackgroundCharts(tmp_path)
    with caplog.at_level(logging.WARNING, logger="common.background_charts"):
        charts.request()
        charts.close(wait=True)
    assert any("could not write the PNG charts" in r.message and "no training rows" in r.message
               for r in caplog.records), caplog.text


PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from common.background_charts import BackgroundCharts
    charts = BackgroundCharts(Path(sys.argv[1]))
    charts.request()
    print(charts.pid, flush=True)
    time.sleep(600)
""")


def test_a_killed_trainer_takes_its_drawing_child_with_it(tmp_path: Path) -> None:
    """kill -9 of the parent (a trainer killed by the OOM killer or a scheduler): the child ends at
    once instead of drawing on (PR_SET_PDEATHSIG, or its parent check if the parent died first)."""
    write_run(tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=REPO / "src",
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs([child], timeout=30)
        assert not alive, "the drawing child outlived its killed parent"
        assert not (tmp_path / "plots" / OVERVIEW_FILE).exists()  # killed before it could draw
    finally:
        parent.kill()
        for proc in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(proc.info["cmdline"] or []):
                proc.kill()


def test_a_render_that_cannot_start_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter gone (e.g. a virtualenv removed under a long run): the remembered request
    that close draws cannot start; a warning, and the run ends normally."""
    write_run(tmp_path)
    charts = BackgroundCharts(tmp_path)
    charts.request()
    charts.request()  # remembered while the first render runs
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    with caplog.at_level(logging.WARNING, logger="common.background_charts"):
        charts.close(wait=True)
    assert charts.pid is None
    assert any("could not start drawing the PNG charts" in r.message for r in caplog.records), caplog.text
    assert (tmp_path / "plots" / OVERVIEW_FILE).exists()  # the first render finished
