"""Helper process for tests/test_signals.py (not a test module itself).

Installs GracefulShutdown, writes a ready file holding its pid, then runs "steps" and at each
boundary takes part in the trainer's per-step agreement (common.stepsync.StepAgreement: under
torchrun a real all_reduce across a gloo group). On a stop it writes a JSON result, lingers
(standing in for a checkpoint save) and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from common.dist import destroy, init_distributed  # noqa: E402
from common.signals import GracefulShutdown  # noqa: E402
from common.stepsync import StepAgreement  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="directory for ready and result files")
    parser.add_argument("--linger", type=float, default=0.0, help="seconds to stay alive after stopping")
    parser.add_argument("--step_time", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))

    ctx = init_distributed("cpu")
    agreement = StepAgreement(ctx)
    zero = torch.zeros(())
    with GracefulShutdown(watch_launcher="TORCHELASTIC_RUN_ID" in os.environ) as shutdown:
        ready = out / f"ready_rank{rank}"
        (out / f"ready_rank{rank}.tmp").write_text(str(os.getpid()))
        os.replace(out / f"ready_rank{rank}.tmp", ready)

        step = 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            step += 1
            time.sleep(args.step_time)  # the "training step"
            if agreement.reduce(zero, zero, stop=shutdown.requested, failed=False).stop.item() > 0:
                shutdown.announce(local=shutdown.requested)
                result = {"rank": rank, "stopped_after": step, "signal": shutdown.signal_name,
                          "received": shutdown.received}
                (out / f"result_rank{rank}.json").write_text(json.dumps(result))
                print(json.dumps(result), flush=True)
                time.sleep(args.linger)  # the "checkpoint save"
                (out / f"exit_rank{rank}.json").write_text(json.dumps({"received": shutdown.received}))
                break
        else:
            print("timeout without a stop signal", file=sys.stderr, flush=True)
            return 3

    destroy(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
