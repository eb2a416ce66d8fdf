"""The reading side of the data layer: the dataset index and the resumable sharded loaders.

The file format (shards, meta.json) is common.shards; prepare_data.py writes it through
common.dataset_writer. torch is imported only when a loader is built.

What is checked when. Opening the index checks meta.json field by field, that every listed shard
lies inside the directory, and every shard's header and size (cheap: one small read per shard).
Each time a loader loads a shard (once per shard per epoch, on the prefetch thread) it also checks
the file's sha256 against meta.json (about 0.14 s per 100M tokens as plain .bin, 0.06 s as the
.bin.lz4 file whose decompression takes 0.44 s anyway) and that no token id reaches the vocabulary
size (0.01 s). `python src/prepare_data.py --verify DIR` checks everything, tokens_sha256 included.

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
import hashlib
import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lz4.frame
import numpy as np

from common.errors import UserError
from common.shards import (
    GPT2_LAYOUT,
    HEADER_BYTES,
    META_NAME,
    ShardInfo,
    ShardLayout,
    check_file_sha256,
    check_token_count,
    check_token_ids,
    is_compressed,
    meta_shards,
    read_meta,
    read_shard,
    read_shard_header,
    shard_like_files,
    shard_path,
    split_of,
)

if TYPE_CHECKING:  # torch is imported when a loader is built, not with this module
    import torch

    from common.dist import DistContext

log = logging.getLogger(__name__)

STATE_VERSION = 1

_PREPARE_HINT = "prepare it with `python src/prepare_data.py --dataset stdlib --out {dir}`"


# ----------------------------------------------------------------------------- index


def _sample_digest(path: Path, ntok: int) -> str:
    """A cheap content digest (token count and the first 32k tokens) for shards without meta."""
    want = HEADER_BYTES + read_shard_header(path).layout.dtype.itemsize * min(ntok, 32768)
    opener = lz4.frame.open if is_compressed(path) else open
    with opener(path, "rb") as f:
        head = f.read(want)
    return hashlib.sha256(str(ntok).encode() + head).hexdigest()


def shard_fingerprint(data_dir: Path, shards: list[ShardInfo], tokenizer: str) -> str:
    """Identity of the data an epoch is made of: shard names, sizes and contents."""
    parts = []
    for s in shards:
        digest = s.tokens_sha256 or _sample_digest(Path(data_dir) / s.file, s.tokens)
        parts.append([s.file, s.tokens, digest])
    return hashlib.sha256(json.dumps([tokenizer, parts]).encode()).hexdigest()


class DatasetIndex:
    """The shards of a data directory, from meta.json or (llm.c directories) from the files.

    Without meta.json the tokenizer is the one llm.c prepares the shards' layout with: GPT-2's
    for uint16 shards, Llama 3's for uint32 ones.
    """

    def __init__(self, data_dir: Path, shards: list[ShardInfo], meta: dict[str, Any] | None,
                 layout: ShardLayout = GPT2_LAYOUT) -> None:
        self.data_dir = Path(data_dir)
        self.shards = shards
        self.meta = meta
        self.tokenizer_name: str = meta["tokenizer"] if meta else layout.tokenizer
        self.vocab_size: int = meta["vocab_size"] if meta else layout.vocab_size
        self.eot_token: int = meta["eot_token"] if meta else layout.eot_token

    @classmethod
    def open(cls, data_dir: Path | str) -> DatasetIndex:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"data directory {data_dir} not found; {_PREPARE_HINT.format(dir=data_dir)}")
        meta = read_meta(data_dir)
        if meta is not None:
            return cls(data_dir, cls._from_meta(data_dir, meta), meta)
        shards, layout = cls._from_files(data_dir)
        return cls(data_dir, shards, None, layout)

    @staticmethod
    def _from_meta(data_dir: Path, meta: dict[str, Any]) -> list[ShardInfo]:
        shards = meta_shards(meta)
        for s in shards:
            path = data_dir / s.file
            if not path.is_file():
                raise UserError(f"{path}: listed in {data_dir / META_NAME} but missing; restore it or "
                                "rerun prepare_data.py with the same flags to rewrite it")
            check_token_count(path, read_shard_header(path).tokens, s)
        return shards

    @staticmethod
    def _from_files(data_dir: Path) -> tuple[list[ShardInfo], ShardLayout]:
        shards = []
        layouts: dict[ShardLayout, str] = {}  # layout -> its first shard
        for name in shard_like_files(data_dir):
            path = shard_path(data_dir, name)
            if path.is_file():
                header = read_shard_header(path)
                shards.append(ShardInfo(name, split_of(name), header.tokens))
                layouts.setdefault(header.layout, name)
        if not shards:
            raise UserError(f"{data_dir} has no {META_NAME} and no llm.c shards (*_train_*.bin, *_val_*.bin); "
                            + _PREPARE_HINT.format(dir=data_dir))
        if len(layouts) > 1:
            mixed = " and ".join(f"{layout.name} ({name})" for layout, name in layouts.items())
            raise UserError(f"{data_dir} mixes shards of two tokenizers' layouts, {mixed}; keep the shards of one "
                            "tokenizer in a directory")
        return shards, next(iter(layouts))

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


def load_shard(data_dir: Path, shard: ShardInfo, vocab_size: int) -> np.ndarray:
    """A shard's tokens after the checks worth their cost at every load (see the module docstring)."""
    path = data_dir / shard.file
    tokens = read_shard(path)
    check_token_count(path, len(tokens), shard)
    check_file_sha256(path, shard.sha256)
    check_token_ids(path, tokens, vocab_size)
    return tokens


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
    """The few shards in use: a shard is loaded and checked once while it stays, not per window."""

    def __init__(self, data_dir: Path, capacity: int, vocab_size: int) -> None:
        self.data_dir, self.capacity, self.vocab_size = data_dir, max(1, capacity), vocab_size
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, shard: ShardInfo) -> np.ndarray:
        arr = self._arrays.pop(shard.file, None)
        if arr is None:
            arr = load_shard(self.data_dir, shard, self.vocab_size)
        self._arrays[shard.file] = arr
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
        tokens = cache.get(shard)[w * block_size: w * block_size + block_size + 1]
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
    fresh scan of the directory, so shards written meanwhile by prepare_data.py join then. In a
    process group (`ctx`), rank 0 scans and every rank receives its index, so all build the same
    order. Each shard is checked when it is loaded (common.shards: size, sha256, and no token id
    >= `vocab_size`, the model's vocabulary; None: the dataset's own).
    """

    def __init__(self, data_dir: Path | str, block_size: int, micro_batch_size: int, grad_accum_steps: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device: Any = "cpu", *,
                 vocab_size: int | None = None, ctx: DistContext | None = None, prefetch: int = 4,
                 cache_shards: int = 2) -> None:
        if min(block_size, micro_batch_size, grad_accum_steps, world_size) < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: block_size={block_size} micro_batch_size={micro_batch_size} "
                             f"grad_accum_steps={grad_accum_steps} rank={rank} world_size={world_size}")
        if ctx is None and world_size > 1 and _in_process_group():
            raise ValueError("a ShardedTrainLoader inside a process group needs ctx=, or the ranks could disagree "
                             "on the shards of an epoch")
        self.data_dir = Path(data_dir)
        self.block_size, self.batch, self.accum = block_size, micro_batch_size, grad_accum_steps
        self.rank, self.world = rank, world_size
        self.seed = seed
        self.device = _torch_device(device)
        self.samples_per_step = micro_batch_size * grad_accum_steps * world_size
        self._ctx = ctx
        self._prefetch_depth = max(1, prefetch)
        self._cache_shards = cache_shards
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self._prefetch_depth)
        self.index = self._scan()
        self.vocab_size = self.index.vocab_size if vocab_size is None else vocab_size
        self._reset(self._make_plan(0, self.index.train_shards), position=0)

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
        self.index = self._scan()
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

    def _scan(self) -> DatasetIndex:
        """A fresh index of the directory, the same on every rank of the process group: rank 0
        scans (even while prepare_data.py adds shards) and sends its result or its error."""
        if self._ctx is None or not self._ctx.distributed:
            return DatasetIndex.open(self.data_dir)
        from common.dist import rank0_decides
        return rank0_decides(lambda: DatasetIndex.open(self.data_dir), self._ctx)

    def _ensure_plans(self, end_offset: int) -> None:
        """Fix the epochs the stream needs up to `end_offset` (called by every rank at step starts)."""
        step_start = end_offset - self.samples_per_step
        with self._cond:  # forget epochs that are completely behind
            while len(self._plans) > 1 and self._plans[0].epoch < self._epoch and self._starts[1] <= step_start:
                del self._plans[0], self._starts[0]
        while self._starts[-1] + self._plans[-1].samples < end_offset:
            self.index = self._scan()
            plan = self._make_plan(self._plans[-1].epoch + 1, self.index.train_shards)
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
        cache = _ShardCache(self.data_dir, self._cache_shards, self.vocab_size)
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
    batches. Build it once, at start: the constructor reads and checks this rank's windows, so a
    directory without one batch of them, or a damaged val shard, is refused before the first step,
    and keeps them in host memory; every iteration serves the same batches again without touching
    the files. `data` may be an already open DatasetIndex (its shard headers are not read again).
    """

    def __init__(self, data: DatasetIndex | Path | str, block_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None, device: Any = "cpu", *,
                 vocab_size: int | None = None) -> None:
        index = data if isinstance(data, DatasetIndex) else DatasetIndex.open(data)
        self.data_dir = index.data_dir
        self.block_size, self.batch, self.rank, self.world = block_size, micro_batch_size, rank, world_size
        self.device = _torch_device(device)
        shards = index.val_shards
        starts = np.concatenate([[0], np.cumsum([s.windows(block_size) for s in shards], dtype=np.int64)])
        total = int(starts[-1])
        per_batch = micro_batch_size * world_size
        self.num_batches = total // per_batch if max_batches is None else min(max_batches, total // per_batch)
        if self.num_batches == 0:
            raise UserError(f"{self.data_dir}: the val shards hold {total} windows of block_size + 1 = "
                            f"{block_size + 1} tokens, fewer than one batch of {per_batch}; prepare with a larger "
                            "--val_tokens or lower --batch_size/--block_size")
        windows = []
        for j in range(self.num_batches):
            first = (j * world_size + rank) * micro_batch_size
            for g in range(first, first + micro_batch_size):
                k = int(np.searchsorted(starts, g, side="right")) - 1
                windows.append((shards[k], g - int(starts[k])))
        # Windows come in file order: one shard in memory at a time.
        cache = _ShardCache(self.data_dir, 1, index.vocab_size if vocab_size is None else vocab_size)
        self._x, self._y = _gather(cache, windows, block_size, pin=self.device.type == "cuda")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for j in range(self.num_batches):
            rows = slice(j * self.batch, (j + 1) * self.batch)
            yield _to_device(self._x[rows], self.device), _to_device(self._y[rows], self.device)


def _in_process_group() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()
