#!/usr/bin/env bash
# List checkpoints with step, epoch, val loss, time, size and validity, from their sidecars.
#
#   shell/list_checkpoints.sh [DIR] [--verify]
#
# DIR defaults to <repo>/checkpoints. Reads NAME.json next to each NAME.pt with the Python
# standard library only (no torch), so it is fast on a directory of large files. A file whose
# size differs from its sidecar's, a missing or unreadable sidecar, or (with --verify, which
# reads every file) a sha256 mismatch is flagged. Exit status: 0 all valid, 1 problems found,
# 2 bad arguments or no such directory.
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
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

exec "$PYTHON" - "$DIR" "$VERIFY" <<'PY'
import datetime
import hashlib
import json
import os
import re
import sys

directory, verify = sys.argv[1], sys.argv[2] == "1"
NAME_ORDER = {"best.pt": 1, "latest.pt": 2, "final.pt": 3}  # after step_/epoch_ files of a step


def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def when(sidecar, st):
    text = sidecar.get("written_at") if isinstance(sidecar, dict) else None
    if isinstance(text, str):
        try:
            t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if t.tzinfo is not None:
                t = t.astimezone()
            return t.strftime("%Y-%m-%d %H:%M:%S")
        except ValueError:
            pass
    if st is not None:
        return datetime.datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%d %H:%M:%S") + " (mtime)"
    return "-"


def check(name):
    """One row: name, sidecar, stat, problem ((short, detail), None when valid)."""
    pt = os.path.join(directory, name)
    js = pt[:-3] + ".json"
    st = os.stat(pt) if os.path.exists(pt) else None
    sidecar, problem = None, None
    if not os.path.exists(js):
        problem = ("NO SIDECAR", "no sidecar, cannot be validated (an interrupted save, or not a checkpoint)")
    else:
        try:
            with open(js, encoding="utf-8") as f:
                sidecar = json.load(f)
            if not isinstance(sidecar, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            sidecar, problem = None, ("BAD SIDECAR", f"sidecar unreadable ({type(err).__name__}: {str(err)[:80]})")
    if st is None:
        problem = ("MISSING FILE", f"sidecar {os.path.basename(js)} but no {name}")
    elif sidecar is not None and problem is None:
        size, digest = sidecar.get("size"), sidecar.get("sha256")
        if sidecar.get("file") not in (None, name):
            problem = ("BAD SIDECAR", f"sidecar describes {sidecar.get('file')}")
        elif not isinstance(size, int):
            problem = ("BAD SIDECAR", "sidecar has no size")
        elif st.st_size != size:
            problem = ("CORRUPT (size)", f"{st.st_size} bytes but the sidecar says {size} (truncated or overwritten)")
        elif verify:
            if not isinstance(digest, str):
                problem = ("BAD SIDECAR", "sidecar has no sha256")
            elif sha256_of(pt) != digest.lower():
                problem = ("CORRUPT (sha256)", "content differs from the sidecar's sha256 (damaged on disk)")
    return {"name": name, "sidecar": sidecar or {}, "stat": st, "problem": problem}


def num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


entries = sorted(os.listdir(directory))
names = [n for n in entries if n.endswith(".pt") and not n.startswith(".")]
orphans = [n[:-5] + ".pt" for n in entries
           if n.endswith(".json") and not n.startswith(".") and n[:-5] + ".pt" not in names
           and re.match(r"^(latest|best|final|step_\d+|epoch_\d+)\.json$", n)]
temporary = [n for n in entries if "tmp" in n or n.endswith((".partial", ".incomplete"))]
rows = [check(n) for n in names + orphans]
rows.sort(key=lambda r: (num(r["sidecar"].get("step")) if num(r["sidecar"].get("step")) is not None else -1,
                         NAME_ORDER.get(r["name"], 0), r["name"]))

print(f"Checkpoints in {os.path.abspath(directory)}" + ("  (sha256 verified)" if verify else ""))
if not rows:
    print("  none yet")

# Marks: latest.pt and best.pt when valid, else the valid file with the highest step / lowest val loss.
valid = [r for r in rows if r["problem"] is None]
marks = {}
latest = next((r for r in valid if r["name"] == "latest.pt"), None) or max(
    (r for r in valid if num(r["sidecar"].get("step")) is not None),
    key=lambda r: r["sidecar"]["step"], default=None)
with_loss = [r for r in valid if num(r["sidecar"].get("val_loss")) is not None]
best = next((r for r in with_loss if r["name"] == "best.pt"), None) or min(
    with_loss, key=lambda r: r["sidecar"]["val_loss"], default=None)
if latest is not None:
    marks.setdefault(latest["name"], []).append("<- latest")
if best is not None:
    marks.setdefault(best["name"], []).append("<- best")

# Hard links (the checkpointer may link latest.pt to a step file instead of copying it).
by_inode = {}
for r in rows:
    if r["stat"] is not None:
        by_inode.setdefault((r["stat"].st_dev, r["stat"].st_ino), []).append(r["name"])

table = [("NAME", "STEP", "EPOCH", "VAL_LOSS", "WRITTEN", "SIZE", "STATUS", "NOTE")]
for r in rows:
    sc, st = r["sidecar"], r["stat"]
    step, epoch, vl = num(sc.get("step")), num(sc.get("epoch")), num(sc.get("val_loss"))
    notes = list(marks.get(r["name"], []))
    if st is not None:
        twins = [n for n in by_inode[(st.st_dev, st.st_ino)] if n != r["name"]]
        if twins:
            notes.append("same file as " + ", ".join(twins))
    status = r["problem"][0] if r["problem"] else ("ok (sha256)" if verify else "ok")
    table.append((r["name"], "-" if step is None else str(step), "-" if epoch is None else str(epoch),
                  "-" if vl is None else f"{vl:.4f}", when(sc, st), "-" if st is None else human(st.st_size),
                  status, "  ".join(notes)))
if rows:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {1, 2, 3, 5}
    for row in table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells).rstrip())

# Disk use as du counts it: allocated blocks, each hard-linked file once.
seen, used = set(), 0
for root, dirs, files in os.walk(directory):
    for n in [os.curdir] + dirs + files if root == directory else dirs + files:
        st = os.lstat(os.path.join(root, n))
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            used += getattr(st, "st_blocks", 0) * 512 or st.st_size
print(f"Total disk use: {human(used)} (like du: hard-linked files counted once)")
if temporary:
    print(f"Temporary or in-progress files (an interrupted or running save): {', '.join(temporary)}")
problems = [r for r in rows if r["problem"] is not None]
if problems:
    print(f"{len(problems)} problem(s):")
    for r in problems:
        print(f"  {r['name']}: {r['problem'][1]}")
    if not verify:
        print("Sizes were checked; run with --verify to also compare sha256 (reads every file).")
    sys.exit(1)
PY
