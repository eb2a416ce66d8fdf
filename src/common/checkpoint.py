"""Checkpoints that survive crashes, kill -9, full disks and corrupt files.

Tiers and file names (all in one directory):

    latest.pt            the most recent save (every checkpoint_freq steps, and at shutdown)
    step_NNNNNNNN.pt     rolling history, the newest `keep_rolling` kept
    epoch_NNN.pt         one per finished epoch, the newest `keep_epoch` kept
    best.pt              the lowest validation loss so far
    final.pt             the end of the run

Beside every NAME.pt a sidecar NAME.json repeats step, epoch, val_loss and `meta`, and holds the
file's size and sha256, so listing and validation need no torch.load.

Write protocol (one save, possibly under several names):

1. `torch.save` into a temporary file `.ckpt-tmp-*` in the same directory; the sha256 is computed
   from the bytes as they are written; flush and fsync.
2. For each name: delete the old sidecar NAME.json (and fsync the directory), create a temporary
   hard link to the data (a copy where the file system refuses hard links), `os.replace` it onto
   NAME.pt, fsync the directory, then write NAME.json through a temporary file + `os.replace`
   and fsync the directory again. The bytes are written once; names share one inode.
3. Rotation of rolling and epoch files, only after every new file and sidecar is complete. A
   rotated checkpoint loses its sidecar first, then its data file.

The invariant this keeps at every instant, whatever kills the process: a sidecar exists only
while it describes the complete data file beside it. A data file without a sidecar is treated
as invalid (never loaded by `--resume latest`), so an interrupted write or rotation can make a
checkpoint look invalid but can never make an invalid one look valid. Temporary files start
with `.ckpt-tmp-` and never match a checkpoint name; `prepare()` removes leftovers.

`write_checkpoint(state, path, ...)` is the same protocol for one file outside a Checkpointer
(steps 1 and 2 for a single name, no rotation): src/export_checkpoint.py writes with it.

DCP checkpoints (`--parallel fsdp`, written by common.dcp_checkpoint): the same tiers and
names with `.dcp` in place of `.pt`, each a directory -- every rank's part of the model and
optimizer state (`__R_0.distcp`), DCP's `.metadata` (renamed into place by DCP once every part is
written), `train_state.pt` (everything else: step, config, loader position, every rank's RNG
state..., written by rank 0) and `MANIFEST.sha256` (every other file's sha256, in the format of
`sha256sum -c`). Beside NAME.dcp the sidecar NAME.dcp.json holds the manifest's sha256 and every
file's size. The protocol is the one above with a directory in place of a file: the parts are
written into a temporary directory; each name is a directory of hard links to them, renamed into
place (the old directory moved aside first, as a directory cannot be renamed over another), its
sidecar written last -- the commit marker. Rotation deletes the sidecar first, then renames the
directory aside and removes it.

Asynchronous saves: the caller blocks only while every tensor is copied to CPU memory (the
snapshot); a single background thread writes the snapshot; at most one write is in flight. A
failed background write is raised as CheckpointError by the next `check_failed()`, `wait()`
or `save()`, so the run stops clearly instead of training on without checkpoints.

Choosing what to resume: `Checkpointer.choose_resume(spec)` turns `--resume` (or its absence)
into a validated file or None (start fresh); it never starts fresh over checkpoint data it cannot
use. Fallbacks and rotation rank checkpoints by write time, never by step number, so after a
resume from an earlier step the abandoned run's later steps are neither kept nor picked.

Listing: `python -m common.checkpoint [DIR] [--verify] [--json]` (what shell/list_checkpoints.sh
runs). Importing this module imports no torch: listing and validation work with a bare python3.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RunFailed, UserError, run_cli
from .fsutil import atomic_write_bytes, format_bytes, fsync_dir, sha256_file

if TYPE_CHECKING:  # torch is imported lazily so listing and validation stay fast
    import torch

logger = logging.getLogger(__name__)

SIDECAR_VERSION = 1
TIERS = ("latest", "rolling", "epoch", "best", "final")
# Publication order within one save: names that are usually new come first, `latest` last, so
# a crash between two names leaves the newest checkpoint valid under at least one name.
_PUBLISH_ORDER = ("rolling", "epoch", "final", "best", "latest")
TMP_PREFIX = ".ckpt-tmp-"
_NAME_RE = re.compile(r"^(latest|best|final|step_(\d{8,})|epoch_(\d{3,}))\.(pt|json|dcp|dcp\.json)$")
# Listing order of the names of one step: the tier files first, then these.
_NAME_ORDER = {"best": 1, "latest": 2, "final": 3}
PT_SUFFIX = ".pt"
DCP_SUFFIX = ".dcp"
# Files of a DCP checkpoint directory besides the ranks' parts.
DCP_METADATA = ".metadata"  # DCP's own, renamed into place once every part is written
DCP_TRAIN_STATE = "train_state.pt"
DCP_MANIFEST = "MANIFEST.sha256"
DCP_PART_HASHES = ".sha256-"  # each rank's hashes of its own parts, merged into the manifest
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_EPOCH_RE = re.compile(r"^epoch_(\d{3,})$")
# Errors from os.link that mean "this file system does not do hard links here".
_NO_LINK_ERRNOS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}
# Keys a resume reads from every checkpoint; a file without them (an export, a foreign file) is refused.
RESUME_KEYS = ("model", "optimizer", "step", "config", "data_state", "meta")
# A DCP checkpoint's model and optimizer are in its parts; train_state.pt holds the rest.
DCP_RESUME_KEYS = tuple(k for k in RESUME_KEYS if k not in ("model", "optimizer"))

# Status of a checkpoint name: OK, or what is wrong with it (the lister prints these words).
OK = "ok"
NO_SIDECAR = "NO SIDECAR"
BAD_SIDECAR = "BAD SIDECAR"
CORRUPT_SIZE = "CORRUPT (size)"
CORRUPT_SHA256 = "CORRUPT (sha256)"
MISSING_FILE = "MISSING FILE"
INCOMPLETE = "INCOMPLETE"  # a DCP directory without one of its files
UNREADABLE = "UNREADABLE"


class CheckpointError(RunFailed):
    """A checkpoint write failed (disk full, I/O error, ...): the run must stop clearly."""


@dataclass
class CheckpointInfo:
    """One checkpoint name in a directory, as `Checkpointer.list()` reports it."""

    path: Path
    name: str  # file or directory name, e.g. "latest.pt", "latest.dcp"
    step: int | None
    epoch: int | None
    val_loss: float | None
    size: int
    status: str  # OK, or a problem: NO_SIDECAR, BAD_SIDECAR, CORRUPT_SIZE, ...
    reason: str  # "ok", or why the file is not usable, in words
    written: float  # POSIX time of the write: the sidecar's written_at, else the file's mtime
    written_from: str  # "sidecar" or "mtime"
    meta: dict = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.status == OK


# --------------------------------------------------------------------------------------------
# Reading sidecars and validating, with the standard library only


def sidecar_path(path: Path) -> Path:
    """NAME.pt -> NAME.json; NAME.dcp -> NAME.dcp.json."""
    path = Path(path)
    return path.with_name(path.name + ".json") if path.suffix == DCP_SUFFIX else path.with_suffix(".json")


def _data_name(name: str) -> str:
    """The checkpoint a named file belongs to: its data file or directory name."""
    if name.endswith(DCP_SUFFIX + ".json"):
        return name[: -len(".json")]
    if name.endswith(".json"):
        return name[: -len(".json")] + PT_SUFFIX
    return name


def is_dcp(path: Path) -> bool:
    """A DCP checkpoint directory (by name, or by its files when named explicitly)."""
    path = Path(path)
    return path.suffix == DCP_SUFFIX or (path / DCP_TRAIN_STATE).is_file() and (path / DCP_METADATA).is_file()


def _remove(path: Path) -> None:
    """Delete a checkpoint's data: a file, or a directory renamed aside first so its name goes at
    once (the leftover is a temporary name, removed by `prepare()` if this is cut short)."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f"{TMP_PREFIX}{new_token()}.old-{path.name}")
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        _unlink(path)


def _tree_files(directory: Path) -> list[Path]:
    """The files of a checkpoint directory (no subdirectories are written)."""
    return sorted(p for p in directory.iterdir() if p.is_file())


def _data_size(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file of a checkpoint directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in _tree_files(path))
    return path.stat().st_size


def _file_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of a checkpoint's data: for a directory, of its train_state.pt, which the
    names of one save share as hard links."""
    st = (path / DCP_TRAIN_STATE if path.is_dir() else path).stat()
    return st.st_dev, st.st_ino


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def _read_sidecar(path: Path) -> tuple[dict | None, str, str]:
    """(record, status, reason) of NAME.pt's sidecar; record is None when status is not OK."""
    # Reasons name no file: the caller names it, and one-line summaries group names by reason.
    try:
        text = sidecar_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, NO_SIDECAR, "no sidecar (a save cut short, or a copy without its .json)"
    except (OSError, UnicodeDecodeError) as err:
        return None, BAD_SIDECAR, f"sidecar unreadable: {getattr(err, 'strerror', None) or err}"
    try:
        record = json.loads(text)
    except ValueError as err:
        return None, BAD_SIDECAR, f"sidecar is not valid JSON ({err})"
    if not isinstance(record, dict):
        return None, BAD_SIDECAR, "sidecar is not a JSON object"
    return record, OK, "ok"


def _hash_once(path: Path, hashes: dict[tuple[int, ...], str] | None) -> str:
    """sha256 of a file, remembered by (device, inode, size, mtime): hard links are read once."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    sha = hashes.get(key) if hashes is not None else None
    if sha is None:
        sha = sha256_file(path)
        if hashes is not None:
            hashes[key] = sha
    return sha


def read_manifest(path: Path) -> dict[str, str]:
    """{file: sha256} of a `sha256sum`-format manifest; ValueError for a malformed line."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        sha, sep, name = line.partition("  ")
        if not sep or len(sha) != 64 or not name or "/" in name:
            raise ValueError(f"malformed line {line[:80]!r}")
        out[name] = sha.lower()
    return out


def manifest_text(hashes: dict[str, str]) -> str:
    """The manifest of {file: sha256}: `sha256sum -c MANIFEST.sha256` checks the directory."""
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(hashes.items()))


def _inspect_dcp(path: Path, record: dict, *, full: bool, hashes: dict[tuple[int, ...], str] | None,
                 ) -> tuple[str, str, dict | None]:
    """`_inspect` for a DCP directory whose sidecar was read: every file's size, then (full) the
    manifest's sha256 against the sidecar and every file's against the manifest."""
    files = record.get("files")
    if not isinstance(files, dict) or not isinstance(record.get("sha256"), str) \
            or not all(isinstance(size, int) for size in files.values()):
        return BAD_SIDECAR, "sidecar lacks files or sha256", record
    for name, size in sorted(files.items()):
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return INCOMPLETE, f"{name} is missing", record
        if actual != size:
            return CORRUPT_SIZE, f"{name} is {actual} bytes, sidecar says {size} (truncated or replaced)", record
    if not full:
        return OK, "ok (size checked, sha256 not checked)", record
    try:
        if _hash_once(path / DCP_MANIFEST, hashes) != record["sha256"].lower():
            return CORRUPT_SHA256, f"{DCP_MANIFEST} does not match its sidecar (corrupt or modified)", record
        manifest = read_manifest(path / DCP_MANIFEST)
        if set(manifest) != set(files) - {DCP_MANIFEST}:
            return CORRUPT_SHA256, f"{DCP_MANIFEST} does not list the files the sidecar lists", record
        for name, sha in sorted(manifest.items()):
            if _hash_once(path / name, hashes) != sha:
                return CORRUPT_SHA256, f"{name}: sha256 does not match {DCP_MANIFEST} (corrupt or modified)", record
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return UNREADABLE, f"unreadable: {getattr(err, 'strerror', None) or err}", record
    return OK, "ok", record


def _inspect(path: Path, *, full: bool, hashes: dict[tuple[int, ...], str] | None = None,
             ) -> tuple[str, str, dict | None]:
    """(status, reason, sidecar record or None) of one checkpoint name, without loading it.

    `full=False` checks the sidecar and the size; `full=True` also the sha256 of the whole file.
    `hashes` remembers digests by (device, inode, size, mtime): names hard-linked to one file
    (latest.pt, step_N.pt, final.pt of one save) are read once.
    """
    record, status, reason = _read_sidecar(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return MISSING_FILE, "file missing", record
    if path.suffix == DCP_SUFFIX:
        if not path.is_dir():
            return UNREADABLE, "not a directory", record
        if record is None:
            return status, reason, None
        return _inspect_dcp(path, record, full=full, hashes=hashes)
    if not path.is_file():
        return UNREADABLE, "not a regular file", record
    if record is None:
        return status, reason, None
    if not isinstance(record.get("size"), int) or not isinstance(record.get("sha256"), str):
        return BAD_SIDECAR, "sidecar lacks size or sha256", record
    if st.st_size != record["size"]:
        return (CORRUPT_SIZE, f"size is {st.st_size} bytes, sidecar says {record['size']} (truncated or replaced)",
                record)
    if not full:
        return OK, "ok (size checked, sha256 not checked)", record
    try:
        sha = _hash_once(path, hashes)
    except OSError as err:
        return UNREADABLE, f"unreadable: {err.strerror or err}", record
    if sha != record["sha256"].lower():
        return CORRUPT_SHA256, "sha256 does not match its sidecar (corrupt or modified)", record
    return OK, "ok", record


def validate_checkpoint(path: Path, *, full: bool = True) -> tuple[bool, str]:
    """Check a checkpoint against its sidecar without loading it.

    Returns (True, "ok") or (False, reason). `full=False` checks presence and size only (fast,
    for listings); `full=True` also compares the sha256 of the whole file (of every file of a
    DCP directory).
    """
    status, reason, _ = _inspect(Path(path), full=full)
    return status == OK, reason


def _record_time(record: dict | None, path: Path) -> tuple[float, str]:
    """When a checkpoint was written, and from what: the sidecar's written_at, else the mtime."""
    if record and isinstance(record.get("written_at"), str):
        try:
            return datetime.fromisoformat(record["written_at"]).timestamp(), "sidecar"
        except ValueError:
            pass
    for candidate in (path, sidecar_path(path)):
        try:
            return candidate.stat().st_mtime, "mtime"
        except OSError:
            continue
    return 0.0, "mtime"


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _checkpoint_info(path: Path, *, full: bool, hashes: dict[tuple[int, ...], str] | None) -> CheckpointInfo:
    status, reason, record = _inspect(path, full=full, hashes=hashes)
    record = record or {}
    match = _NAME_RE.match(path.name)
    step, epoch = _finite_or_none(record.get("step")), _finite_or_none(record.get("epoch"))
    if step is None and match and match.group(2):
        step = int(match.group(2))
    if epoch is None and match and match.group(3):
        epoch = int(match.group(3))
    try:
        size = _data_size(path)
    except OSError:
        size = 0
    written, written_from = _record_time(record, path)
    meta = record.get("meta")
    return CheckpointInfo(
        path=path, name=path.name, step=None if step is None else int(step),
        epoch=None if epoch is None else int(epoch), val_loss=_finite_or_none(record.get("val_loss")), size=size,
        status=status, reason=reason, written=written, written_from=written_from,
        meta=meta if isinstance(meta, dict) else {},
    )


def _newest_first(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
    """Most recently written first; the step, then the name, break ties (names of one save).

    Write time, not step: after a resume from an earlier step, the resumed run's files are the
    newest even where their steps are lower than the abandoned run's.
    """
    return sorted(infos, key=lambda i: (i.written, -1 if i.step is None else i.step, i.name), reverse=True)


def _latest_candidates(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """What `--resume latest` tries, in order: latest.pt / latest.dcp (the newer first, when a run
    changed --parallel), then every other checkpoint, newest first."""
    latest = [i for i in infos if i.path.stem == "latest"]
    others = [i for i in infos if i.path.stem != "latest" and i.status != MISSING_FILE]
    return _newest_first(latest) + _newest_first(others)


# --------------------------------------------------------------------------------------------
# Snapshot and size estimate


class SnapshotBuffers:
    """Host memory reused from one asynchronous save to the next.

    Copying 100 MB into freshly allocated memory costs page faults on every page (measured ~5x
    slower than copying into memory already touched), and device-to-host copies are fastest
    into pinned memory, so the snapshot copies into the buffers of the previous snapshot when
    the sizes match (they do: a model's tensors keep their shapes). Holds one snapshot's worth
    of host memory between saves, until the process ends.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, bool], list] = {}
        self._in_use: list[tuple[tuple[int, bool], Any]] = []

    def copy(self, storage: Any, device: Any) -> Any:
        import torch

        on_cuda = device.type == "cuda"
        key = (storage.nbytes(), on_cuda)
        free = self._free.get(key)
        if free:
            buffer = free.pop()
        elif on_cuda:  # pinned: fast, asynchronous device-to-host copies
            buffer = torch.empty(key[0], dtype=torch.uint8, pin_memory=True).untyped_storage()
        else:
            buffer = torch.UntypedStorage(key[0])
        buffer.copy_(storage, non_blocking=on_cuda)
        self._in_use.append((key, buffer))
        return buffer

    def recycle(self) -> None:
        """The snapshot using the buffers has been written: make them available again."""
        for key, buffer in self._in_use:
            self._free.setdefault(key, []).append(buffer)
        self._in_use = []


def _snapshot_tensor(tensor: torch.Tensor, memo: dict, buffers: SnapshotBuffers | None) -> torch.Tensor:
    import torch

    t = tensor.detach()
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        return t.to("cpu", copy=True) if t.device.type != "meta" else t
    # Copy whole storages, once each, and rebuild views on the copies: tensors that share
    # memory (tied embeddings, views) still share it in the snapshot, as torch.save would
    # have stored them.
    storage = t.untyped_storage()
    nbytes = storage.nbytes()
    key = (str(t.device), storage.data_ptr(), nbytes) if nbytes else None
    copied = memo.get(key) if key is not None else None
    if copied is None:
        if buffers is not None:
            copied = buffers.copy(storage, t.device)
            if t.device.type == "cuda":
                memo.setdefault("_cuda_devices", set()).add(t.device)
        else:
            copied = storage.clone() if t.device.type == "cpu" else storage.cpu()
        if key is not None:
            memo[key] = copied
    out = torch.empty((0,), dtype=t.dtype)
    out.set_(copied, t.storage_offset(), t.size(), t.stride())
    return out


def snapshot_state(obj: Any, buffers: SnapshotBuffers | None = None) -> Any:
    """Deep copy of a checkpoint dict with every tensor copied to CPU memory.

    After this returns, the caller may change its tensors in place (the next optimizer step)
    without affecting what the background thread writes. With `buffers`, the copies go into
    reused (and, for CUDA tensors, pinned) host memory.
    """
    memo: dict = {}
    out = _snapshot(obj, memo, buffers)
    devices = memo.get("_cuda_devices")
    if devices:  # the device-to-host copies were asynchronous: finish them before returning
        import torch

        for device in devices:
            torch.cuda.synchronize(device)
    return out


def _snapshot(obj: Any, memo: dict, buffers: SnapshotBuffers | None) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return _snapshot_tensor(obj, memo, buffers)
    if isinstance(obj, dict):
        out: dict = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _snapshot(value, memo, buffers)
        metadata = getattr(obj, "_metadata", None)  # module state_dict version info
        if metadata is not None:
            out._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [_snapshot(v, memo, buffers) for v in obj]
    if isinstance(obj, tuple):
        items = [_snapshot(v, memo, buffers) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)


def estimate_state_bytes(*modules_or_state: Any) -> int:
    """Bytes a checkpoint of these objects will take: the tensors' storage, each counted once.

    Accepts nn.Module (parameters and buffers), torch.optim.Optimizer (its state; before the
    first step, what AdamW, the suite's optimizer, will create: two moments per parameter in its
    dtype and a step counter), tensors and containers of them. Pickle and zip overhead (a few KB)
    is ignored. Of a sharded model (DTensors), this rank's shards.
    """
    import torch

    from .parallel import local_tensor

    seen: set = set()
    total = 0

    def add_tensor(t: torch.Tensor) -> None:
        nonlocal total
        t = local_tensor(t)  # a DTensor: this rank's shard
        if t.layout != torch.strided or t.device.type == "meta":
            total += t.numel() * t.element_size()
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr(), storage.nbytes())
        if key not in seen or storage.nbytes() == 0:
            seen.add(key)
            total += storage.nbytes()

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            add_tensor(obj)
        elif isinstance(obj, torch.nn.Module):
            walk(obj.state_dict())
        elif isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                for p in group["params"]:
                    state = obj.state.get(p)
                    if state:
                        walk(state)
                    else:  # not stepped yet: exp_avg and exp_avg_sq like the parameter, a float32 step
                        local = local_tensor(p)
                        total += 2 * local.numel() * local.element_size() + 4
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value)

    for obj in modules_or_state:
        walk(obj)
    return total


# --------------------------------------------------------------------------------------------
# Writing


class _HashingWriter:
    """File-like wrapper for torch.save: hashes and counts the bytes as they are written.

    It also keeps the OSError of a failed write, because torch's C++ writer may re-raise it as
    a RuntimeError without the errno.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self._digest = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        # torch ignores short writes, so write everything or raise: an unbuffered file may
        # accept part of a buffer (e.g. just before the disk fills).
        while view:
            try:
                written = self._f.write(view)
            except OSError as err:
                self.error = err
                raise
            if not written:
                self.error = OSError(errno.EIO, "write made no progress")
                raise self.error
            self._digest.update(view[:written])
            self.size += written
            view = view[written:]
        return total

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _find_os_error(exc: BaseException | None) -> OSError | None:
    for _ in range(16):  # bounded: a chain could in principle be cyclic
        if exc is None:
            break
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def new_token() -> str:
    """Unique part of one save's temporary names: `TMP_PREFIX + token + ...`."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def write_state(state: dict, path: Path) -> tuple[int, str]:
    """Protocol step 1: `torch.save` into the new file `path`, fsynced; (size, sha256) of its bytes."""
    import torch

    # O_EXCL: a temporary name is never shared; buffering=0 so fsync sees every byte and the
    # hash covers exactly what reached the file.
    with open(path, "xb", buffering=0) as f:
        writer = _HashingWriter(f)
        try:
            torch.save(state, writer)
        except Exception as exc:
            if writer.error is not None and writer.error is not exc:
                raise writer.error from exc
            raise
        os.fsync(f.fileno())
    return writer.size, writer.hexdigest()


def sidecar_record(
    file: str | None, state: Any, *, step: int | None, epoch: int | None, val_loss: float | None, size: int,
    sha256: str, saved_as: list[str] | None = None,
) -> dict:
    """The sidecar of a checkpoint file: what validation and listing read instead of the file.

    `meta` is the state's "meta" dict; `saved_as` (the names of one save) is included when given.
    """
    record = {
        "format_version": SIDECAR_VERSION,
        "file": file,
        "step": None if step is None else int(step),
        "epoch": None if epoch is None else int(epoch),
        "val_loss": _finite_or_none(val_loss),
        "size": size,
        "sha256": sha256,
        "written_at": datetime.now(timezone.utc).isoformat(),
    }
    if saved_as is not None:
        record["saved_as"] = list(saved_as)
    record["meta"] = dict(state.get("meta") or {}) if isinstance(state, dict) else {}
    return record


def _publish(target: Path, record: dict, token: str, stage: Callable[[], Path]) -> None:
    """Protocol step 2 for one name: `stage()` returns a temporary file beside `target` that holds
    the complete, fsynced data (it is called only after the old sidecar is gone)."""
    directory = target.parent
    side = sidecar_path(target)
    # 1. The old sidecar goes first: from here until step 3 the name has no sidecar, so it
    #    never has a sidecar that describes other bytes than its data file.
    if _unlink(side):
        fsync_dir(directory)
    # 2. The data, atomically: a complete, fsynced file (or directory) appears under the name. An
    #    old directory is moved aside first: rename() cannot replace a non-empty directory.
    staged = stage()
    aside = None
    if target.is_dir() and not target.is_symlink():
        aside = directory / f"{TMP_PREFIX}{token}.old-{target.name}"
        os.replace(target, aside)
    os.replace(staged, target)
    _unlink(staged)  # rename() of two links to one inode is a no-op; never the case here
    fsync_dir(directory)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    # 3. The sidecar, atomically, after its data file is durable (atomic_write fsyncs the directory).
    data = json.dumps(record, indent=2, default=_json_default).encode("utf-8") + b"\n"
    atomic_write_bytes(side, data, tmp_name=f"{TMP_PREFIX}{token}.json-{target.name}")


def remove_temps(directory: Path, token: str) -> None:
    """Remove what the save `token` left: temporary files, and a DCP save's temporary directories."""
    try:
        for entry in directory.glob(f"{TMP_PREFIX}{token}*"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                _unlink(entry)
    except OSError:
        pass


def seal_dcp_directory(directory: Path) -> tuple[dict[str, int], str]:
    """Write MANIFEST.sha256 into the directory of a complete DCP save: the ranks' sha256 of their
    own parts (the DCP_PART_HASHES files, merged, then removed) and of every other file, hashed
    here. Returns ({file: size} of every file, the manifest included; the manifest's sha256)."""
    hashes: dict[str, str] = {}
    part_hashes = sorted(directory.glob(f"{DCP_PART_HASHES}*"))
    for part in part_hashes:
        hashes.update(json.loads(part.read_text(encoding="utf-8")))
    files = [f for f in _tree_files(directory) if f.name != DCP_MANIFEST and f not in part_hashes]
    for file in files:
        if file.name not in hashes:
            hashes[file.name] = sha256_file(file)
    if set(hashes) != {f.name for f in files}:
        raise OSError(errno.ENOENT, f"parts hashed but missing: {sorted(set(hashes) - {f.name for f in files})}")
    text = manifest_text(hashes).encode("utf-8")
    atomic_write_bytes(directory / DCP_MANIFEST, text, tmp_name=f"{TMP_PREFIX}{DCP_MANIFEST}")
    for part in part_hashes:
        _unlink(part)
    fsync_dir(directory)
    return {f.name: f.stat().st_size for f in _tree_files(directory)}, hashlib.sha256(text).hexdigest()


def write_checkpoint(state: dict, path: Path, *, step: int | None, epoch: int | None,
                     val_loss: float | None) -> dict:
    """Write one checkpoint file `path` and its sidecar, crash-safe; returns the sidecar record.

    The write protocol of the module docstring for a single name and no rotation: `torch.save`
    into a temporary file (sha256 taken from the bytes as written), fsync; remove the old
    sidecar; rename the data onto `path`; then the sidecar (file, step, epoch, val_loss, size,
    sha256, written_at and the state's meta, as the Checkpointer writes them). `path`'s
    directory must exist. On failure (OSError, ...) the temporary files are removed, the
    exception propagates, and `path` is the old file or the new one, with a sidecar only if
    it describes that file.
    """
    path = Path(path)
    token = new_token()
    data_tmp = path.parent / f"{TMP_PREFIX}{token}.data"
    try:
        size, sha = write_state(state, data_tmp)
        record = sidecar_record(path.name, state, step=step, epoch=epoch, val_loss=val_loss, size=size, sha256=sha)
        _publish(path, record, token, lambda: data_tmp)
    except BaseException:
        remove_temps(path.parent, token)
        raise
    return record


class Checkpointer:
    """Saves, rotates, validates and finds checkpoints in one directory.

    Construct it on every rank with `enabled=(rank == 0)`: writes on other ranks are no-ops,
    while `resolve`, `load` and `list` work everywhere. It writes `.pt` files (rank 0 alone);
    finding, validating, loading and rotating handle `.dcp` directories too (written by
    common.dcp_checkpoint.DCPCheckpointer, a subclass in which every rank takes part in a save).
    """

    suffix = PT_SUFFIX  # of the checkpoints this class writes
    collective = False  # save() and settle() on rank 0 alone; the subclass: on every rank

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_rolling: int = 10,
        keep_epoch: int = 5,
        async_save: bool = True,
        enabled: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.keep_rolling = int(keep_rolling)  # <= 0 disables the rolling tier
        self.keep_epoch = int(keep_epoch)  # <= 0 disables the epoch tier
        self.async_save = bool(async_save)
        self.enabled = bool(enabled)
        self._thread: threading.Thread | None = None
        self._error: CheckpointError | None = None
        self._warned_no_links = False
        self._buffers = SnapshotBuffers()

    # ---- start of run -----------------------------------------------------------------------

    def prepare(self, estimated_bytes: int) -> None:
        """Create the directory, remove temporary files of interrupted saves, check free space."""
        if not self.enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        self._check_disk(int(estimated_bytes))

    def _remove_stale_temps(self) -> None:
        own = f"{TMP_PREFIX}{os.getpid()}-" if self.in_flight else None
        removed = 0
        for entry in self.directory.iterdir():
            if not entry.name.startswith(TMP_PREFIX) or (own and entry.name.startswith(own)):
                continue
            if entry.is_file() or entry.is_symlink():
                removed += _unlink(entry)
            elif entry.is_dir():  # a DCP save's directory
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        if removed:
            fsync_dir(self.directory)
            logger.info("removed %d temporary file(s) left by an interrupted save in %s", removed, self.directory)

    def kept_set_checkpoints(self) -> int:
        """Distinct checkpoints on disk at the peak of a save with this retention policy.

        Named files: keep_rolling + keep_epoch + latest + best + final. latest.pt is a hard link
        to the newest step file and final.pt to the last latest.pt, so two names share bytes;
        one more checkpoint exists while a new one is written before the oldest is rotated out.
        """
        rolling = max(self.keep_rolling, 0)
        epoch = max(self.keep_epoch, 0)
        named = rolling + epoch + 3
        shared = 1 + (1 if rolling > 0 else 0)
        return named - shared + 1

    def _existing_bytes(self) -> int:
        seen: set = set()
        total = 0
        for path in self._data_files():
            try:
                files = _tree_files(path) if path.is_dir() else [path]
                for file in files:
                    st = file.stat()
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
            except OSError:
                continue
        return total

    def total_bytes(self, local_bytes: int) -> int:
        """A checkpoint's size from this rank's share of it: all of it (rank 0 writes the whole)."""
        return local_bytes

    def _check_disk(self, estimated_bytes: int) -> None:
        if estimated_bytes <= 0:
            return
        free = shutil.disk_usage(self.directory).free
        if free < estimated_bytes:
            raise UserError(
                f"not enough disk space for one checkpoint in {self.directory}: {format_bytes(free)} free, "
                f"one checkpoint needs about {format_bytes(estimated_bytes)}; free space or pass "
                f"--checkpoint_dir on a larger disk"
            )
        count = self.kept_set_checkpoints()
        # Checkpoints already in the directory hold part of the kept set; they are not free space.
        needed = max(count * estimated_bytes - self._existing_bytes(), estimated_bytes)
        if free < needed:
            logger.warning(
                "checkpoint directory %s has %s free; keeping %d rolling + %d epoch + latest/best/final "
                "checkpoints of about %s each needs about %s more (%d distinct files at peak); saves will "
                "fail when the disk fills (earlier checkpoints stay intact). Lower --keep_rolling/--keep_epoch "
                "or free space",
                self.directory, format_bytes(free), max(self.keep_rolling, 0), max(self.keep_epoch, 0),
                format_bytes(estimated_bytes), format_bytes(needed), count,
            )
        else:
            logger.info(
                "checkpoint directory %s: %s free, kept set needs about %s (%d x %s)",
                self.directory, format_bytes(free), format_bytes(count * estimated_bytes), count,
                format_bytes(estimated_bytes),
            )

    # ---- saving -----------------------------------------------------------------------------

    def _names_for(self, tiers: Iterable[str], step: int, epoch: int) -> list[str]:
        tiers = set(tiers)
        unknown = tiers - set(TIERS)
        if unknown:
            raise ValueError(f"unknown checkpoint tier(s) {sorted(unknown)}; known: {list(TIERS)}")
        names = []
        for tier in _PUBLISH_ORDER:
            if tier not in tiers:
                continue
            if tier == "rolling":
                if self.keep_rolling > 0:
                    names.append(f"step_{int(step):08d}{self.suffix}")
            elif tier == "epoch":
                if self.keep_epoch > 0:
                    names.append(f"epoch_{int(epoch):03d}{self.suffix}")
            else:
                names.append(f"{tier}{self.suffix}")
        return names

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def save(
        self,
        state: dict,
        *,
        step: int,
        epoch: int,
        val_loss: float | None,
        tiers: Iterable[str],
        wait: bool = False,
    ) -> None:
        """Save `state` under the names of `tiers` (see the module docstring).

        Asynchronous unless async_save is off, `wait=True`, or "final" is among the tiers. Waits
        for the previous write first, and raises CheckpointError if that one failed.
        """
        if not self.enabled:
            return
        tiers = list(tiers)
        names = self._names_for(tiers, step, epoch)
        if not names:
            return
        self.wait()
        self._buffers.recycle()  # the previous snapshot is written (or failed): reuse its memory
        synchronous = wait or not self.async_save or "final" in tiers
        if synchronous:
            self._write(state, names, step, epoch, val_loss)
            return
        snapshot = snapshot_state(state, self._buffers)
        self._start_background(lambda: self._write(snapshot, names, step, epoch, val_loss))

    def _start_background(self, job: Callable[[], None]) -> None:
        def run() -> None:
            try:
                job()
            except CheckpointError as err:
                logger.error("%s", err)
                self._error = err
            except BaseException as err:  # keep the thread from dying silently
                logger.exception("checkpoint writer crashed")
                self._error = CheckpointError(f"checkpoint write to {self.directory} failed: {err!r}")

        # Not a daemon: a normal interpreter exit waits for the write to finish.
        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the in-flight write ends; raise CheckpointError if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        self._raise_pending()

    def close(self) -> None:
        """Wait for the in-flight write (the end of a run)."""
        self.wait()

    def settle(self) -> None:
        """Wait for the in-flight save on every rank that takes part in one (here: rank 0, the
        caller makes its failure every rank's); raise CheckpointError if it failed."""
        self.wait()

    def check_failed(self) -> None:
        """Non-blocking: raise CheckpointError if a finished background write failed."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            thread.join()
            self._thread = None
        if self._thread is None:
            self._raise_pending()

    def _raise_pending(self) -> None:
        err, self._error = self._error, None  # reported once
        if err is not None:
            raise err

    def _write(self, state: dict, names: list[str], step: int, epoch: int, val_loss: float | None) -> None:
        started = time.perf_counter()
        token = new_token()
        data_tmp = self.directory / f"{TMP_PREFIX}{token}.data"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            size, sha = write_state(state, data_tmp)
            record = sidecar_record(
                None, state, step=step, epoch=epoch, val_loss=val_loss, size=size, sha256=sha, saved_as=names,
            )
            for name in names:
                self._publish(data_tmp, name, token, dict(record, file=name))
        except BaseException as exc:
            remove_temps(self.directory, token)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to convert
                raise
            raise CheckpointError(self._failure_message(exc)) from exc
        finally:
            _unlink(data_tmp)  # the names hold their own links to the data
        try:
            self._rotate(set(names))
        except OSError as err:  # the new checkpoint is complete; a failed cleanup must not stop the run
            logger.warning("could not rotate old checkpoints in %s: %s", self.directory, err.strerror or err)
        logger.info(
            "saved checkpoint step %d as %s (%s, %.2f s)",
            step, ", ".join(names), format_bytes(size), time.perf_counter() - started,
        )

    def _failure_message(self, exc: BaseException) -> str:
        os_err = _find_os_error(exc)
        if os_err is not None and os_err.strerror:
            detail = os_err.strerror
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return f"checkpoint write to {self.directory} failed: {detail}; earlier checkpoints are intact"

    def _link_or_copy(self, source: Path, target: Path) -> None:
        try:
            os.link(source, target)
            return
        except OSError as err:
            if err.errno not in _NO_LINK_ERRNOS:
                raise
            if not self._warned_no_links:
                self._warned_no_links = True
                logger.warning(
                    "hard links are not available in %s (%s); each checkpoint name is a full copy",
                    self.directory, err.strerror,
                )
        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())

    def _publish(self, data_tmp: Path, name: str, token: str, record: dict) -> None:
        """Publish the save's data under `name`: a hard link (or copy) of `data_tmp`, or for a DCP
        directory a directory of hard links (or copies) of its files; see `_publish`."""
        link_tmp = self.directory / f"{TMP_PREFIX}{token}.link-{name}"

        def stage() -> Path:
            if not data_tmp.is_dir():
                self._link_or_copy(data_tmp, link_tmp)
                return link_tmp
            link_tmp.mkdir()
            for file in _tree_files(data_tmp):
                self._link_or_copy(file, link_tmp / file.name)
            fsync_dir(link_tmp)
            return link_tmp

        _publish(self.directory / name, record, token, stage)

    def _rotate(self, just_written: set[str]) -> None:
        """Keep the newest keep_rolling step files and keep_epoch epoch files.

        "Newest" is by write time (sidecar's written_at, else mtime), so after resuming from an
        older checkpoint the files of the abandoned future go first. A tier with keep <= 0 is
        disabled and its files are left alone.
        """
        deleted = False
        infos = self.list()
        for pattern, keep in ((_STEP_RE, self.keep_rolling), (_EPOCH_RE, self.keep_epoch)):
            if keep <= 0:
                continue
            tier = _newest_first(i for i in infos if pattern.match(i.path.stem))
            for info in tier[keep:]:
                if info.name in just_written:
                    continue
                try:
                    # Sidecar first: a half-deleted checkpoint is a data file without a sidecar,
                    # which is invalid; never a sidecar vouching for a missing file.
                    _unlink(sidecar_path(info.path))
                    _remove(info.path)
                    deleted = True
                except OSError as err:
                    logger.warning("could not delete old checkpoint %s: %s", info.name, err.strerror or err)
        if deleted:
            fsync_dir(self.directory)

    # ---- finding and loading ----------------------------------------------------------------

    def _named_files(self) -> list[Path]:
        """Data files and sidecars whose names are checkpoint names (temp files never match)."""
        if not self.directory.is_dir():
            return []
        return [p for p in self.directory.iterdir() if _NAME_RE.match(p.name)]

    def _data_files(self) -> list[Path]:
        return [p for p in self._named_files() if (p.suffix == PT_SUFFIX and p.is_file())
                or (p.suffix == DCP_SUFFIX and p.is_dir())]

    def list(self, *, full: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint name in the directory (data file, sidecar or both), in step order.

        The default checks each sidecar and size; `full=True` also each sha256 (reads every file,
        hard-linked names once). A data file without a sidecar is NO_SIDECAR, a sidecar without
        its data file MISSING_FILE.
        """
        hashes: dict[tuple[int, ...], str] = {}
        names = sorted({_data_name(p.name) for p in self._named_files()})
        infos = [_checkpoint_info(self.directory / name, full=full, hashes=hashes) for name in names]
        infos.sort(key=lambda i: (-1 if i.step is None else i.step, _NAME_ORDER.get(i.path.stem, 0), i.name))
        return infos

    def choose_resume(self, spec: str) -> Path | None:
        """The checkpoint a run starts from, validated; None to start fresh. UserError otherwise.

        "" (no --resume): None, refused when the directory holds checkpoint data (a fresh run
           would overwrite it).
        latest: latest.pt (or latest.dcp; the newer of the two) if valid, else the most recently
           written valid checkpoint of any tier (with a warning).
        auto: like latest, but None when the directory holds no checkpoint data at all; data of
           which none is usable (e.g. files copied without their sidecars) is refused, never
           started over.
        best: best.pt (or best.dcp; the newer) if valid.
        PATH: that file or DCP directory (a relative path is also looked up in the directory) if
           it validates. One without a sidecar is accepted with a warning, being named explicitly;
           `load` still requires it to load with weights_only and to hold RESUME_KEYS (a DCP
           directory's metadata is read by an unpickler that builds DCP's own classes only).
           Nothing else ever picks a checkpoint without a sidecar.
        Reads and validates only; never changes a file.
        """
        spec = str(spec or "").strip()
        if spec == "best":
            return self._choose_best()
        if spec not in ("", "latest", "auto"):
            return self._choose_path(spec)
        infos = self.list()
        if not infos:
            if spec == "latest":
                raise UserError(
                    f"no checkpoint to resume in {self.directory} (no latest.pt or other .pt or .dcp checkpoint); "
                    "check --checkpoint_dir, or drop --resume to start fresh (--resume auto does that by itself)"
                )
            if spec == "auto":
                logger.info("--resume auto: no checkpoint in %s, starting fresh", self.directory)
            return None
        if not spec:
            raise UserError(
                f"{self.directory} already holds checkpoints; continue that run with --resume latest "
                "(or --resume auto), or start fresh with another --checkpoint_dir"
            )
        return self._choose_latest(infos, spec)

    def _choose_latest(self, infos: list[CheckpointInfo], spec: str) -> Path:
        problems = {i.name: i.reason for i in infos if not i.valid}  # name -> why it is not usable
        hashes: dict[tuple[int, ...], str] = {}
        for info in _latest_candidates(infos):
            if not info.valid:
                continue
            status, reason, _ = _inspect(info.path, full=True, hashes=hashes)  # the listing checked sizes
            if status != OK:
                problems[info.name] = reason
                continue
            if info.path.stem != "latest":
                latest = next((name for name in problems if Path(name).stem == "latest"), f"latest{self.suffix}")
                logger.warning(
                    "%s in %s is not usable (%s); resuming from %s (step %s), the most recently "
                    "written valid checkpoint", latest, self.directory, problems.get(latest, "file missing"),
                    info.name, info.step,
                )
            return info.path
        refusal = "--resume auto does not start fresh over them: " if spec == "auto" else ""
        raise UserError(
            f"no valid checkpoint in {self.directory} ({_problems(problems)}); {refusal}restore their .json "
            "sidecars, or name one with --resume PATH (loaded unverified), or move them aside (or pass "
            "another --checkpoint_dir) to start fresh"
        )

    def _choose_best(self) -> Path:
        found = _newest_first(i for i in self.list() if i.path.stem == "best" and i.status != MISSING_FILE)
        if not found:
            raise UserError(
                f"no best.pt or best.dcp in {self.directory} (it is written at the first evaluation); "
                "use --resume latest or --resume PATH"
            )
        path = found[0].path
        status, reason, _ = _inspect(path, full=True)
        if status != OK:
            raise UserError(f"{path} is not usable: {reason}; use --resume latest or --resume PATH")
        return path

    def _choose_path(self, spec: str) -> Path:
        path = Path(spec).expanduser()
        if not path.exists() and not path.is_absolute() and (self.directory / path).exists():
            path = self.directory / path
        if not path.exists():
            raise UserError(f"checkpoint {spec} not found; pass an existing .pt file or .dcp directory, "
                            "or --resume latest")
        if path.is_dir() and not is_dcp(path):
            raise UserError(
                f"{spec} is a directory, not a DCP checkpoint; pass a checkpoint, or --checkpoint_dir {spec} "
                "--resume latest"
            )
        status, reason, _ = _inspect(path, full=True)
        if status == NO_SIDECAR:
            logger.warning(
                "%s has no sidecar %s: its integrity cannot be verified (no size or sha256 to compare); "
                "loading it because --resume names it", path, sidecar_path(path).name,
            )
        elif status != OK:
            raise UserError(
                f"checkpoint {path} is not usable: {reason}; pick another file (make checkpoints lists them) "
                "or use --resume latest"
            )
        return path

    def load(self, path: Path) -> dict:
        """torch.load(path, map_location="cpu", weights_only=True) of a checkpoint to resume.

        Of a DCP directory, its train_state.pt, with "dcp": the directory in place of the model
        and optimizer state (common.parallel.load_weights reads them from the parts).
        UserError when that fails, or when the result lacks a key a resume reads (RESUME_KEYS):
        an exported weights-only file or a foreign file is refused in one line.
        """
        import torch

        path = Path(path)
        dcp = path.is_dir()
        try:
            # mmap: the ranks of a node share one copy of the file in the page cache.
            state = torch.load(path / DCP_TRAIN_STATE if dcp else path, map_location="cpu", weights_only=True,
                               mmap=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load checkpoint {path}: {first}") from err
        keys = DCP_RESUME_KEYS if dcp else RESUME_KEYS
        missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise UserError(
                f"cannot resume from {path}: it has no {', '.join(missing)} (not a checkpoint the trainer saved; "
                "an exported file holds weights only)"
            )
        if dcp:
            state["dcp"] = str(path)
        return state


def _problems(problems: dict[str, str]) -> str:
    """{name: reason} on one line, names grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in problems.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{shown}: {reason}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# `python -m common.checkpoint [DIR] [--verify] [--json]`: the listing, standard library only


def _written_text(info: CheckpointInfo) -> str:
    local = datetime.fromtimestamp(info.written).strftime("%Y-%m-%d %H:%M:%S")
    return local if info.written_from == "sidecar" else f"{local} (mtime)"


def _disk_use(directory: Path) -> int:
    """Bytes allocated under `directory`, as du counts them: each hard-linked file once."""
    seen: set[tuple[int, int]] = set()
    used = 0
    for root, dirs, files in os.walk(directory):
        entries = [os.curdir, *dirs, *files] if Path(root) == directory else [*dirs, *files]
        for entry in entries:
            st = os.lstat(os.path.join(root, entry))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                used += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return used


def _listing(directory: Path, infos: list[CheckpointInfo], *, verified: bool) -> list[str]:
    """The lister's lines: a table of every name, then disk use, temporary files and problems.

    "<- latest" marks the file `--resume latest` would take and "<- best" the one `--resume best`
    would, as far as this listing checked them (sizes, or sha256 with --verify).
    """
    lines = [f"Checkpoints in {directory.resolve()}" + ("  (sha256 verified)" if verified else "")]
    if not infos:
        lines.append("  none yet")
    notes: dict[str, list[str]] = {i.name: [] for i in infos}
    latest = next((i for i in _latest_candidates(infos) if i.valid), None)
    if latest is not None:
        notes[latest.name].append("<- latest")
    best = next(iter(_newest_first(i for i in infos if i.path.stem == "best" and i.valid)), None)
    if best is not None:
        notes[best.name].append("<- best")
    by_file: dict[tuple[int, int], list[str]] = {}
    for info in infos:
        with contextlib.suppress(OSError):
            by_file.setdefault(_file_identity(info.path), []).append(info.name)
    for names in by_file.values():
        for name in names:
            if len(names) > 1:
                same = "same files as " if name.endswith(DCP_SUFFIX) else "same file as "
                notes[name].append(same + ", ".join(n for n in names if n != name))

    table = [("NAME", "STEP", "EPOCH", "VAL_LOSS", "WRITTEN", "SIZE", "STATUS", "NOTE")]
    for info in infos:
        status = ("ok (sha256)" if verified else "ok") if info.valid else info.status
        table.append((
            info.name, "-" if info.step is None else str(info.step), "-" if info.epoch is None else str(info.epoch),
            "-" if info.val_loss is None else f"{info.val_loss:.4f}", _written_text(info),
            "-" if info.status == MISSING_FILE else format_bytes(info.size), status, "  ".join(notes[info.name]),
        ))
    if infos:
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        right_aligned = {1, 2, 3, 5}
        for row in table:
            cells = [c.rjust(w) if i in right_aligned else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
            lines.append("  " + "  ".join(cells).rstrip())

    lines.append(f"Total disk use: {format_bytes(_disk_use(directory))} (like du: hard-linked files counted once)")
    temporary = sorted(p.name for p in directory.iterdir() if p.name.startswith(TMP_PREFIX))
    if temporary:
        lines.append(f"Temporary files of an interrupted or running save: {', '.join(temporary)}")
    problems = [i for i in infos if not i.valid]
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines.extend(f"  {i.name}: {i.reason}" for i in problems)
        if not verified:
            lines.append("Sizes were checked; run with --verify to also compare sha256 (reads every file).")
    return lines


def _main(argv: list[str] | None = None) -> int:
    """List a checkpoint directory; exit status 1 when a name is not usable, 2 for a bad directory."""
    parser = argparse.ArgumentParser(
        prog="python -m common.checkpoint",
        description="List checkpoints (.pt files and .dcp directories) with step, epoch, val loss, write time, "
                    "size and validity, from their sidecars (no torch).",
    )
    parser.add_argument("directory", nargs="?", default="checkpoints", type=Path)
    parser.add_argument("--verify", action="store_true",
                        help="also compare every sha256 (reads every file, every part of a .dcp directory)")
    parser.add_argument("--json", action="store_true", help="one JSON object per checkpoint name")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        raise UserError(f"no checkpoint directory {args.directory} (train first, or pass the run's --checkpoint_dir)")
    infos = Checkpointer(args.directory, enabled=False).list(full=args.verify)
    if args.json:
        for info in infos:
            print(json.dumps(dict(asdict(info), path=str(info.path), valid=info.valid)))
    else:
        print("\n".join(_listing(args.directory, infos, verified=args.verify)))
    return 0 if all(i.valid for i in infos) else 1


if __name__ == "__main__":
    run_cli(_main)
