#!/usr/bin/env bash
# Resume the last training run from its newest valid checkpoint.
#
#   bash shell/resume_training.sh [--fp8] [--resume latest|best|auto|PATH] [trainer flags ...]
#
# Works from any directory. Runs `torchrun --standalone --nproc_per_node=N` with one process per
# GPU (N from `nvidia-smi -L`; 1 without GPUs; NPROC=N overrides) on src/train_improved.py, or on
# src/train_fp8.py with --fp8 (whose default checkpoint directory is ./checkpoints_fp8). Every other
# flag goes to the trainer after `--resume latest`; a --resume of your own replaces that. The
# checkpoint directory is the trainer's default unless you pass --checkpoint_dir; the run's own
# configuration comes from the checkpoint (flags you add override it).
#
# Environment: NPROC (processes on this node), TORCHRUN (launcher, default .venv/bin/torchrun,
# else torchrun on PATH), TORCHRUN_ARGS (replaces --standalone, e.g. for several nodes:
# "--nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=host:29500"), DRY_RUN=1 (print, don't run).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

script="src/train_improved.py"
resume="latest"
passthrough=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --fp8) script="src/train_fp8.py" ;;
    --resume)
      if [ "$#" -lt 2 ]; then
        echo "resume_training.sh: error: --resume needs a value (latest, best, auto or a path)" >&2
        exit 2
      fi
      resume="$2"
      shift ;;
    --resume=*) resume="${1#--resume=}" ;;
    -h|--help) usage; exit 0 ;;
    *) passthrough+=("$1") ;;
  esac
  shift
done

if [ -z "${NPROC:-}" ]; then
  # grep -c prints 0 (and fails) when nvidia-smi is missing or lists no GPU.
  NPROC="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
  if ! [ "$NPROC" -gt 0 ] 2>/dev/null; then
    NPROC=1
  fi
fi
if ! [ "$NPROC" -gt 0 ] 2>/dev/null; then
  echo "resume_training.sh: error: NPROC must be a positive number, got '$NPROC'" >&2
  exit 2
fi

if [ -n "${TORCHRUN:-}" ]; then
  launcher="$TORCHRUN"
elif [ -x "$REPO_ROOT/.venv/bin/torchrun" ]; then
  launcher="$REPO_ROOT/.venv/bin/torchrun"
elif command -v torchrun >/dev/null 2>&1; then
  launcher="$(command -v torchrun)"
else
  echo "resume_training.sh: error: torchrun not found; run 'make setup' or activate your environment" >&2
  exit 2
fi

# shellcheck disable=SC2206  # TORCHRUN_ARGS is deliberately split into words
launch_args=(${TORCHRUN_ARGS:---standalone})
cmd=("$launcher" "${launch_args[@]}" "--nproc_per_node=$NPROC" "$script" --resume "$resume")
if [ "${#passthrough[@]}" -gt 0 ]; then
  cmd+=("${passthrough[@]}")
fi

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
if [ "${DRY_RUN:-0}" = "1" ]; then
  exit 0
fi
exec "${cmd[@]}"
