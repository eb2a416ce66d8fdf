"""The writing side of the data layer, used only by prepare_data.py: one token stream cut into
shards, meta.json kept current, and the lock and clean-up that make reruns safe.

Every file it writes is named through common.shards.shard_path, so no meta.json entry can make a
rerun write outside --out.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.shards import LZ4_SUFFIX, layout_for_vocab, shard_path, tokens_sha256, write_meta, write_shard

log = logging.getLogger(__name__)


class DatasetWriter:
    """Cuts one token stream into val/train shards and keeps meta.json current.

    Resumable: the shards meta.json already lists are the stream's prefix. Fed the same stream
    again, the writer checks each of them against the tokens (tokens_sha256) without rewriting
    it -- rewriting only a file that has gone missing -- and appends new shards after them.
    The first `val_tokens` tokens of the stream go to val_*, the rest to train_*. Every shard has
    the layout of the vocabulary (common.shards.layout_for_vocab: uint16 or uint32 tokens), and the
    stream fed to `add` must already be of that layout's dtype (`self.dtype`).
    """

    def __init__(self, out_dir: Path, meta: dict[str, Any], *, shard_tokens: int, val_tokens: int,
                 compress: bool, max_tokens: int | None, estimated_tokens: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.meta = meta
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        self.compress, self.max_tokens = compress, max_tokens
        self.estimated_tokens = estimated_tokens
        self.finished: list[dict[str, Any]] = list(meta.get("shards", []))
        self.prefix_tokens = sum(e["tokens"] for e in self.finished)
        self.position = 0  # stream tokens seen
        self.documents = 0
        self._shard_no = 0  # index into the stream's shards (finished ones first)
        self.layout = layout_for_vocab(meta["vocab_size"])
        self.dtype = self.layout.dtype
        self._buf = np.empty(max([shard_tokens, *(e["tokens"] for e in self.finished)]), dtype=self.dtype)
        self._fill = 0
        self._begin_shard()

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.position >= self.max_tokens

    def add(self, tokens: np.ndarray) -> bool:
        """Append stream tokens; True once --max_tokens is reached (stop feeding)."""
        if tokens.dtype != self.dtype:  # a narrower buffer would wrap ids silently
            raise TypeError(f"the stream's tokens are {tokens.dtype}, the shards hold {self.dtype}")
        if self.max_tokens is not None:
            tokens = tokens[: max(0, self.max_tokens - self.position)]
        self.documents += int(np.count_nonzero(tokens == self.meta["eot_token"]))  # one before each document
        while len(tokens):
            take = min(len(tokens), self._end - self.position)
            self._buf[self._fill: self._fill + take] = tokens[:take]
            self._fill += take
            self.position += take
            tokens = tokens[take:]
            if self.position == self._end:
                self._close_shard()
        return self.full

    def finish(self, exhausted: bool) -> dict[str, Any]:
        """Write the last partial shard and mark the directory complete; the final meta."""
        if self.position < self.prefix_tokens:
            raise UserError(f"the source now yields {self.position} tokens, fewer than the {self.prefix_tokens} "
                            f"already in {self.out_dir}; it changed since the first run: prepare into a new --out")
        if self.position <= self.val_tokens:
            what = "no text" if self.position == 0 else f"only {self.position} tokens"
            raise UserError(f"the source holds {what}, not more than --val_tokens {self.val_tokens}, so nothing is "
                            "left for training; use a larger corpus or a smaller --val_tokens")
        if self._fill:
            self._end = self.position
            self._close_shard()
        self.meta["complete"] = True
        self.meta["exhausted"] = exhausted
        self._write_meta(exact=True)
        return self.meta

    def split_tokens(self, split: str) -> int:
        return sum(e["tokens"] for e in self.finished if e["split"] == split)

    # -- shards --------------------------------------------------------------------------

    def _begin_shard(self) -> None:
        start = self.position
        if self._shard_no < len(self.finished):
            self._end = start + self.finished[self._shard_no]["tokens"]
        elif start < self.val_tokens:
            self._end = min(start + self.shard_tokens, self.val_tokens)
        else:
            self._end = start + self.shard_tokens
        self._fill = 0

    def _close_shard(self) -> None:
        tokens = self._buf[: self._fill]
        if self._shard_no < len(self.finished):
            self._verify_finished(self.finished[self._shard_no], tokens)
        else:
            self._write_new(tokens)
        self._shard_no += 1
        self._begin_shard()

    def _verify_finished(self, entry: dict[str, Any], tokens: np.ndarray) -> None:
        path = shard_path(self.out_dir, entry["file"])
        if tokens_sha256(tokens) != entry.get("tokens_sha256"):
            raise UserError(f"the source changed since {path.name} was written (its tokens differ now); "
                            f"prepare into a new --out directory (nothing in {self.out_dir} was modified)")
        if not path.exists():
            log.info("%s was missing: rewriting it", path.name)
            # Another lz4 release may compress the same tokens to other bytes: record what is stored now.
            entry["sha256"] = write_shard(path, tokens, self.layout)["sha256"]
            self._write_meta(exact=False)

    def _write_new(self, tokens: np.ndarray) -> None:
        split = "val" if self.position - len(tokens) < self.val_tokens else "train"
        number = sum(1 for e in self.finished if e["split"] == split)
        name = f"{split}_{number:06d}.bin" + (LZ4_SUFFIX if self.compress else "")
        entry = write_shard(shard_path(self.out_dir, name), tokens, self.layout)
        self.finished.append({"file": entry["file"], "split": split, "tokens": entry["tokens"],
                              "sha256": entry["sha256"], "tokens_sha256": entry["tokens_sha256"]})
        self.prefix_tokens += entry["tokens"]
        log.info("wrote %s (%d tokens)", name, entry["tokens"])
        self._write_meta(exact=False)

    def _write_meta(self, exact: bool) -> None:
        self.meta["shards"] = self.finished
        self.meta["documents"] = self.documents
        train = self.split_tokens("train")
        if exact:
            self.meta["expected_train_tokens"] = train
        else:
            self.meta["complete"] = False
            total = self.estimated_tokens
            if self.max_tokens is not None:
                total = min(total, self.max_tokens) if total else self.max_tokens
            if total:
                self.meta["expected_train_tokens"] = max(train, total - self.val_tokens)
        write_meta(self.out_dir, self.meta)


class DirectoryLock:
    """An exclusive lock on a data directory so two prepare_data.py runs never interleave."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / ".prepare.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"another prepare_data.py is writing to {self.path.parent}; wait for it to "
                            "finish") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temporary files of an interrupted write (only call while holding the lock)."""
    for path in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()
