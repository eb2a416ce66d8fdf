"""Rank-0 logging: log.txt, metrics.jsonl, samples.jsonl, TensorBoard and (optionally) wandb.

Two pieces:

* ``setup_logging`` configures Python's root logger once per process: on the main rank a console
  handler plus ``LOG_DIR/log.txt`` (appended, one timestamped line per record); on the other
  ranks only warnings and errors, prefixed ``[rank N]``.
* ``RunLogger`` writes the machine-readable metrics. Every method is a no-op when ``enabled`` is
  false (ranks other than 0), so the trainer can call it unconditionally.

TensorBoard layout: the events go to ``LOG_DIR/tensorboard/RUN/``, RUN being ``--run_name`` or
else the log directory's name, so TensorBoard (pointed at ``LOG_DIR/tensorboard``, as
shell/start_tensorboard.sh does) lists the run under that name. TensorBoard sorts chart groups by
name, so the tags are chosen to put ``train/*`` first; every chart is a curve (no one-point cards,
no wall clock: TensorBoard's own "wall" axis shows the time).

Resume contract: ``RunLogger(resume_step=k)`` drops the ``metrics.jsonl`` and ``samples.jsonl``
rows after step k (atomic rewrite) and opens TensorBoard with ``purge_step=k + 1`` so the events logged after the
checkpoint by the interrupted run are hidden; the resumed run then logs k+1, k+2, ... and every
step appears exactly once. The wandb run id and the TensorBoard run's folder travel in the
checkpoint (``state_dict()``) so the resumed process continues the same runs.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.fsutil import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"  # one row per text sample: {"step", "prompt", "text"}
TENSORBOARD_SUBDIR = "tensorboard"
PREVIOUS_SUBDIR = "previous"
WANDB_MISSING = "--use_wandb needs wandb: pip install -e '.[wandb]'"
TENSORBOARD_MISSING = "--use_tensorboard needs tensorboard: pip install -e . (or pip install tensorboard)"

# metrics.jsonl key -> TensorBoard / wandb tag. Keys not listed go to "train/<key>". TensorBoard
# orders chart groups by name: "train" < "train_memory" < "train_perf" < "val".
SCALAR_TAGS: dict[str, str] = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train_perf/tokens_per_sec",
    "mfu": "train_perf/mfu",
    "step_time": "train_perf/step_time",
    "mem_allocated_mb": "train_memory/allocated_mb",
    "mem_reserved_mb": "train_memory/reserved_mb",
    "mem_rss_mb": "train_memory/rss_mb",
}
# metrics.jsonl keys kept out of charts: a Unix timestamp is no curve.
UNCHARTED_KEYS = frozenset({"time"})
VAL_LOSS_TAG = "val/loss"
BEST_VAL_LOSS_TAG = "val/best_loss"  # lowest val/loss so far, drawn at each evaluation
# End-of-run metrics of the HParams tab -> the curve whose last point holds the value. The HParams
# tab reads a metric from the scalars of its tag; pointing it at these curves spares one-point
# charts (which TensorBoard would sort before the training curves).
HPARAM_METRIC_TAGS: dict[str, str] = {
    "hparam/best_val_loss": BEST_VAL_LOSS_TAG,
    "hparam/final_val_loss": VAL_LOSS_TAG,
}
DEFAULT_RUN_NAME = "run"
SAMPLE_TAG = "samples"
MAX_WANDB_SAMPLE_ROWS = 200
_HANDLER_MARK = "_llm_pretrain_handler"


# --------------------------------------------------------------------------- plain logging


class _RankFilter(logging.Filter):
    """Adds ``record.rank`` so non-main ranks can prefix their lines."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def _mark(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _HANDLER_MARK, True)
    return handler


def setup_logging(*, is_main: bool, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the root logger for this process and return it.

    Main rank: records at ``level`` and above to stderr, and kept in memory until
    ``log_to_file`` names the run's log directory (known only once the run is resolved: a resumed
    run logs where it did before), so log.txt holds the lines of the start-up too. Other ranks:
    WARNING and above to stderr, prefixed ``[rank N]``. Calling it again replaces the handlers it
    installed before and leaves handlers installed by others (pytest, a notebook) alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()

    console = _mark(logging.StreamHandler(sys.stderr))
    if is_main:
        root.setLevel(level)
        console.setLevel(level)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(console)
        early = _mark(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
        early.setLevel(level)
        root.addHandler(early)
    else:
        root.setLevel(max(level, logging.WARNING))
        console.setLevel(logging.WARNING)
        console.addFilter(_RankFilter(rank))
        console.setFormatter(logging.Formatter("[rank %(rank)d] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(console)

    # Libraries that are chatty at INFO/DEBUG and say nothing a user needs during training.
    for noisy in ("matplotlib", "PIL", "urllib3", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return root


def log_to_file(log_dir: Path) -> None:
    """Append the main rank's records to ``log_dir/log.txt``, the ones kept since start-up first."""
    root = logging.getLogger()
    early = next((h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)
                  and getattr(h, _HANDLER_MARK, False)), None)
    if early is None:  # not the main rank
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = _mark(logging.FileHandler(log_dir / "log.txt", mode="a", encoding="utf-8"))
    file_handler.setLevel(early.level)
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    early.setTarget(file_handler)
    early.flush()
    root.removeHandler(early)
    early.close()
    root.addHandler(file_handler)


# --------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """A metric value as a JSON-friendly Python number/string (tensors and numpy scalars too)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):  # a tensor with more than one element
            pass
    return str(value)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tag_for(key: str) -> str:
    """TensorBoard/wandb tag of a metrics.jsonl key (``loss`` -> ``train/loss``)."""
    if key in SCALAR_TAGS:
        return SCALAR_TAGS[key]
    return key if "/" in key else f"train/{key}"


def tensorboard_run_name(log_dir: Path, run_name: str | None) -> str:
    """The folder under LOG_DIR/tensorboard/ (TensorBoard's name for the run): ``run_name``, else
    the log directory's own name; one path component."""
    name = (run_name or "").strip() or Path(log_dir).resolve().name
    name = name.replace("/", "_").replace(os.sep, "_")
    return name if name not in ("", ".", "..") else DEFAULT_RUN_NAME


def perplexity(loss: float) -> float:
    """exp(loss), inf when it overflows (a diverged run), nan for a nan loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def read_metrics_rows(path: Path, *, on_skip: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a metrics.jsonl (JSON objects, one a line), in file order.

    Blank lines are ignored. A line that is not JSON, or JSON but not an object (a crash
    mid-write leaves a truncated last line), is skipped and passed to ``on_skip`` when given.
    """
    with Path(path).open("r", encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                yield row
            elif on_skip is not None:
                on_skip(line)


def truncate_metrics(path: Path, keep_through_step: int) -> int:
    """Atomically rewrite ``path`` keeping rows with ``step <= keep_through_step``.

    Returns the number of rows dropped. Unparseable lines are dropped too.
    """
    if not path.exists():
        return 0
    def warn(_line: str) -> None:
        log.warning("%s: skipping a line that is not a JSON object (interrupted write?)", path)

    kept: list[str] = []
    total = 0
    for row in read_metrics_rows(path, on_skip=warn):
        total += 1
        step = row.get("step")
        if isinstance(step, (int, float)) and step <= keep_through_step:
            kept.append(json.dumps(row))
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return total - len(kept)


def best_val_loss(path: Path) -> float:
    """The lowest finite ``val_loss`` of a metrics.jsonl (inf when it holds none)."""
    if not path.exists():
        return math.inf
    losses = (row.get("val_loss") for row in read_metrics_rows(path))
    return min((v for v in losses if _is_number(v) and math.isfinite(v)), default=math.inf)


def _archive_previous_run(log_dir: Path) -> Path | None:
    """Move an earlier run's metrics.jsonl, samples.jsonl and tensorboard/ to LOG_DIR/previous/<time>/.

    Used when a run starts from scratch in a log directory that already holds another run, so
    the new curves do not overlap the old ones and nothing is deleted.
    """
    rows = [log_dir / name for name in (METRICS_FILE, SAMPLES_FILE)
            if (log_dir / name).exists() and (log_dir / name).stat().st_size > 0]
    tb_dir = log_dir / TENSORBOARD_SUBDIR
    has_events = tb_dir.is_dir() and any(tb_dir.rglob("events.out.tfevents.*"))
    if not (rows or has_events):
        return None
    base = log_dir / PREVIOUS_SUBDIR / time.strftime("%Y%m%d-%H%M%S")
    dest, suffix = base, 1
    while dest.exists():
        dest, suffix = base.with_name(f"{base.name}.{suffix}"), suffix + 1
    dest.mkdir(parents=True)
    for path in rows:
        os.replace(path, dest / path.name)
    if has_events:
        os.replace(tb_dir, dest / TENSORBOARD_SUBDIR)
    return dest


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def flatten_hparams(hparams: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Nested dicts -> dotted keys; values TensorBoard's hparams accept (number, bool, string)."""
    flat: dict[str, Any] = {}
    _flatten("", hparams, flat)
    result: dict[str, bool | int | float | str] = {}
    for key, value in flat.items():
        value = _plain(value)
        if isinstance(value, (bool, int, float, str)):
            result[key] = value
        elif value is None:
            result[key] = "None"
        else:  # lists, tuples, paths ...
            result[key] = str(value)
    return result


def unwrap_model(model: Any) -> Any:
    """The user's module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers: the
    project's one unwrap helper (duck-typed, so importing this module needs no torch). Unwrapping
    the objects keeps every parameter name as the model has it."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def _import_summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's writer needs the tensorboard package
        raise UserError(TENSORBOARD_MISSING) from err
    return SummaryWriter


def _import_wandb() -> Any:
    """wandb is an optional extra: imported only when asked for."""
    try:
        import wandb
    except ImportError as err:
        raise UserError(WANDB_MISSING) from err
    return wandb


# --------------------------------------------------------------------------- RunLogger


class RunLogger:
    """metrics.jsonl + TensorBoard + wandb for one training run (rank 0; no-op elsewhere)."""

    def __init__(
        self,
        log_dir: Path,
        *,
        enabled: bool,
        use_tensorboard: bool = False,
        use_wandb: bool = False,
        config: dict | None = None,
        resume_step: int | None = None,
        state: dict | None = None,
        wandb_project: str = "llm-pretrain",
        run_name: str | None = None,
    ) -> None:
        """``run_name`` (``--run_name``) names the wandb run and the TensorBoard run."""
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.metrics_path = self.log_dir / METRICS_FILE
        # A resumed run continues in the folder it started in, whatever it is called now.
        self.tensorboard_run = ((state or {}).get("tensorboard_run")
                                or tensorboard_run_name(self.log_dir, run_name))
        self.tensorboard_dir = self.log_dir / TENSORBOARD_SUBDIR / self.tensorboard_run
        self._best_val_loss = math.inf
        self.samples_path = self.log_dir / SAMPLES_FILE
        self._metrics_file = None
        self._samples_file = None
        self._writer = None  # torch.utils.tensorboard.SummaryWriter
        self._wandb = None  # the wandb module while a run is active
        self._wandb_run = None
        self._wandb_rows: list[list[Any]] = []
        self._last_step = resume_step or 0
        self._closed = False
        if not enabled:
            return

        # Missing optional packages fail here, before any file is touched.
        writer_cls = _import_summary_writer() if use_tensorboard else None
        wandb_module = _import_wandb() if use_wandb else None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            archived = _archive_previous_run(self.log_dir)
            if archived is not None:
                log.warning("log dir %s held an earlier run; moved its metrics and events to %s",
                            self.log_dir, archived)
        else:
            for path in (self.metrics_path, self.samples_path):
                dropped = truncate_metrics(path, resume_step)
                if dropped:
                    log.info("resume at step %d: dropped %d rows of %s logged after it", resume_step, dropped,
                             path.name)
            self._best_val_loss = best_val_loss(self.metrics_path)
        self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        self._samples_file = self.samples_path.open("a", encoding="utf-8")

        if writer_cls is not None:
            self._writer = self._open_tensorboard(writer_cls, resume_step)
        if wandb_module is not None:
            try:
                self._open_wandb(wandb_module, config, state, wandb_project, run_name)
            except BaseException:
                self.close()
                raise

    # -- backends ---------------------------------------------------------------------------

    def _open_tensorboard(self, writer_cls: Any, resume_step: int | None) -> Any:
        # purge_step writes a marker that makes TensorBoard drop events at steps >= k+1 from
        # earlier files: what the interrupted process logged after the checkpoint.
        purge_step = resume_step + 1 if resume_step is not None else None
        writer = writer_cls(log_dir=str(self.tensorboard_dir), purge_step=purge_step, flush_secs=30)
        log.info("TensorBoard events in %s%s", self.tensorboard_dir,
                 f" (continuing after step {resume_step})" if resume_step is not None else "")
        return writer

    def _open_wandb(
        self, wandb: Any, config: dict | None, state: dict | None, project: str, run_name: str | None
    ) -> None:
        run_id = (state or {}).get("wandb_run_id")
        kwargs: dict[str, Any] = {"project": project, "name": run_name, "config": config or {},
                                  "allow_val_change": True}
        if "WANDB_DIR" not in os.environ:
            kwargs["dir"] = str(self.log_dir)
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        try:
            self._wandb_run = wandb.init(**kwargs)
        except Exception as err:  # network, auth: the message names the cause
            raise UserError(
                f"wandb could not start ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "run `wandb login`, or set WANDB_MODE=offline and `wandb sync` later"
            ) from err
        self._wandb = wandb
        log.info("wandb run %s%s (mode %s)", self._wandb_run.id, " resumed" if run_id else "",
                 os.environ.get("WANDB_MODE", "online"))

    def _wandb_call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Call into wandb; a failure turns wandb off with one warning instead of ending training."""
        if self._wandb is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - monitoring must not kill a month-long run
            log.warning("wandb %s failed (%s: %s); wandb logging is off for the rest of this run",
                        what, type(err).__name__, err)
            self._wandb = None

    def _write_row(self, row: dict[str, Any], file: Any = None) -> None:
        """One JSON line to metrics.jsonl (or `file`), flushed at once."""
        file = file or self._metrics_file
        assert file is not None
        file.write(json.dumps(row) + "\n")
        file.flush()

    # -- public API -------------------------------------------------------------------------

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """One optimizer step: a metrics.jsonl row, TensorBoard scalars, a wandb history row.

        Non-finite numbers (the loss of a skipped step) are written as null and charted nowhere.
        """
        if not self.enabled or self._closed:
            return
        values = {k: _finite_or_none(_plain(v)) for k, v in metrics.items() if k != "step"}
        self._write_row({"step": int(step), **values})
        self._last_step = max(self._last_step, int(step))
        scalars = {tag_for(k): v for k, v in values.items() if _is_number(v) and k not in UNCHARTED_KEYS}
        self._scalars(step, scalars)

    def log_event(self, step: int, event: str, fields: dict[str, Any], scalars: dict[str, float]) -> None:
        """Something that happened to the run at `step` (a skipped step, a rollback): a
        metrics.jsonl row ``{"step", "event", ...}`` and its counters as scalars."""
        if not self.enabled or self._closed:
            return
        self._write_row({"step": int(step), "event": event, **{k: _plain(v) for k, v in fields.items()}})
        self._last_step = max(self._last_step, int(step))
        self._scalars(step, scalars)

    def _scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, value, int(step))
        if self._wandb is not None:
            self._wandb_call("log", self._wandb.log, scalars, step=int(step))

    def log_eval(self, step: int, val_loss: float, accuracy: float | None = None,
                 seconds: float | None = None) -> None:
        """One evaluation: validation loss, perplexity and next-token accuracy (a fraction) when given
        (metrics.jsonl keys val_loss, val_perplexity, val_accuracy; tags val/loss, val/perplexity,
        val/accuracy), and in the charts also the best validation loss so far. `seconds`, what the
        evaluation took, goes to metrics.jsonl only (val_seconds): what an evaluation costs a run."""
        if not self.enabled or self._closed:
            return
        val_loss = float(_plain(val_loss))
        values = {"loss": val_loss, "perplexity": perplexity(val_loss)}
        if accuracy is not None:
            values["accuracy"] = float(_plain(accuracy))
        timing = {"val_seconds": float(seconds)} if seconds is not None else {}
        self._write_row({"step": int(step), **{f"val_{k}": v for k, v in values.items()}, **timing})
        self._last_step = max(self._last_step, int(step))
        scalars = {f"val/{k}": v for k, v in values.items()}
        if math.isfinite(val_loss):
            self._best_val_loss = min(self._best_val_loss, val_loss)
        if math.isfinite(self._best_val_loss):
            scalars[BEST_VAL_LOSS_TAG] = self._best_val_loss
        self._scalars(step, scalars)

    def log_sample(self, step: int, text: str, prompt: str = "", seconds: float | None = None) -> None:
        """A generated text sample (the prompt and what the model wrote after it): the log, a
        samples.jsonl row {"step", "prompt", "text"} (plus "seconds", the generation's time, when
        given), TensorBoard's Text tab, a wandb table."""
        if not self.enabled or self._closed:
            return
        log.info("sample at step %d:\n%s", step, text)
        timing = {"seconds": float(seconds)} if seconds is not None else {}
        self._write_row({"step": int(step), "prompt": prompt, "text": text, **timing}, self._samples_file)
        if self._writer is not None:
            # A fenced block keeps the model's whitespace and stops markdown from reflowing it.
            self._writer.add_text(SAMPLE_TAG, f"```\n{text}\n```", int(step))
        if self._wandb is not None:
            self._wandb_rows = (self._wandb_rows + [[int(step), text]])[-MAX_WANDB_SAMPLE_ROWS:]
            table = self._wandb.Table(columns=["step", "text"], data=[list(r) for r in self._wandb_rows])
            self._wandb_call("log", self._wandb.log, {SAMPLE_TAG: table}, step=int(step))

    def log_histograms(self, step: int, model: Any) -> None:
        """Histograms of every parameter (params/NAME) and of its gradient (grads/NAME)."""
        if not self.enabled or self._closed or (self._writer is None and self._wandb is None):
            return
        wandb_hists: dict[str, Any] = {}
        for name, param in unwrap_model(model).named_parameters():  # names as the model has them
            for kind, tensor in (("params", param), ("grads", param.grad)):
                if tensor is None:
                    continue
                values = tensor.detach().float().flatten().cpu()
                finite = values[values.isfinite()]
                if finite.numel() < values.numel():
                    log.warning("step %d: %s/%s has %d non-finite values (left out of the histogram)",
                                step, kind, name, values.numel() - finite.numel())
                if finite.numel() == 0:
                    continue
                if self._writer is not None:
                    self._writer.add_histogram(f"{kind}/{name}", finite, int(step))
                if self._wandb is not None:
                    wandb_hists[f"{kind}/{name}"] = self._wandb.Histogram(finite.numpy(), num_bins=64)
        if wandb_hists and self._wandb is not None:
            self._wandb_call("log", self._wandb.log, wandb_hists, step=int(step))

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        """Hyperparameters with their outcome (e.g. ``{"hparam/best_val_loss": x}``); call once at the end.

        In TensorBoard a metric of HPARAM_METRIC_TAGS is read from the last point of its curve;
        any other metric is written as one point at the last step.
        """
        if not self.enabled or self._closed:
            return
        flat = flatten_hparams(hparams)
        numeric = {k: float(_plain(v)) for k, v in metrics.items() if _is_number(_plain(v))}
        if self._writer is not None:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            # Written into this run's own event file (SummaryWriter.add_hparams would make a new
            # sub-run per call), so the HParams tab shows the run next to its curves.
            exp, ssi, sei = hparams_summary(flat, {HPARAM_METRIC_TAGS.get(k, k): v for k, v in numeric.items()})
            file_writer = self._writer._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
            for tag, value in numeric.items():
                if tag not in HPARAM_METRIC_TAGS:
                    self._writer.add_scalar(tag, value, self._last_step)
        if self._wandb is not None and self._wandb_run is not None:
            run = self._wandb_run
            self._wandb_call("config", run.config.update, flat, allow_val_change=True)
            self._wandb_call("summary", run.summary.update, numeric)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue in the same place (kept in the checkpoint)."""
        return {"wandb_run_id": self._wandb_run.id if self._wandb_run is not None else None,
                "tensorboard_run": self.tensorboard_run}

    def flush(self) -> None:
        """Push everything to disk (TensorBoard events, metrics.jsonl with fsync)."""
        if not self.enabled or self._closed:
            return
        for file in (self._metrics_file, self._samples_file):
            if file is not None:
                file.flush()
                os.fsync(file.fileno())
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if not self.enabled or self._closed:
            return
        self.flush()
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for file in (self._metrics_file, self._samples_file):
            if file is not None:
                file.close()
        self._metrics_file = self._samples_file = None
        if self._wandb is not None and self._wandb_run is not None:
            self._wandb_call("finish", self._wandb_run.finish)
        self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
