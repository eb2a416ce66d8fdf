"""Helper process for tests/test_dist.py (not a test module itself): under torchrun, every rank
calls `rank0_decides` with a decision that fails on rank 0 in the way named by argv[1], and
writes what it got to OUT/rank_N.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common.dist import destroy, init_distributed, rank0_decides  # noqa: E402
from common.errors import RunFailed, UserError  # noqa: E402


def decide(kind: str) -> str:
    if kind == "oserror":
        raise OSError(5, "Input/output error", "/mnt/ckpt/latest.pt")
    if kind == "usererror":
        raise UserError("no checkpoint to resume in /x; drop --resume")
    return "chosen"


def main() -> int:
    kind, out = sys.argv[1], Path(sys.argv[2])
    ctx = init_distributed("cpu")
    try:
        outcome = {"result": rank0_decides(lambda: decide(kind), ctx)}
    except (RunFailed, UserError) as err:
        outcome = {"raised": type(err).__name__, "message": str(err)}
    (out / f"rank_{ctx.rank}.json").write_text(json.dumps(outcome))
    destroy(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
