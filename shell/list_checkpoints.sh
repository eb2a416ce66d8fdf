#!/usr/bin/env bash
# List checkpoints with step, epoch, val loss, time, size and validity, from their sidecars.
#
#   shell/list_checkpoints.sh [DIR] [--verify]
#
# DIR defaults to <repo>/checkpoints. Reads NAME.json next to each NAME.pt (NAME.dcp.json next to
# each sharded NAME.dcp directory of an fsdp run) with the Python standard library only (no
# torch), so it is fast on a directory of large files. A file whose size differs from its
# sidecar's, a missing part, a missing or unreadable sidecar, or (with --verify, which reads
# every file) a sha256 mismatch is flagged. Exit status: 0 all valid, 1 problems found,
# 2 bad arguments or no such directory. Runs `python3 -m common.checkpoint` from src/.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="$(basename "$0")"

die() {
    echo "$PROG: error: $*" >&2
    exit 2
}

DIR=""
VERIFY=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --verify) VERIFY=1 ;;
        -*) die "unknown option $arg (usage: $PROG [DIR] [--verify])" ;;
        *) [ -z "$DIR" ] || die "one directory at a time (usage: $PROG [DIR] [--verify])"; DIR="$arg" ;;
    esac
done
DIR="${DIR:-$REPO_ROOT/checkpoints}"
[ -d "$DIR" ] || die "no checkpoint directory $DIR (train first, or pass the run's --checkpoint_dir)"

PYTHON=""
for candidate in python3 "$REPO_ROOT/.venv/bin/python" python; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
done
[ -n "$PYTHON" ] || die "python3 not found (needed to read the JSON sidecars)"

# The lister is src/common/checkpoint.py itself: standard library only, no torch.
export PYTHONPATH="$REPO_ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
ARGS=("$DIR")
[ "$VERIFY" = 0 ] || ARGS+=(--verify)  # an array never empty: "${A[@]}" of an empty one fails set -u in bash 3
exec "$PYTHON" -m common.checkpoint "${ARGS[@]}"
