"""Crash-safe file writes shared by the whole suite (data shards, checkpoints, configs, logs, plots).

`atomic_write` is the one implementation of "temporary file in the same directory, write, flush,
fsync, `os.replace` over the name, fsync the directory": a reader (or a process started after a
crash) sees either the old file or the complete new one, never a partial write. `fsync_dir` makes
renames and unlinks durable. `format_bytes` is the one way sizes are shown (IEC binary units).
Nothing here imports torch or numpy.
"""
from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["fsync_dir", "atomic_write", "atomic_write_bytes", "atomic_write_text", "format_bytes", "sha256_file"]

# fsync() of a directory fails with these where the platform or file system does not support it
# (some network and FUSE file systems, Windows-like layers); the rename is as durable as it gets.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
_IEC_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float) -> str:
    """A size in IEC binary units, as `ls -lh` and `du -h` count: 512 -> "512 B",
    91_331_648 -> "87.1 MiB". Every size the suite prints goes through here, so a file is the same
    size in the trainer's log, the checkpoint listing and the disk check."""
    value = float(n)
    for unit in _IEC_UNITS:
        if round(abs(value), 1) < 1024 or unit == _IEC_UNITS[-1]:  # never "1024.0 KiB"
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def fsync_dir(directory: Path) -> None:
    """Make renames and unlinks in `directory` durable.

    A no-op where a directory cannot be opened; an fsync refused as unsupported (EINVAL, ENOTSUP,
    EBADF) is ignored. Any other error (EIO, ...) is raised: the directory entry may be lost.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    write: Callable[[BinaryIO], Any],
    *,
    tmp_dir: Path | None = None,
    tmp_name: str | None = None,
    durable: bool = True,
) -> Any:
    """Replace `path` atomically with what `write(file)` writes; returns `write`'s result.

    The temporary file is created exclusively in `tmp_dir` (default: `path`'s directory, which
    must be on the same file system) as `tmp_name`, default `.NAME.PID-RANDOM.tmp` (hidden, ends
    in `.tmp`). After `write` returns, the file is flushed and fsynced, renamed over `path`, and
    the directory fsynced. `durable=False` skips both fsyncs (still atomic for readers, not
    across a power loss): for files that are cheap to regenerate and written on a hot path. On
    any failure the temporary file is removed and the exception propagates; `path` is untouched.
    """
    path = Path(path)
    directory = Path(tmp_dir) if tmp_dir is not None else path.parent
    tmp = directory / (tmp_name or f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    # O_EXCL: never write into a file someone else is writing; 0o666 & ~umask like open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
    return result


def atomic_write_bytes(
    path: Path, data: bytes, *, tmp_dir: Path | None = None, tmp_name: str | None = None, durable: bool = True
) -> None:
    """`atomic_write` of `data` (the keywords as for `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data), tmp_dir=tmp_dir, tmp_name=tmp_name, durable=durable)


def atomic_write_text(
    path: Path, text: str, *, encoding: str = "utf-8", tmp_dir: Path | None = None, tmp_name: str | None = None,
    durable: bool = True,
) -> None:
    """`atomic_write` of `text` encoded with `encoding`, no newline translation (the keywords as for
    `atomic_write`)."""
    atomic_write_bytes(path, text.encode(encoding), tmp_dir=tmp_dir, tmp_name=tmp_name, durable=durable)


def sha256_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file as stored (what `sha256sum` prints), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
