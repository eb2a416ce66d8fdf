#!/usr/bin/env bash
# Start TensorBoard on a run's logs, bound to localhost, and print the SSH tunnel line to paste
# on a laptop.
#
#   shell/start_tensorboard.sh [LOG_DIR] [PORT] [-- extra tensorboard flags]
#
# LOG_DIR defaults to <repo>/logs, PORT to 6006. Works from any directory. TensorBoard runs in the
# foreground: Ctrl+C stops it. Exit status 2: TensorBoard missing, port busy, bad arguments.
# A run's log directory is served through its tensorboard/ folder, so the run is listed under
# its own name; a folder above several runs' log directories is served as it is.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="$(basename "$0")"

die() {  # one line on stderr, exit status 2
    echo "$PROG: error: $*" >&2
    exit 2
}

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

LOG_DIR=""
PORT=""
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        -*) die "unknown option $1 (usage: $PROG [LOG_DIR] [PORT] [-- tensorboard flags])" ;;
        *)
            if [ -z "$LOG_DIR" ]; then LOG_DIR="$1"
            elif [ -z "$PORT" ]; then PORT="$1"
            else die "too many arguments (usage: $PROG [LOG_DIR] [PORT] [-- tensorboard flags])"
            fi ;;
    esac
    shift
done
LOG_DIR="${LOG_DIR:-$REPO_ROOT/logs}"
PORT="${PORT:-6006}"

case "$PORT" in
    ''|*[!0-9]*) die "PORT must be a number between 1024 and 65535, got '$PORT'" ;;
esac
if [ "$PORT" -lt 1024 ] || [ "$PORT" -gt 65535 ]; then
    die "PORT must be a number between 1024 and 65535, got '$PORT'"
fi

# TensorBoard: the repo's virtualenv first, then PATH.
if [ -x "$REPO_ROOT/.venv/bin/tensorboard" ]; then
    TENSORBOARD="$REPO_ROOT/.venv/bin/tensorboard"
elif command -v tensorboard >/dev/null 2>&1; then
    TENSORBOARD="$(command -v tensorboard)"
else
    die "tensorboard not found in $REPO_ROOT/.venv/bin or on PATH; install it: (cd $REPO_ROOT && make setup), or: pip install tensorboard"
fi

# Is the port free on 127.0.0.1? Bind-test it with Python (what TensorBoard itself will do);
# without Python, fall back to bash's /dev/tcp (finds a listener, not every kind of use).
PYTHON=""
for candidate in "$REPO_ROOT/.venv/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
done
port_busy() {
    if [ -n "$PYTHON" ]; then
        ! "$PYTHON" - "$1" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}
if port_busy "$PORT"; then
    die "port $PORT is already in use on 127.0.0.1 (another TensorBoard?); pick another port: $0 ${LOG_DIR} $((PORT + 1))"
fi

if [ ! -d "$LOG_DIR" ]; then
    echo "note: $LOG_DIR does not exist yet; TensorBoard will show the run once training writes there" >&2
    mkdir -p "$LOG_DIR"
fi
LOG_DIR="$(cd "$LOG_DIR" && pwd)"

# The trainer writes LOG_DIR/tensorboard/RUN/ (RUN: --run_name, else the log directory's name) and
# TensorBoard names a run by its folder relative to --logdir: serving LOG_DIR/tensorboard lists it
# as RUN. A LOG_DIR with no tensorboard/ but event files below is a parent of several runs.
SERVE_DIR="$LOG_DIR/tensorboard"
if [ ! -d "$SERVE_DIR" ] && [ -n "$(find "$LOG_DIR" -name 'events.out.tfevents.*' -print -quit 2>/dev/null)" ]; then
    SERVE_DIR="$LOG_DIR"
fi
mkdir -p "$SERVE_DIR"

USER_NAME="${USER:-}"
[ -n "$USER_NAME" ] || USER_NAME="$(id -un)"
HOST_NAME="$(hostname -f 2>/dev/null || true)"
[ -n "$HOST_NAME" ] || HOST_NAME="$(hostname 2>/dev/null || uname -n)"

cat <<EOF
TensorBoard on $SERVE_DIR
  URL on this machine:   http://localhost:$PORT/
  From your laptop, open a tunnel (leave it running), then browse http://localhost:$PORT/ :
    ssh -N -L $PORT:localhost:$PORT $USER_NAME@$HOST_NAME
  (Use the host name or address you normally ssh to if it differs from $HOST_NAME.)
  Ctrl+C here stops TensorBoard.
EOF

exec "$TENSORBOARD" --logdir "$SERVE_DIR" --host 127.0.0.1 --port "$PORT" ${EXTRA[@]+"${EXTRA[@]}"}
