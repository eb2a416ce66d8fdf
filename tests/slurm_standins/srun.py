"""Stand-in for `srun [OPTIONS] COMMAND ...` inside a batch job: one task per node, run here.

Like the real srun in an allocation: --nodes N (default SLURM_NNODES) times --ntasks-per-node T
tasks on the first N hosts of SLURM_JOB_NODELIST, each with the job's environment plus
SLURM_NODEID, SLURM_PROCID, SLURM_LOCALID, SLURMD_NODENAME and SLURM_STEP_*; the exit status is
the highest of the tasks' (128 + N for a task killed by signal N).

Signals, as the real srun handles them: SIGUSR1, SIGUSR2, SIGINT and SIGCONT are forwarded to
every task; SIGTERM, SIGHUP and SIGQUIT make it SIGKILL every task ("forcing job termination").
The real srun has slurmstepd signal every process of each task; this one signals the task
processes alone, so a task (torchrun) must pass a signal on to its own children itself.

SLURM_STANDIN_SRUN_RUN=0 records the tasks as they would start, runs nothing and exits with
SLURM_STANDIN_SRUN_EXIT (default 0): a look at the command without training.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType

from standin import expand_hostlist, fail, record, slurm_env

PROG = "srun"
VALUE_OPTIONS = {"nodes": "N", "ntasks-per-node": None, "cpus-per-task": "c"}
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGCONT)
TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

tasks: list[subprocess.Popen] = []


def on_signal(signum: int, frame: FrameType | None) -> None:
    record(PROG, event="signal", signal=signal.Signals(signum).name)
    for task in tasks:
        if task.poll() is None:
            task.send_signal(signal.SIGKILL if signum in TERMINATING else signum)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, has_value, value = argv[i][2:].partition("=")
        if not argv[i].startswith("--") or name not in VALUE_OPTIONS:
            fail(PROG, f"unrecognized option '{argv[i]}' (the stand-in knows --{', --'.join(VALUE_OPTIONS)})")
        if not has_value:
            i += 1
            value = argv[i] if i < len(argv) else fail(PROG, f"option --{name} needs a value")
        options[name] = value
        i += 1
    if i == len(argv):
        fail(PROG, "no command to run")
    return options, argv[i:]


def main(argv: list[str]) -> int:
    for sig in (*FORWARDED, *TERMINATING):  # first of all, as the real srun: a signal never kills it
        signal.signal(sig, on_signal)
    record(PROG, argv=argv)
    if "SLURM_JOB_ID" not in os.environ:
        fail(PROG, "no job allocation (SLURM_JOB_ID is not set)")
    options, command = parse(argv)
    hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
    nodes = int(options.get("nodes", os.environ.get("SLURM_NNODES", "1")))
    per_node = int(options.get("ntasks-per-node", "1"))
    if nodes > len(hosts):
        fail(PROG, f"{nodes} nodes requested but the allocation has {len(hosts)}")
    run = os.environ.get("SLURM_STANDIN_SRUN_RUN", "1") != "0"
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
            "SLURM_STEP_NODELIST": ",".join(hosts[:nodes])}
    for node in range(nodes):
        for local in range(per_node):
            env = {**os.environ, **step, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node * per_node + local),
                   "SLURM_LOCALID": str(local), "SLURMD_NODENAME": hosts[node]}
            task = subprocess.Popen(command, env=env, start_new_session=True) if run else None
            if task is not None:
                tasks.append(task)
            record(PROG, event="task", node_id=node, host=hosts[node], argv=command, env=slurm_env(env),
                   task_pid=task.pid if task else None)
    if not run:
        return int(os.environ.get("SLURM_STANDIN_SRUN_EXIT", "0"))
    codes = [task.wait() for task in tasks]
    return max(code if code >= 0 else 128 - code for code in codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
