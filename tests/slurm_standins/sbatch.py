"""Stand-in for `sbatch --wait [OPTIONS] SCRIPT [ARGS ...]`: the job runs here and now.

Like the real sbatch: the options come from the script's #SBATCH lines (up to its first command)
and from the command line, which wins; the job runs a copy of the script from a spool directory,
in the submit directory, with the submitting environment plus the SLURM_* variables of an
allocation, stdin from /dev/null, stdout and stderr into --output (%j job id, %x job name,
default slurm-%j.out) opened in --open-mode (append, or truncate: the default). The allocation is
--nodes loopback hosts of this machine, "127.0.0.[1-N]", with --gpus-per-node GPUs each (nominal).

Like slurmctld after a requeue: when `scontrol requeue ID` was called while the job ran (see
scontrol.py), the job runs again under the same id with SLURM_RESTART_COUNT raised, at most
MAX_REQUEUES times. The exit status is the last run's, as with `sbatch --wait`.

Not emulated: a queue (--wait is required), the time limit, and --signal: the test sends the
warning itself, to the batch shell named by the "job_start" record.

Environment: SLURM_STANDIN_DIR (state, see standin.py), SLURM_STANDIN_JOB_ID (default 1000).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from standin import expand_hostlist, fail, job_path, read_calls, record

PROG = "sbatch"
MAX_REQUEUES = 3
VALUE_OPTIONS = {"job-name": "J", "nodes": "N", "ntasks-per-node": None, "gpus-per-node": None,
                 "cpus-per-task": "c", "time": "t", "signal": None, "output": "o", "open-mode": None}
FLAG_OPTIONS = {"requeue", "wait"}
SHORT = {short: name for name, short in VALUE_OPTIONS.items() if short}


def parse_options(tokens: list[str], *, stop_at_script: bool) -> tuple[dict[str, str], list[str]]:
    """Options as {long name: value} ("" for a flag), and what follows them (script and args)."""
    options: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            name, has_value, value = token[2:].partition("=")
            if name in FLAG_OPTIONS:
                options[name] = ""
            elif name in VALUE_OPTIONS:
                if not has_value:
                    i += 1
                    value = tokens[i] if i < len(tokens) else fail(PROG, f"option --{name} needs a value")
                options[name] = value
            else:
                fail(PROG, f"unrecognized option '{token}'")
        elif token.startswith("-") and len(token) > 1:
            name = SHORT.get(token[1]) or fail(PROG, f"invalid option -- '{token[1]}'")
            value = token[2:]
            if not value:
                i += 1
                value = tokens[i] if i < len(tokens) else fail(PROG, f"option -{token[1]} needs a value")
            options[name] = value
        elif stop_at_script:
            return options, tokens[i:]
        else:
            fail(PROG, f"not an option in an #SBATCH line: '{token}'")
        i += 1
    return options, []


def script_options(script: Path) -> dict[str, str]:
    """The #SBATCH lines before the first command (comment and blank lines may come between)."""
    tokens: list[str] = []
    for line in script.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            tokens += shlex.split(line[len("#SBATCH"):], comments=True)
        elif line.strip() and not line.lstrip().startswith("#"):
            break
    return parse_options(tokens, stop_at_script=False)[0]


def output_path(pattern: str, job_id: str, name: str, workdir: Path) -> Path:
    out, i = "", 0
    while i < len(pattern):
        if pattern[i] == "%" and i + 1 < len(pattern):
            key = pattern[i + 1]
            out += {"j": job_id, "x": name, "%": "%"}.get(key) or fail(PROG, f"--output: %{key} not emulated")
            i += 2
        else:
            out += pattern[i]
            i += 1
    return workdir / out


def job_env(options: dict[str, str], job_id: str, name: str, workdir: Path, restarts: int) -> dict[str, str]:
    nodes = int(options.get("nodes", "1"))
    nodelist = "127.0.0.1" if nodes == 1 else f"127.0.0.[1-{nodes}]"
    env = dict(os.environ)
    env.update({"SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": name,
                "SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist, "SLURM_NNODES": str(nodes),
                "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_SUBMIT_DIR": str(workdir),
                "SLURM_SUBMIT_HOST": socket.gethostname(), "SLURM_NODEID": "0",
                "SLURMD_NODENAME": expand_hostlist(nodelist)[0], "SLURM_CLUSTER_NAME": "standin"})
    if "ntasks-per-node" in options:
        env["SLURM_NTASKS_PER_NODE"] = options["ntasks-per-node"]
        env["SLURM_NTASKS"] = str(nodes * int(options["ntasks-per-node"]))
    if "cpus-per-task" in options:
        env["SLURM_CPUS_PER_TASK"] = options["cpus-per-task"]
    if "gpus-per-node" in options:
        env["SLURM_GPUS_PER_NODE"] = options["gpus-per-node"]
        env["SLURM_GPUS_ON_NODE"] = options["gpus-per-node"].rpartition(":")[2]
    if restarts:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    return env


def requeues(job_id: str) -> int:
    return sum(1 for c in read_calls() if c["prog"] == "scontrol" and c.get("argv") == ["requeue", job_id])


def main(argv: list[str]) -> int:
    record(PROG, argv=argv, cwd=os.getcwd())
    command_line, rest = parse_options(argv, stop_at_script=True)
    if not rest:
        fail(PROG, "no batch script given")
    if "wait" not in command_line:
        fail(PROG, "the stand-in has no queue: use --wait")
    script = Path(rest[0]).resolve()
    options = {**script_options(script), **command_line}
    job_id = os.environ.get("SLURM_STANDIN_JOB_ID", "1000")
    name = options.get("job-name", script.name)
    workdir = Path.cwd()
    spool = Path(os.environ["SLURM_STANDIN_DIR"]) / "spool" / f"job{job_id}"
    spool.mkdir(parents=True, exist_ok=True)
    copy = spool / "slurm_script"
    shutil.copyfile(script, copy)
    copy.chmod(0o755)
    job_path(job_id).parent.mkdir(parents=True, exist_ok=True)
    job_path(job_id).write_text(json.dumps({"command": str(script), "name": name, "workdir": str(workdir)}))
    print(f"Submitted batch job {job_id}", flush=True)

    output = output_path(options.get("output", "slurm-%j.out"), job_id, name, workdir)
    flags = os.O_CREAT | os.O_WRONLY | os.O_APPEND | (0 if options.get("open-mode") == "append" else os.O_TRUNC)
    restarts = 0
    while True:
        fd = os.open(output, flags, 0o644)
        try:
            job = subprocess.Popen([str(copy), *rest[1:]], cwd=workdir, stdin=subprocess.DEVNULL, stdout=fd,
                                   stderr=fd, env=job_env(options, job_id, name, workdir, restarts),
                                   start_new_session=True)
        finally:
            os.close(fd)
        record(PROG, event="job_start", job_id=job_id, batch_pid=job.pid, restart_count=restarts, options=options,
               args=rest[1:], output=str(output))
        status = job.wait()
        status = status if status >= 0 else 128 - status
        record(PROG, event="job_end", job_id=job_id, restart_count=restarts, exit_code=status)
        if requeues(job_id) <= restarts:
            return status
        if restarts == MAX_REQUEUES:
            fail(PROG, f"job {job_id} requeued itself {MAX_REQUEUES + 1} times: giving up")
        restarts += 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
