"""Which run this is -- fresh, or the continuation of a checkpoint -- decided before anything is built.

`resolve_run` turns the command line into a `RunPlan`: the config the run continues with and the
checkpoint it starts from. Rank 0 picks and validates the checkpoint; every rank then loads the
same file. A resumed run continues the checkpoint's own config; the fields the user sets now (in
--config or as flags) win, a different model shape is refused, and the machine-specific fields
and the fault drill always come from the new command.

When torchrun restarts the workers (`--max-restarts N`: TORCHELASTIC_RESTART_COUNT > 0), the run
resumes from the newest valid checkpoint by itself, as `--resume auto` would, and says so; a
fault drill is not repeated after a restart.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.checkpoint import Checkpointer, validate_checkpoint
from common.config import C, config_to_dict, from_dict
from common.dist import DistContext, rank0_decides
from common.errors import UserError

log = logging.getLogger(__name__)

# Always taken from the command that resumes, never from the checkpoint: they describe this
# machine and this invocation, not the run.
NOT_INHERITED = ("resume", "device", "cpu_threads", "inject_fault")


@dataclass
class RunPlan:
    cfg: Any  # TrainConfig or a subclass: the config the run continues with
    checkpoint: dict[str, Any] | None  # the loaded checkpoint to resume, None for a fresh run
    path: Path | None  # where it came from
    verified: bool = False  # its sha256 matched its sidecar: state the suite wrote itself


def restart_count() -> int:
    """How many times torchrun has restarted the workers of this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def resolve_run(cfg: C, explicit: set[str], ctx: DistContext) -> RunPlan:
    restarts = restart_count()
    spec = cfg.resume or ("auto" if restarts else "")
    checkpointer = Checkpointer(cfg.checkpoint_dir, enabled=False)
    chosen, verified = rank0_decides(lambda: _choose(checkpointer, spec), ctx)
    path = Path(chosen) if chosen is not None else None
    if restarts:
        log.warning("elastic restart %d (torchrun --max-restarts): %s", restarts,
                    f"resuming from {path}" if path else "no checkpoint yet, starting from the beginning")
        if cfg.inject_fault:
            log.warning("fault drill %r not repeated after a restart", cfg.inject_fault)
            cfg = dataclasses.replace(cfg, inject_fault="")
    if path is None:
        return RunPlan(cfg, None, None)
    checkpoint = checkpointer.load(path)
    merged, changes = resume_config(checkpoint["config"], cfg, explicit)
    for key, (old, new) in changes.items():
        log.info("resume: %s changed from %r to %r", key, old, new)
    return RunPlan(merged, checkpoint, path, verified)


def _choose(checkpointer: Checkpointer, spec: str) -> tuple[str | None, bool]:
    """The checkpoint to resume (None: start fresh), and whether its sha256 was verified against its
    sidecar (an explicit --resume PATH without one is loaded unverified)."""
    path = checkpointer.choose_resume(spec)
    if path is None:
        return None, False
    return str(path), validate_checkpoint(path, full=False)[0]  # choose_resume hashed it if it has a sidecar


def resume_config(saved: dict[str, Any], cfg: C, explicit: set[str]) -> tuple[C, dict[str, tuple[Any, Any]]]:
    """The config a resumed run continues with, and what differs from the saved one."""
    known = {f.name for f in fields(cfg)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: getattr(cfg, k) for k in set(explicit) | set(NOT_INHERITED)})
    merged = from_dict(type(cfg), values, "the checkpoint's config")
    merged.validate()
    wrong = {k: (saved.get(k), v) for k, v in merged.model_shape().items() if saved.get(k, v) != v}
    if wrong:
        desc = ", ".join(f"{k}={old} in the checkpoint but {new} now" for k, (old, new) in wrong.items())
        raise UserError(f"the checkpoint's model shape differs from the config ({desc}); "
                        "resume with the same model settings or start a fresh --checkpoint_dir")
    changes = {k: (saved[k], v) for k, v in config_to_dict(merged).items()
               if k in saved and saved[k] != v and k not in NOT_INHERITED}
    return merged, changes
