"""TensorBoard seen as a person sees it: a real training run, shell/start_tensorboard.sh on its logs,
and the Scalars dashboard opened in headless Chromium driven through ChromeDriver (Debian's
`chromium` and `chromium-driver`; `.ci/run` installs them). Nothing is mocked.

Without Chromium the test fails when CI is set (CI installs it) and is skipped elsewhere, with the
install line. The screenshot is kept in the test's tmp_path (its path is printed).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from runs import free_port, process_tree, train, wait_gone
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from tensorboard_server import TB_STARTUP_TIMEOUT, http_json, poll, start_tensorboard, stop_tensorboard

RUN_NAME = "browser-tiny"
STEPS = 20
CHART_TIMEOUT = 120.0  # charts draw seconds after the page loads; longer on a loaded 2-core box
INSTALL = "apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1400,1000"]

# The Scalars dashboard is built of Polymer elements, each behind a shadow root: look through them.
PAGE_STATE_JS = """
function all(root, selector, found = []) {
  for (const el of root.querySelectorAll('*')) {
    if (el.matches(selector)) found.push(el);
    if (el.shadowRoot) all(el.shadowRoot, selector, found);
  }
  return found;
}
function text(node) {  // the text a person reads, shadow roots included
  let out = '';
  for (const child of (node.shadowRoot || node).childNodes) {
    if (child.nodeType === Node.TEXT_NODE) out += child.textContent;
    else if (child.nodeType === Node.ELEMENT_NODE && !['STYLE', 'TEMPLATE'].includes(child.tagName))
      out += ' ' + text(child);
  }
  return out.replace(/\\s+/g, ' ').trim();
}
const card = all(document, 'tf-scalar-card').find(c => c.tag === arguments[0]);
const chart = card && all(card.shadowRoot, 'vz-line-chart2')[0];
const lines = chart ? all(chart.shadowRoot, 'path.line') : [];
const box = card && card.getBoundingClientRect();
return {
  runs: all(document, 'tf-multi-checkbox').map(text),
  // Chart groups in page order (the unnamed one holds tag-filter matches), every tag they hold, and
  // the charts drawn so far (cards below the fold are drawn when scrolled to).
  groups: all(document, 'tf-category-paginated-view').map(view => view.category.name).filter(name => name),
  tags: all(document, 'tf-category-paginated-view').flatMap(view => view.category.items.map(item => item.tag)),
  cards: all(document, 'tf-scalar-card').map(c => c.tag),
  // A drawn line: an SVG path "M x,y L x,y ..." with one vertex per point.
  vertices: Math.max(0, ...lines.map(path => (path.getAttribute('d') || '').split(/[ML]/).length - 1)),
  in_view: Boolean(box) && box.top >= 0 && box.bottom <= window.innerHeight,  // seen without scrolling
};
"""


def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver), Debian's; a clear failure in CI, a skip elsewhere, when missing."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        message = f"{' and '.join(missing)} not found: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must have a browser for this test ({message}; .ci/run installs them)")
        pytest.skip(message)
    return chromium, driver


@contextlib.contextmanager
def headless_chromium(profile_dir: Path, log_file: Path) -> Iterator[webdriver.Chrome]:
    """Chromium under ChromeDriver with a fresh profile; on exit both end, and so does every
    process they started (checked: a survivor is killed and fails the test)."""
    chromium, driver_path = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium then never tries to download one.
    service = Service(executable_path=driver_path, log_output=str(log_file))
    driver = webdriver.Chrome(options=options, service=service)
    driver_process = psutil.Process(service.process.pid)
    try:
        yield driver
    finally:
        processes = [driver_process, *driver_process.children(recursive=True)]  # Chromium and its helpers
        driver.quit()
        survivors = wait_gone(processes, timeout=30)
        for process in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        assert not survivors, f"still running after driver.quit(): {[p.pid for p in survivors]}"


def page_state(driver: webdriver.Chrome, tag: str) -> dict[str, Any]:
    return driver.execute_script(PAGE_STATE_JS, tag)


@pytest.fixture(scope="module")
def tiny_run_logs(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log directory of a real (tiny) training run with TensorBoard on."""
    browser_binaries()  # no browser: no need to train
    tmp = tmp_path_factory.mktemp("tb_browser_run")
    train(tmp, prepared_data, "--max_steps", str(STEPS), "--eval_freq", "10", "--use_tensorboard", "true",
          "--run_name", RUN_NAME, nproc=1)
    return tmp / "logs"


@pytest.mark.slow
def test_scalars_dashboard_draws_the_runs_training_curves_first(tiny_run_logs: Path, tmp_path: Path) -> None:
    port = free_port()
    server, _, err_file = start_tensorboard(tiny_run_logs, port, tmp_path)
    server_processes: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"
        poll(lambda: http_json(f"{base}/data/runs"), server, TB_STARTUP_TIMEOUT, "the run list", err_file)
        server_processes = process_tree(server)
        with headless_chromium(tmp_path / "chromium-profile", tmp_path / "chromedriver.log") as driver:
            driver.get(f"{base}/#scalars")
            try:  # wait for the line itself, not for the page
                WebDriverWait(driver, CHART_TIMEOUT, poll_frequency=0.5).until(
                    lambda d: page_state(d, "train/loss")["vertices"] >= STEPS)
            except TimeoutException:
                driver.save_screenshot(str(tmp_path / "timeout.png"))
                pytest.fail(f"no train/loss line of {STEPS} points after {CHART_TIMEOUT:.0f}s: "
                            f"{page_state(driver, 'train/loss')} (screenshot {tmp_path / 'timeout.png'})")
            state = page_state(driver, "train/loss")
            screenshot = tmp_path / "tensorboard_scalars.png"
            assert driver.save_screenshot(str(screenshot))
            print(f"screenshot: {screenshot}")
    finally:
        stop_tensorboard(server)
        assert not wait_gone(server_processes, timeout=30), "TensorBoard left a process behind"

    assert state["runs"] == [RUN_NAME]  # the run's name, not its events' folder "tensorboard"
    assert state["vertices"] == STEPS  # one point per step
    assert state["groups"][0] == "train"  # the training curves first ...
    assert "hparam" not in state["groups"]  # ... and no one-point end-of-run charts
    assert state["in_view"]  # the loss chart is on the first screen
    assert "train/loss" in state["tags"] and not [t for t in state["tags"] if t.endswith("/time")]  # no clock
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

