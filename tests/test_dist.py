"""Decisions rank 0 takes for everyone, with a real 2-rank gloo group: whatever rank 0 raises,
every rank raises the same, so none is left waiting in a collective."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from runs import REPO, run

WORKER = REPO / "tests" / "dist_worker.py"


@pytest.mark.parametrize("kind, raised, fragment", [
    ("ok", None, None),
    ("oserror", "RunFailed", "OSError: [Errno 5] Input/output error: '/mnt/ckpt/latest.pt'"),
    ("usererror", "UserError", "no checkpoint to resume in /x; drop --resume"),
])
def test_rank0_decision_reaches_every_rank(tmp_path: Path, kind: str, raised: str | None,
                                           fragment: str | None) -> None:
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                kind, str(tmp_path)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert outcomes[0] == outcomes[1]
    if raised is None:
        assert outcomes[0] == {"result": "chosen"}
    else:
        assert outcomes[0]["raised"] == raised and fragment in outcomes[0]["message"]
