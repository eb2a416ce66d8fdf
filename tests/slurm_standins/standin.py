"""What the SLURM stand-ins share (sbatch.py, srun.py, scontrol.py).

SLURM cannot run here. The stand-ins behave like the real commands as far as
shell/slurm_train.sbatch and tests/test_slurm.py use them, and record every call. Their state is
in the directory $SLURM_STANDIN_DIR:

    calls.jsonl               one JSON object per call or event, appended by every stand-in
    jobs/ID.json              what sbatch.py knows of a job: the submitted file, name, work dir
    spool/jobID/slurm_script  the copy of the batch script that runs, as slurmd runs one

Standard library only: the stand-ins run with any python3.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

_BRACKET = re.compile(r"\[([^\]]*)\]")


def state_dir() -> Path:
    return Path(os.environ["SLURM_STANDIN_DIR"])


def record(prog: str, **fields: Any) -> None:
    """Append one JSON line to calls.jsonl (one write on an O_APPEND file: lines of concurrent
    stand-ins never interleave)."""
    line = json.dumps({"prog": prog, "pid": os.getpid(), "time": time.time(), **fields}) + "\n"
    fd = os.open(state_dir() / "calls.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_calls(directory: Path | None = None) -> list[dict[str, Any]]:
    path = (directory or state_dir()) / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def slurm_env(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The SLURM_* variables of an environment (what a record keeps of it)."""
    return {k: v for k, v in env.items() if k.startswith("SLURM")}


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's host list syntax: names separated by commas, each with at most one bracket of
    numbers and ranges, e.g. "node[01-03,7],gpu5" (zero padding kept)."""
    hosts: list[str] = []
    for name in re.findall(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)?", spec):
        match = _BRACKET.search(name)
        if not name:
            continue
        if match is None:
            hosts.append(name)
            continue
        prefix, suffix = name[:match.start()], name[match.end():]
        for part in match.group(1).split(","):
            low, _, high = part.partition("-")
            hosts.extend(f"{prefix}{n:0{len(low)}d}{suffix}" for n in range(int(low), int(high or low) + 1))
    return hosts


def job_path(job_id: str) -> Path:
    return state_dir() / "jobs" / f"{job_id}.json"


def load_job(job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(job_path(job_id).read_text())
    except (OSError, ValueError):
        return None


def fail(prog: str, message: str, status: int = 1) -> None:
    """End like the real command does on a usage error: its name, the message, a status."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    record(prog, event="error", message=message)
    sys.exit(status)
