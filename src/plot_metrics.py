"""Draw PNG charts of a run from LOG_DIR/metrics.jsonl.

    python src/plot_metrics.py LOG_DIR [--out DIR] [--window N]

Writes loss.png (train loss, its moving average, val loss), learning_rate.png, throughput.png,
grad_norm.png, val_accuracy.png, mfu.png and memory.png when the run logged them, and
training_latest.png with all of them in one grid. Default output directory: LOG_DIR/plots. Safe to
run while training writes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run from any directory

from common.background_charts import die_with_parent_if_asked  # noqa: E402
from common.errors import run_cli  # noqa: E402
from common.plots import write_plots  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="PNG charts from a run's metrics.jsonl")
    parser.add_argument("log_dir", type=Path, help="the run's --log_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default LOG_DIR/plots)")
    parser.add_argument("--window", type=int, default=50, help="moving-average window in steps (default 50)")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    die_with_parent_if_asked()  # when the trainer started this process to draw its charts
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for path in write_plots(args.log_dir, args.out, args.window):
        print(path)
    return 0


if __name__ == "__main__":
    run_cli(main)
