"""Stand-in for the scontrol commands shell/slurm_train.sbatch uses:

    scontrol show hostnames [LIST]   one host per line (LIST defaults to SLURM_JOB_NODELIST)
    scontrol show job ID             the job's record, with Command= (the submitted file) and WorkDir=
    scontrol requeue ID              recorded; sbatch.py runs the job again once it has ended

Anything else fails, as an unknown command would.
"""
from __future__ import annotations

import os
import sys

from standin import expand_hostlist, fail, load_job, record

PROG = "scontrol"


def main(argv: list[str]) -> int:
    record(PROG, argv=argv)
    if argv[:2] == ["show", "hostnames"] and len(argv) <= 3:
        spec = argv[2] if len(argv) == 3 else os.environ.get("SLURM_JOB_NODELIST", "")
        print("\n".join(expand_hostlist(spec)))
        return 0
    if (argv[:2] == ["show", "job"] and len(argv) == 3) or (argv[:1] == ["requeue"] and len(argv) == 2):
        job_id = argv[-1]
        job = load_job(job_id)
        if job is None:
            fail(PROG, "Invalid job id specified")
        if argv[0] == "show":
            print(f"JobId={job_id} JobName={job['name']}\n   JobState=RUNNING Reason=None\n"
                  f"   Command={job['command']}\n   WorkDir={job['workdir']}")
        return 0
    fail(PROG, f"the stand-in does not emulate 'scontrol {' '.join(argv)}'")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
