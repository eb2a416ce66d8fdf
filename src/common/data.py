"""Token shards on disk, the dataset index, and the resumable sharded loaders.

Shard format (llm.c / modded-nanogpt): a header of 256 little-endian int32 ([0] = 20240520,
[1] = 1, [2] = token count) followed by the tokens as little-endian uint16. `NAME.bin.lz4` holds
exactly those bytes in one LZ4 frame. `meta.json` beside the shards lists every finished shard;
a directory of llm.c shards without it is indexed from the file names.

Sample order. A window is `block_size + 1` tokens; window i of a shard covers tokens
[i*T, i*T + T + 1) (consecutive windows share one boundary token, as in nanoGPT/llm.c). Each
epoch visits every window of every train shard once: the shard order and the window order inside
each shard are permutations drawn from numpy PCG64 generators seeded with (seed, epoch) -- never
global RNG state. Shuffling inside shards (rather than across all windows at once) keeps only one
or two decompressed shards in memory. Consecutive epochs form one global stream of windows; an
optimizer step consumes the next G = B * A * W windows of it, so the samples of a step do not
depend on how they are split between ranks and micro-steps.
"""
from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lz4.frame
import numpy as np

from common.errors import UserError
from common.fsutil import atomic_write_bytes

if TYPE_CHECKING:  # torch is imported lazily: prepare_data.py must not pay for it
    import torch

log = logging.getLogger(__name__)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16  # uint16 tokens
MAX_SHARD_TOKENS = (1 << 31) - 1  # the int32 count in the header
META_NAME = "meta.json"
META_FORMAT_VERSION = 1
STATE_VERSION = 1
LZ4_SUFFIX = ".lz4"

# Used for directories of llm.c shards that come without meta.json.
GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256

_PREPARE_HINT = "prepare it with `python src/prepare_data.py --dataset stdlib --out {dir}`"


# ----------------------------------------------------------------------------- files


def is_compressed(path: Path | str) -> bool:
    return str(path).endswith(LZ4_SUFFIX)


# ----------------------------------------------------------------------------- shard format


def shard_bytes(tokens: np.ndarray) -> bytes:
    """The uncompressed file contents of a shard holding `tokens`."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    return header.tobytes() + np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()


def tokens_sha256(tokens: np.ndarray) -> str:
    """Hash of the token bytes alone: the same for the .bin and .bin.lz4 form of a shard."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes()).hexdigest()


def write_shard(path: Path, tokens: np.ndarray) -> dict[str, Any]:
    """Write a shard atomically (LZ4 when the name ends in .lz4); its meta.json entry.

    `sha256` is of the file as stored (what `sha256sum` prints), `tokens_sha256` of the tokens.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and int(tokens.max()) >= MAX_VOCAB:
        raise ValueError(f"{path.name}: token id {int(tokens.max())} does not fit the uint16 shard format")
    data = shard_bytes(tokens)
    if is_compressed(path):
        data = lz4.frame.compress(data, store_size=True, content_checksum=True)
    atomic_write_bytes(path, data)
    return {"file": path.name, "tokens": int(len(tokens)), "sha256": hashlib.sha256(data).hexdigest(),
            "tokens_sha256": tokens_sha256(tokens)}


def _check_header(path: Path, header: bytes, data_size: int | None) -> int:
    """Validate a header (and the uncompressed size when known); the token count."""
    if len(header) < HEADER_BYTES:
        raise UserError(f"{path}: truncated shard ({len(header)} bytes, shorter than the {HEADER_BYTES}-byte "
                        "header); delete it and rerun prepare_data.py")
    magic, version, ntok = (int(v) for v in np.frombuffer(header, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise UserError(f"{path}: not a token shard (magic {magic}, expected {SHARD_MAGIC}); "
                        "remove it from the data directory")
    if version != SHARD_VERSION:
        hint = " (uint32 llama-3 tokens)" if version == 2 else ""
        raise UserError(f"{path}: shard format version {version}{hint} is not supported, only version "
                        f"{SHARD_VERSION} (uint16 tokens)")
    if ntok < 0:
        raise UserError(f"{path}: corrupt shard header (token count {ntok})")
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * ntok
    if data_size is not None and data_size != expected:
        raise UserError(f"{path}: truncated or corrupt shard: the header says {ntok} tokens ({expected} bytes) "
                        f"but it holds {data_size} bytes; delete it and rerun prepare_data.py")
    return ntok


def read_shard_header(path: Path) -> int:
    """Token count of a shard after checking its header and size, without reading the tokens.

    For .lz4 the size is checked against the frame's recorded content size; the data itself
    is verified (checksum, length) when the shard is read.
    """
    path = Path(path)
    try:
        if not is_compressed(path):
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
            return _check_header(path, header, path.stat().st_size)
        with open(path, "rb") as f:
            info = lz4.frame.get_frame_info(f.read(32))
        with lz4.frame.open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        return _check_header(path, header, info["content_size"] or None)
    except (RuntimeError, EOFError) as err:  # lz4 reports damage as RuntimeError
        raise UserError(f"{path}: truncated or corrupt LZ4 shard ({err}); delete it and rerun "
                        "prepare_data.py") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read shard ({err.strerror or err})") from None


def read_shard(path: Path) -> np.ndarray:
    """All tokens of a shard as uint16: a read-only memmap for .bin, decompressed for .bin.lz4."""
    path = Path(path)
    if not is_compressed(path):
        ntok = read_shard_header(path)
        if ntok == 0:
            return np.empty(0, dtype=TOKEN_DTYPE)
        # A plain ndarray view of the mapping: slicing np.memmap objects costs Python overhead per window.
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(ntok,)).view(np.ndarray)
    try:
        data = lz4.frame.decompress(path.read_bytes())
    except RuntimeError as err:
        raise UserError(f"{path}: truncated or corrupt LZ4 shard ({err}); delete it and rerun "
                        "prepare_data.py") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read shard ({err.strerror or err})") from None
    ntok = _check_header(path, data[:HEADER_BYTES], len(data))
    return np.frombuffer(data, dtype=TOKEN_DTYPE, offset=HEADER_BYTES, count=ntok)


def _sample_digest(path: Path, ntok: int) -> str:
    """A cheap content digest (token count and the first 32k tokens) for shards without meta."""
    want = HEADER_BYTES + TOKEN_DTYPE.itemsize * min(ntok, 32768)
    opener = lz4.frame.open if is_compressed(path) else open
    with opener(path, "rb") as f:
        head = f.read(want)
    return hashlib.sha256(str(ntok).encode() + head).hexdigest()


# ----------------------------------------------------------------------------- meta.json


def read_meta(data_dir: Path) -> dict[str, Any] | None:
    """meta.json of a data directory, or None when there is none."""
    path = Path(data_dir) / META_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); restore it or prepare the data again") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != META_FORMAT_VERSION:
        raise UserError(f"{path}: unsupported format_version {version!r} (this version reads {META_FORMAT_VERSION})")
    return meta


def write_meta(data_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(Path(data_dir) / META_NAME, (json.dumps(meta, indent=1) + "\n").encode())


# ----------------------------------------------------------------------------- index


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    tokens: int
    tokens_sha256: str | None = None

    def windows(self, block_size: int) -> int:
        """Windows of block_size + 1 tokens, stride block_size."""
        return max(0, (self.tokens - 1) // block_size)


_SPLIT_RE = re.compile(r"(?:^|_)(train|val)(?:_|$)")


def _split_of(name: str) -> str | None:
    """`train`/`val` for llm.c-style names (fineweb_train_000001.bin, val_000000.bin, ..._val.bin)."""
    stem = name[: -len(LZ4_SUFFIX)] if is_compressed(name) else name
    if not stem.endswith(".bin"):
        return None
    found = _SPLIT_RE.findall(stem[: -len(".bin")])
    return found[-1] if found else None


def shard_fingerprint(data_dir: Path, shards: list[ShardInfo], tokenizer: str) -> str:
    """Identity of the data an epoch is made of: shard names, sizes and contents."""
    parts = []
    for s in shards:
        digest = s.tokens_sha256 or _sample_digest(Path(data_dir) / s.file, s.tokens)
        parts.append([s.file, s.tokens, digest])
    return hashlib.sha256(json.dumps([tokenizer, parts]).encode()).hexdigest()


class DatasetIndex:
    """The shards of a data directory, from meta.json or (llm.c directories) from the files."""

    def __init__(self, data_dir: Path, shards: list[ShardInfo], meta: dict[str, Any] | None) -> None:
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.meta = meta
        self.tokenizer_name: str = meta.get("tokenizer", "gpt2") if meta else "gpt2"
        self.vocab_size: int = int(meta.get("vocab_size", GPT2_VOCAB_SIZE)) if meta else GPT2_VOCAB_SIZE
        self.eot_token: int = int(meta.get("eot_token", GPT2_EOT)) if meta else GPT2_EOT

    @classmethod
    def open(cls, data_dir: Path | str) -> DatasetIndex:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"data directory {data_dir} not found; {_PREPARE_HINT.format(dir=data_dir)}")
        meta = read_meta(data_dir)
        shards = cls._from_meta(data_dir, meta) if meta is not None else cls._from_files(data_dir)
        for s in shards:
            ntok = read_shard_header(data_dir / s.file)
            if ntok != s.tokens:
                raise UserError(f"{data_dir / s.file}: holds {ntok} tokens but {META_NAME} says {s.tokens}; "
                                "the shard or meta.json was changed after preparation")
        return cls(data_dir, shards, meta)

    @staticmethod
    def _from_meta(data_dir: Path, meta: dict[str, Any]) -> list[ShardInfo]:
        shards = []
        for entry in meta.get("shards", []):
            path = data_dir / entry["file"]
            if not path.is_file():
                raise UserError(f"{path}: listed in {data_dir / META_NAME} but missing; restore it or "
                                "rerun prepare_data.py with the same flags to rewrite it")
            shards.append(ShardInfo(entry["file"], entry["split"], int(entry["tokens"]), entry.get("tokens_sha256")))
        return shards

    @staticmethod
    def _from_files(data_dir: Path) -> list[ShardInfo]:
        shards = []
        for path in sorted(data_dir.iterdir()):
            split = _split_of(path.name)
            if split and path.is_file() and not path.name.startswith("."):
                shards.append(ShardInfo(path.name, split, read_shard_header(path)))
        if not shards:
            raise UserError(f"{data_dir} has no {META_NAME} and no llm.c shards (*_train_*.bin, *_val_*.bin); "
                            + _PREPARE_HINT.format(dir=data_dir))
        return shards

    @property
    def train_shards(self) -> list[ShardInfo]:
        return sorted((s for s in self.shards if s.split == "train"), key=lambda s: s.file)

    @property
    def val_shards(self) -> list[ShardInfo]:
        return sorted((s for s in self.shards if s.split == "val"), key=lambda s: s.file)

    @property
    def complete(self) -> bool:
        """False while prepare_data.py may still add shards (always True without meta.json)."""
        return bool(self.meta.get("complete", False)) if self.meta else True

    def train_tokens(self) -> int:
        return sum(s.tokens for s in self.train_shards)

    def val_tokens(self) -> int:
        return sum(s.tokens for s in self.val_shards)

    def expected_train_tokens(self) -> int:
        """meta.json's expected total of training tokens (known before the shards exist), else the present total."""
        expected = self.meta.get("expected_train_tokens") if self.meta else None
        return int(expected) if expected else self.train_tokens()


# ----------------------------------------------------------------------------- sample order


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % (1 << 64), *keys])))


class _EpochPlan:
    """The window order of one epoch: shards in a shuffled order, windows shuffled inside each."""

    _PERM_CACHE = 4  # per-shard permutations kept (about 8 bytes per window each)

    def __init__(self, epoch: int, shards: list[ShardInfo], seed: int, block_size: int) -> None:
        self.epoch, self.shards, self.seed, self.block_size = epoch, shards, seed, block_size
        self.visit = _rng(seed, epoch, 0).permutation(len(shards))
        counts = np.array([shards[i].windows(block_size) for i in self.visit], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.samples = int(self.starts[-1])
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fingerprint: str | None = None

    def window(self, pos: int) -> tuple[ShardInfo, int]:
        """(shard, window index in that shard) at position `pos` of this epoch's order."""
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        shard = self.shards[self.visit[k]]
        return shard, int(self._perm(k, shard)[pos - self.starts[k]])

    def _perm(self, k: int, shard: ShardInfo) -> np.ndarray:
        perm = self._perms.get(k)
        if perm is None:
            perm = _rng(self.seed, self.epoch, k + 1).permutation(shard.windows(self.block_size))
            self._perms[k] = perm
            if len(self._perms) > self._PERM_CACHE:
                self._perms.popitem(last=False)
        return perm

    def fingerprint(self, data_dir: Path, tokenizer: str) -> str:
        if self._fingerprint is None:
            self._fingerprint = shard_fingerprint(data_dir, self.shards, tokenizer)
        return self._fingerprint


class _ShardCache:
    """The few shards in use: decompressing an lz4 shard is paid once, not per window."""

    def __init__(self, data_dir: Path, capacity: int) -> None:
        self.data_dir, self.capacity = data_dir, max(1, capacity)
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, file: str) -> np.ndarray:
        arr = self._arrays.pop(file, None)
        if arr is None:
            arr = read_shard(self.data_dir / file)
        self._arrays[file] = arr
        while len(self._arrays) > self.capacity:
            self._arrays.popitem(last=False)
        return arr


def _torch_device(device: Any) -> torch.device:
    import torch
    return device if isinstance(device, torch.device) else torch.device(device)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return x
    return x.to(device, non_blocking=x.is_pinned())


def _gather(cache: _ShardCache, windows: list[tuple[ShardInfo, int]], block_size: int,
            pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y int64 (B, T) for the given windows; pinned memory when feeding a CUDA device."""
    import torch
    shape = (len(windows), block_size)
    x = torch.empty(shape, dtype=torch.int64, pin_memory=pin)
    y = torch.empty(shape, dtype=torch.int64, pin_memory=pin)
    xn, yn = x.numpy(), y.numpy()
    for i, (shard, w) in enumerate(windows):
        tokens = cache.get(shard.file)[w * block_size: w * block_size + block_size + 1]
        xn[i] = tokens[:-1]
        yn[i] = tokens[1:]
    return x, y


# ----------------------------------------------------------------------------- train loader


class ShardedTrainLoader:
    """Serves this rank's micro-batches of the world-size-free global window stream.

    Step s consumes global positions [s*G, (s+1)*G) with G = B*A*W; micro-step m of rank r gets
    positions s*G + (m*W + r)*B + [0, B). Positions count from the state the loader started at
    (a fresh start or `load_state_dict`). A background thread reads and decompresses the next
    micro-batches; `state_dict()` reflects the batches served, not those prefetched.

    Epoch e's shard list is fixed when the stream first needs epoch e (at a step start), from a
    fresh scan of the directory, so shards written meanwhile by prepare_data.py join then. Under
    torch.distributed the list of rank 0 is broadcast so every rank builds the same order.
    """

    def __init__(self, data_dir: Path | str, block_size: int, micro_batch_size: int, grad_accum_steps: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device: Any = "cpu", *,
                 prefetch: int = 4, cache_shards: int = 2, sync_shards: bool | None = None) -> None:
        if min(block_size, micro_batch_size, grad_accum_steps, world_size) < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: block_size={block_size} micro_batch_size={micro_batch_size} "
                             f"grad_accum_steps={grad_accum_steps} rank={rank} world_size={world_size}")
        self.data_dir = Path(data_dir)
        self.block_size, self.batch, self.accum = block_size, micro_batch_size, grad_accum_steps
        self.rank, self.world = rank, world_size
        self.seed = seed
        self.device = _torch_device(device)
        self.samples_per_step = micro_batch_size * grad_accum_steps * world_size
        self._prefetch_depth = max(1, prefetch)
        self._cache_shards = cache_shards
        self._sync = self._want_sync() if sync_shards is None else sync_shards
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self._prefetch_depth)
        self.index = DatasetIndex.open(self.data_dir)
        self._reset(self._make_plan(0, self._epoch_shards()), position=0)

    # -- public --------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epoch of the last served batch (of the starting position before the first)."""
        return self._epoch

    def epoch_progress(self) -> float:
        """Epochs completed at the current step boundary, with the fraction of the running one
        (e.g. 2.25). The same on every rank, unlike `epoch`, which follows this rank's windows."""
        offset = self._served // self.accum * self.samples_per_step
        i = bisect.bisect_right(self._starts, offset) - 1
        plan = self._plans[i]
        return plan.epoch + (offset - self._starts[i]) / plan.samples

    @property
    def samples_per_epoch(self) -> int:
        """Windows in the current epoch."""
        return self._plan_of_epoch(self._epoch).samples

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: x, y int64 (B, T) on the loader's device."""
        k = self._served
        if k % self.accum == 0:
            self._ensure_plans((k // self.accum + 1) * self.samples_per_step)
        if self._thread is None:
            self._start_prefetch()
        got_k, epoch, payload = self._take()
        assert got_k == k, (got_k, k)
        if isinstance(payload, BaseException):
            self._stop_prefetch()
            raise payload
        x, y = payload
        self._served += 1
        self._epoch = epoch
        return _to_device(x, self.device), _to_device(y, self.device)

    def state_dict(self) -> dict[str, Any]:
        """The position at the current step boundary; the same on every rank, for any world size."""
        if self._served % self.accum:
            raise RuntimeError(f"state_dict() between micro-steps ({self._served % self.accum} of "
                               f"{self.accum} served); take it at a step boundary")
        offset = self._served // self.accum * self.samples_per_step
        i = bisect.bisect_right(self._starts, offset) - 1
        plan = self._plans[i]
        return {
            "version": STATE_VERSION,
            "epoch": plan.epoch,
            "position": offset - self._starts[i],
            "samples_per_epoch": plan.samples,
            "seed": self.seed,
            "block_size": self.block_size,
            "tokenizer": self.index.tokenizer_name,
            "fingerprint": plan.fingerprint(self.data_dir, self.index.tokenizer_name),
            "shards": [{"file": s.file, "tokens": s.tokens} for s in plan.shards],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; refuses state of another dataset or block size."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')!r} is not supported "
                            f"(expected {STATE_VERSION})")
        if state["block_size"] != self.block_size:
            raise UserError(f"the data state was saved with block_size {state['block_size']} but this run uses "
                            f"{self.block_size}; resume with --block_size {state['block_size']} or start a fresh run")
        self.index = DatasetIndex.open(self.data_dir)
        if state.get("tokenizer", self.index.tokenizer_name) != self.index.tokenizer_name:
            raise UserError(f"the data state was saved on {state['tokenizer']} tokens but {self.data_dir} holds "
                            f"{self.index.tokenizer_name} tokens; resume with the original --data_dir")
        shards = self._match_shards(state["shards"])
        fingerprint = shard_fingerprint(self.data_dir, shards, self.index.tokenizer_name)
        if fingerprint != state["fingerprint"]:
            raise UserError(f"the data state belongs to another dataset: the shards of its epoch {state['epoch']} "
                            f"have other contents in {self.data_dir}; resume with the original --data_dir")
        seed, position = int(state["seed"]), int(state["position"])
        plan = self._make_plan(int(state["epoch"]), shards, seed)
        if not 0 <= position <= plan.samples:
            raise UserError(f"the data state's position {position} is outside its epoch of {plan.samples} "
                            "windows; the checkpoint is damaged")
        if seed != self.seed:
            log.info("data order continues with the saved seed %d (not %d)", seed, self.seed)
            self.seed = seed
        self._stop_prefetch()
        self._reset(plan, position)

    def close(self) -> None:
        self._stop_prefetch()

    def __enter__(self) -> ShardedTrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- epochs --------------------------------------------------------------------------

    def _reset(self, plan: _EpochPlan, position: int) -> None:
        """Start the stream at `position` of `plan`'s epoch: offsets are counted from there."""
        with self._cond:
            self._plans = [plan]
            self._starts = [-position]  # stream offset at which each plan's epoch begins
            self._served = 0
            self._epoch = plan.epoch
        self._queue = queue.Queue(maxsize=self._prefetch_depth)

    def _make_plan(self, epoch: int, shards: list[ShardInfo], seed: int | None = None) -> _EpochPlan:
        plan = _EpochPlan(epoch, shards, self.seed if seed is None else seed, self.block_size)
        if plan.samples == 0:
            tokens = sum(s.tokens for s in shards)
            raise UserError(f"{self.data_dir} has no training window of block_size + 1 = {self.block_size + 1} "
                            f"tokens (train shards hold {tokens} tokens); prepare more data or lower --block_size")
        return plan

    def _match_shards(self, saved: list[dict[str, Any]]) -> list[ShardInfo]:
        present = {s.file: s for s in self.index.train_shards}
        shards = []
        for entry in saved:
            shard = present.get(entry["file"])
            if shard is None or shard.tokens != entry["tokens"]:
                found = f"has {shard.tokens} tokens" if shard else "is missing"
                raise UserError(f"the data state belongs to another dataset: its shard {entry['file']} "
                                f"({entry['tokens']} tokens) {found} in {self.data_dir}; resume with the "
                                "original --data_dir")
            shards.append(shard)
        return shards

    def _want_sync(self) -> bool:
        if self.world == 1:
            return False
        import torch.distributed as dist
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() == self.world

    def _epoch_shards(self) -> list[ShardInfo]:
        """The train shards for a new epoch: a fresh scan, agreed across ranks when distributed."""
        if not self._sync:
            self.index = DatasetIndex.open(self.data_dir)
            return self.index.train_shards
        # Rank 0 scans and sends its list (or its error) so that every rank builds the same order
        # even while prepare_data.py is adding shards, and none waits for a rank that failed.
        import torch
        import torch.distributed as dist
        outcome: list[ShardInfo] | UserError | None = None
        if dist.get_rank() == 0:
            try:
                self.index = DatasetIndex.open(self.data_dir)
                outcome = self.index.train_shards
            except UserError as err:
                outcome = err
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        box = [outcome]
        dist.broadcast_object_list(box, src=0, device=device)
        if isinstance(box[0], UserError):
            raise box[0]
        return box[0]

    def _ensure_plans(self, end_offset: int) -> None:
        """Fix the epochs the stream needs up to `end_offset` (called by every rank at step starts)."""
        step_start = end_offset - self.samples_per_step
        with self._cond:  # forget epochs that are completely behind
            while len(self._plans) > 1 and self._plans[0].epoch < self._epoch and self._starts[1] <= step_start:
                del self._plans[0], self._starts[0]
        while self._starts[-1] + self._plans[-1].samples < end_offset:
            plan = self._make_plan(self._plans[-1].epoch + 1, self._epoch_shards())
            with self._cond:
                self._starts.append(self._starts[-1] + self._plans[-1].samples)
                self._plans.append(plan)
                self._cond.notify_all()
            if len(plan.shards) != len(self._plans[-2].shards):
                log.info("epoch %d: %d train shards (%d windows)", plan.epoch, len(plan.shards), plan.samples)

    def _plan_of_epoch(self, epoch: int) -> _EpochPlan:
        return next(p for p in reversed(self._plans) if p.epoch == epoch)

    def _covered(self, end_offset: int) -> bool:
        return end_offset <= self._starts[-1] + self._plans[-1].samples

    def _windows(self, k: int) -> tuple[list[tuple[ShardInfo, int]], int]:
        """The windows of micro-batch k (counted from the start state) and the epoch of its last one."""
        step, micro = divmod(k, self.accum)
        first = step * self.samples_per_step + (micro * self.world + self.rank) * self.batch
        out = []
        epoch = self._epoch
        for offset in range(first, first + self.batch):
            i = bisect.bisect_right(self._starts, offset) - 1
            out.append(self._plans[i].window(offset - self._starts[i]))
            epoch = self._plans[i].epoch
        return out, epoch

    # -- prefetching ---------------------------------------------------------------------

    def _start_prefetch(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._prefetch_loop, args=(self._stop, self._queue, self._served),
                                        name="data-prefetch", daemon=True)
        self._thread.start()

    def _stop_prefetch(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()  # unblock a put()
            thread.join(timeout=0.05)
        self._thread = None
        self._queue = queue.Queue(maxsize=self._prefetch_depth)

    def _prefetch_loop(self, stop: threading.Event, out: queue.Queue, k: int) -> None:
        cache = _ShardCache(self.data_dir, self._cache_shards)
        pin = self.device.type == "cuda"
        while not stop.is_set():
            step, micro = divmod(k, self.accum)
            end = step * self.samples_per_step + (micro * self.world + self.rank + 1) * self.batch
            with self._cond:
                while not stop.is_set() and not self._covered(end):
                    self._cond.wait()
                if stop.is_set():
                    return
                windows, epoch = self._windows(k)
            try:
                item: tuple[int, int, Any] = (k, epoch, _gather(cache, windows, self.block_size, pin))
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                item = (k, epoch, err)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[2], BaseException):
                return
            k += 1

    def _take(self) -> tuple[int, int, Any]:
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the data prefetch thread stopped unexpectedly") from None


# ----------------------------------------------------------------------------- validation


class ValReader:
    """The first max_batches * B * W windows of the val shards in file order, the same every run.

    Batch j of rank r holds windows (j*W + r)*B ... +B; every rank yields the same number of
    batches. The rank's windows are read once and kept (they are small).
    """

    def __init__(self, data_dir: Path | str, block_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None, device: Any = "cpu") -> None:
        self.data_dir = Path(data_dir)
        self.block_size, self.batch, self.rank, self.world = block_size, micro_batch_size, rank, world_size
        self.device = _torch_device(device)
        self.shards = DatasetIndex.open(self.data_dir).val_shards
        counts = [s.windows(block_size) for s in self.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        total = int(self._starts[-1])
        per_batch = micro_batch_size * world_size
        self.num_batches = total // per_batch if max_batches is None else min(max_batches, total // per_batch)
        if self.num_batches == 0:
            raise UserError(f"{self.data_dir}: the val shards hold {total} windows of block_size + 1 = "
                            f"{block_size + 1} tokens, fewer than one batch of {per_batch}; prepare with a larger "
                            "--val_tokens or lower --batch_size/--block_size")
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._x is None:
            self._x, self._y = self._load()
        for j in range(self.num_batches):
            rows = slice(j * self.batch, (j + 1) * self.batch)
            yield self._x[rows].to(self.device), self._y[rows].to(self.device)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = []
        for j in range(self.num_batches):
            first = (j * self.world + self.rank) * self.batch
            for g in range(first, first + self.batch):
                k = int(np.searchsorted(self._starts, g, side="right")) - 1
                windows.append((self.shards[k], g - int(self._starts[k])))
        cache = _ShardCache(self.data_dir, capacity=1)  # windows come in file order
        return _gather(cache, windows, self.block_size, pin=False)


# ----------------------------------------------------------------------------- writing


class DatasetWriter:
    """Cuts one token stream into val/train shards and keeps meta.json current.

    Resumable: the shards meta.json already lists are the stream's prefix. Fed the same stream
    again, the writer checks each of them against the tokens (tokens_sha256) without rewriting
    it -- rewriting only a file that has gone missing -- and appends new shards after them.
    The first `val_tokens` tokens of the stream go to val_*, the rest to train_*.
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
        self._buf = np.empty(max([shard_tokens, *(e["tokens"] for e in self.finished)]), dtype=TOKEN_DTYPE)
        self._fill = 0
        self._begin_shard()

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.position >= self.max_tokens

    def add(self, tokens: np.ndarray) -> bool:
        """Append stream tokens; True once --max_tokens is reached (stop feeding)."""
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
        path = self.out_dir / entry["file"]
        if tokens_sha256(tokens) != entry.get("tokens_sha256"):
            raise UserError(f"the source changed since {path.name} was written (its tokens differ now); "
                            f"prepare into a new --out directory (nothing in {self.out_dir} was modified)")
        if not path.exists():
            log.info("%s was missing: rewriting it", path.name)
            write_shard(path, tokens)

    def _write_new(self, tokens: np.ndarray) -> None:
        split = "val" if self.position - len(tokens) < self.val_tokens else "train"
        number = sum(1 for e in self.finished if e["split"] == split)
        name = f"{split}_{number:06d}.bin" + (LZ4_SUFFIX if self.compress else "")
        entry = write_shard(self.out_dir / name, tokens)
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


def existing_shard_files(directory: Path) -> list[str]:
    """Shard-like files in a directory (used to refuse writing over data not ours)."""
    return sorted(p.name for p in Path(directory).iterdir() if _split_of(p.name) and not p.name.startswith("."))


__all__ = [
    "DatasetIndex", "DatasetWriter", "DirectoryLock", "ShardInfo", "ShardedTrainLoader", "ValReader",
    "read_meta", "read_shard", "read_shard_header", "write_meta", "write_shard", "shard_bytes",
    "tokens_sha256", "atomic_write_bytes", "SHARD_MAGIC", "SHARD_VERSION", "HEADER_BYTES", "MAX_VOCAB",
    "MAX_SHARD_TOKENS",
]
