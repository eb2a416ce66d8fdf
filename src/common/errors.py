"""User-facing failures: one clear line on stderr, never a traceback.

A user's mistake exits with status 2; a run that cannot go on (NaN loss, failed write) with 1.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing data, nothing to resume).

    The message is one line that names the problem and the fix.
    """


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "error"


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point, turning UserError into one line and exit status 2.

    Under torchrun every rank hits the same mistake; only rank 0 prints it so the user sees
    the line once (torchrun then adds its own summary of the failed workers).
    """
    try:
        code = main()
    except UserError as err:
        if _is_main_rank():
            print(f"{_prog()}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except RunFailed as err:
        if _is_main_rank():
            print(f"{_prog()}: stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_RUN_FAILED)
    sys.exit(code or 0)


class RunFailed(Exception):
    """The run cannot go on (NaN loss, a failed checkpoint write): one line, exit status 1.

    Nothing poisoned or partial is saved on the way out.
    """


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut at `limit` characters (a library's multi-line
    error inside a UserError's one line)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < limit else text[:limit - 3] + "..."
