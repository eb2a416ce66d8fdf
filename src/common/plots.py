"""PNG charts from LOG_DIR/metrics.jsonl (used by src/plot_metrics.py and, every viz_freq steps,
by the trainer).

Charts: loss (raw, moving average, validation), learning rate, throughput, grad norm, and
validation next-token accuracy / MFU / memory when the run logged them; one file per chart plus
``training_latest.png`` with all of them.
Files are written atomically (temporary file + rename), so a viewer never sees half a PNG while
training rewrites them. Matplotlib is driven through the Agg canvas directly: no pyplot, no GUI
backend, nothing global changed in the process.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.fsutil import atomic_write
from common.logger import METRICS_FILE, read_metrics_rows

log = logging.getLogger(__name__)

PLOTS_SUBDIR = "plots"
OVERVIEW_FILE = "training_latest.png"


@dataclass
class Metrics:
    """Training rows (one per optimizer step) and evaluation rows, each sorted by step."""

    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, rows: str = "train") -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the rows that have a number for it."""
        steps: list[int] = []
        values: list[float] = []
        for row in getattr(self, rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values

    def has(self, key: str, rows: str = "train") -> bool:
        return bool(self.series(key, rows)[0])


def read_metrics(path: Path) -> Metrics:
    """Parse a metrics.jsonl; a truncated or garbled line (crash mid-write) is skipped.

    A step logged twice (a log that was not purged on resume) keeps its last row.
    """
    if not path.is_file():
        raise UserError(f"no metrics file at {path}: point to the run's --log_dir (it holds metrics.jsonl)")
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    skipped = 0

    def skip(_line: str) -> None:
        nonlocal skipped
        skipped += 1

    for row in read_metrics_rows(path, on_skip=skip):
        if not isinstance(row.get("step"), (int, float)):
            skipped += 1
            continue
        step = int(row["step"])
        if "val_loss" in row:
            evals[step] = row
        if "loss" in row:
            train[step] = row
    if skipped:
        log.warning("%s: skipped %d line(s) that are not metric rows", path, skipped)
    return Metrics(train=[train[s] for s in sorted(train)], evals=[evals[s] for s in sorted(evals)])


def moving_average(values: list[float], window: int) -> list[float]:
    """Centered moving average over ``window`` points (rounded down to odd); NaN/inf skipped.

    Centered so the smoothed curve does not lag behind a falling loss the way a trailing mean
    (or an exponential average) does; near both ends the window shrinks symmetrically, so the
    curve stays on a trend there instead of being pulled towards the middle of the run.
    """
    half = (window - 1) // 2
    n_values = len(values)
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    counts = [1 if math.isfinite(v) else 0 for v in values]
    csum = [0.0]
    ccount = [0]
    for v, c in zip(finite, counts):
        csum.append(csum[-1] + v)
        ccount.append(ccount[-1] + c)
    out: list[float] = []
    for i in range(n_values):
        h = min(half, i, n_values - 1 - i)
        lo, hi = i - h, i + h + 1
        n = ccount[hi] - ccount[lo]
        out.append((csum[hi] - csum[lo]) / n if n else float("nan"))
    return out


# --------------------------------------------------------------------------- charts

Chart = Callable[[Any, Metrics, int], None]


def _style(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _chart_loss(ax: Any, m: Metrics, window: int) -> None:
    steps, loss = m.series("loss")
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
    ax.plot(steps, moving_average(loss, window), color="tab:blue", linewidth=1.8,
            label=f"train loss (centered average, {window} steps)")
    vsteps, vloss = m.series("val_loss", "evals")
    if vsteps:
        ax.plot(vsteps, vloss, color="tab:orange", marker="o", markersize=3, linewidth=1.5, label="val loss")
    _style(ax, "Loss", "cross-entropy loss (nats/token)")
    ax.legend(loc="upper right", fontsize="small")


def _chart_lr(ax: Any, m: Metrics, window: int) -> None:
    steps, lr = m.series("lr")
    ax.plot(steps, lr, color="tab:green")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _style(ax, "Learning rate", "learning rate")


def _chart_throughput(ax: Any, m: Metrics, window: int) -> None:
    steps, tps = m.series("tokens_per_sec")
    ax.plot(steps, tps, color="tab:purple", alpha=0.3, linewidth=0.8, label="tokens/s")
    ax.plot(steps, moving_average(tps, window), color="tab:purple", linewidth=1.8,
            label=f"centered average ({window} steps)")
    ax.set_ylim(bottom=0)
    _style(ax, "Throughput", "tokens per second (all ranks)")
    ax.legend(loc="lower right", fontsize="small")


def _chart_grad_norm(ax: Any, m: Metrics, window: int) -> None:
    steps, gn = m.series("grad_norm")
    ax.plot(steps, gn, color="tab:red", alpha=0.4, linewidth=0.8, label="grad norm (before clipping)")
    ax.plot(steps, moving_average(gn, window), color="tab:red", linewidth=1.8,
            label=f"centered average ({window} steps)")
    if gn and all(v > 0 for v in gn if math.isfinite(v)):
        ax.set_yscale("log")
    _style(ax, "Gradient norm", "global L2 norm")
    ax.legend(loc="upper right", fontsize="small")


def _chart_accuracy(ax: Any, m: Metrics, window: int) -> None:
    steps, accuracy = m.series("val_accuracy", "evals")
    ax.plot(steps, [100.0 * v for v in accuracy], color="tab:orange", marker="o", markersize=3)  # logged as a fraction
    ax.set_ylim(bottom=0)
    _style(ax, "Validation next-token accuracy", "top-1 accuracy (%)")


def _chart_mfu(ax: Any, m: Metrics, window: int) -> None:
    steps, mfu = m.series("mfu")
    pct = [100.0 * v for v in mfu]  # logged as a fraction (0.38 = 38 %)
    ax.plot(steps, pct, color="tab:brown")
    ax.set_ylim(bottom=0)
    _style(ax, "Model FLOPs utilization", "MFU (% of peak)")


def _chart_memory(ax: Any, m: Metrics, window: int) -> None:
    for key, label, color in (("mem_allocated_mb", "allocated", "tab:cyan"),
                              ("mem_reserved_mb", "reserved", "tab:blue"),
                              ("mem_rss_mb", "process RSS", "tab:gray")):
        steps, mb = m.series(key)
        if steps:
            ax.plot(steps, mb, color=color, label=label)
    ax.set_ylim(bottom=0)
    _style(ax, "Memory", "MB")
    ax.legend(loc="lower right", fontsize="small")


# (file name, chart, metric that must be present); the first four are always drawn.
CHARTS: list[tuple[str, Chart, str | None]] = [
    ("loss.png", _chart_loss, None),
    ("learning_rate.png", _chart_lr, None),
    ("throughput.png", _chart_throughput, None),
    ("grad_norm.png", _chart_grad_norm, None),
    ("val_accuracy.png", _chart_accuracy, "val_accuracy"),
    ("mfu.png", _chart_mfu, "mfu"),
    ("memory.png", _chart_memory, "mem_*"),
]


def _present(m: Metrics, need: str | None) -> bool:
    if need is None:
        return True
    if need == "mem_*":
        return any(m.has(k) for k in ("mem_allocated_mb", "mem_reserved_mb", "mem_rss_mb"))
    return m.has(need) or m.has(need, "evals")


def _save_atomic(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    # Not fsynced (durable=False): charts are regenerated every viz_freq steps, and an fsync in
    # the training loop could wait for a checkpoint's data being written in the background.
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), durable=False)


def write_plots(log_dir: Path, out_dir: Path | None = None, window: int = 50) -> list[Path]:
    """Write the charts of ``log_dir/metrics.jsonl`` as PNGs; returns the files written.

    ``out_dir`` defaults to ``log_dir/plots``. Raises UserError when there is nothing to plot.
    """
    if window < 1:
        raise UserError(f"--window must be at least 1, got {window}")
    log_dir = Path(log_dir)
    metrics = read_metrics(log_dir / METRICS_FILE)
    if not metrics.train:
        raise UserError(f"{log_dir / METRICS_FILE} has no training rows yet (rows with \"step\" and \"loss\")")
    from matplotlib.figure import Figure  # imported late: a bad input fails fast

    out = Path(out_dir) if out_dir is not None else log_dir / PLOTS_SUBDIR
    out.mkdir(parents=True, exist_ok=True)

    charts = [(name, chart) for name, chart, need in CHARTS if _present(metrics, need)]
    written: list[Path] = []
    for name, chart in charts:
        fig = Figure(figsize=(8, 5), layout="constrained")
        chart(fig.add_subplot(1, 1, 1), metrics, window)
        _save_atomic(fig, out / name)
        written.append(out / name)

    rows = math.ceil(len(charts) / 2)
    fig = Figure(figsize=(14, 4.5 * rows), layout="constrained")
    last = metrics.train[-1]
    loss = last.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else str(loss)
    fig.suptitle(f"Training progress at step {last['step']} (loss {loss_text})")
    for i, (_, chart) in enumerate(charts):
        chart(fig.add_subplot(rows, 2, i + 1), metrics, window)
    _save_atomic(fig, out / OVERVIEW_FILE)
    written.append(out / OVERVIEW_FILE)
    log.debug("wrote %d plots to %s", len(written), out)
    return written
