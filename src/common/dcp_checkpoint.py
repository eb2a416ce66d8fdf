"""Sharded checkpoints under `--parallel fsdp`: PyTorch Distributed Checkpoint (DCP) directories with
the guarantees of the suite's `.pt` files (names, format and validation: common.checkpoint).

A save, on every rank:

1. The ranks agree that the previous save is complete everywhere (one small control collective;
   a failure on any rank stops every rank with its reason) and on the new save's temporary
   directory.
2. `dcp.async_save` copies this rank's shards of the model and optimizer state into host memory
   (the only part the training step waits for: the snapshot) and writes them in a background
   thread, on a process group of their own (gloo), so its collectives never interleave with the
   training's or the control group's. Each rank writes its own part (`__R_0.distcp`) and
   hashes it; nothing is gathered on one rank. DCP's coordinator writes `.metadata` last.
   `--async_checkpoint false`, the final save and a shutdown save use `dcp.save` and wait.
3. Rank 0, in a thread of its own once the parts are written: `train_state.pt` (everything but
   the model and optimizer: step, config, loader position, every rank's RNG state...), the
   manifest of every file's sha256, then each name of the save (a directory of hard links),
   its sidecar last, then rotation (common.checkpoint's protocol).

At most one save is in flight. Loading reshards: a checkpoint written by any number of ranks,
sharded or not, loads into any world size and either mode (`load_dcp_weights`). DCP keeps its
metadata in a pickle; it is read by an unpickler that builds DCP's own metadata classes and
nothing else, and non-tensor values load with `torch.load(weights_only=True)`.

At the end of a run `close()` waits for the save in flight; the save group goes with the others
in common.dist.destroy (which also explains the abort at exit a bare DCP script can meet).
"""
from __future__ import annotations

import contextlib
import json
import logging
import pickle
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from common.checkpoint import (
    DCP_PART_HASHES,
    DCP_SUFFIX,
    DCP_TRAIN_STATE,
    TMP_PREFIX,
    Checkpointer,
    CheckpointError,
    new_token,
    remove_temps,
    seal_dcp_directory,
    sidecar_record,
    snapshot_state,
    write_state,
)
from common.dist import DistContext, all_gather_objects, control_timeout, rank0_decides
from common.errors import UserError
from common.fp8 import is_extra_state_key
from common.fsutil import atomic_write_text, format_bytes, sha256_file

log = logging.getLogger(__name__)

WEIGHT_KEYS = ("model", "optimizer")

# DCP warns at every save and load without a process group that it assumes a single process:
# here that is always the intent (one process, or the exporter).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


# ----------------------------------------------------------------------------- reading safely

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    *((_METADATA_MODULE, name) for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                             "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                             "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and sizes, nothing else (a pickle can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with the metadata read by `_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor values (optimizer hyperparameters) loaded weights_only."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def first_failure(err: BaseException) -> BaseException:
    """What went wrong: DCP raises CheckpointException (a BaseException, not an Exception) holding
    each failed rank's own exception; the first of those."""
    if isinstance(err, CheckpointException) and err.failures:
        return next(iter(err.failures.values()))[0]
    return err


def _unusable(path: str | Path, err: BaseException) -> UserError:
    cause = first_failure(err)
    text = " ".join(str(cause).split())[:300]
    return UserError(f"cannot load checkpoint {path}: {type(cause).__name__}: {text}")


def load_dcp_weights(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """The model and optimizer state of a DCP checkpoint into `model` (sharded or not) and
    `optimizer`; every rank of the default group takes part. DCP reads each rank's part of every
    tensor, whatever world size and mode wrote it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    # TransformerEngine's FP8 scaling state is never in a DCP checkpoint (TE linears are not
    # sharded: common.fp8.check_parallel); an FP8 model resuming one starts its scaling afresh.
    fresh = [key for key in model_state if is_extra_state_key(key)]
    for key in fresh:
        del model_state[key]
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as err:  # on every rank: DCP shares a rank's failure
        raise _unusable(path, err) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=not fresh))


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a DCP checkpoint, read in this process alone (no process group):
    what the exporter and tests use. Every tensor is assembled from the parts of every rank."""
    prefix = "model."
    try:
        metadata = SafeFileSystemReader(path).read_metadata()
        state = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
                 for key, meta in metadata.state_dict_metadata.items()
                 if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
        nested = {"model": state}
        dcp.load(nested, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as err:
        raise _unusable(path, err) from None
    return nested["model"]


# ----------------------------------------------------------------------------- writing

class _ErrnoKeepingFileSystem(FileSystem):
    """DCP's file system, keeping the OSError of a failed write: torch.save's writer re-raises it
    as a RuntimeError without the errno ("unexpected pos ..."), where the user should read "No
    space left on device"."""

    error: OSError | None = None

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        try:
            with super().create_stream(path, mode) as stream:
                yield _ErrnoKeepingStream(stream, self) if "w" in mode else stream
        except OSError as err:  # opening, or the flush at close
            self.error = err
            raise


class _ErrnoKeepingStream:
    def __init__(self, stream: Any, fs: _ErrnoKeepingFileSystem) -> None:
        self._stream, self._fs = stream, fs

    def write(self, data: Any) -> int:
        try:
            return self._stream.write(data)
        except OSError as err:
            self._fs.error = err
            raise

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno...: the file's own
        return getattr(self._stream, name)


class _HashingWriter(FileSystemWriter):
    """DCP's file writer that also records the sha256 of the parts this rank wrote (in a
    DCP_PART_HASHES file beside them), so the manifest needs no rank to read another's part; a
    failed write raises its OSError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fs = _ErrnoKeepingFileSystem()

    def write_data(self, plan: Any, planner: Any) -> Any:
        self.fs.error = None
        try:
            future = super().write_data(plan, planner)  # the parts are written and fsynced on return
        except Exception as exc:
            if self.fs.error is not None and self.fs.error is not exc:
                raise self.fs.error from exc
            raise
        directory = Path(self.path)
        files = sorted({result.storage_data.relative_path for result in future.value()})
        prefix = plan.storage_data.prefix  # "__R_": this rank's parts
        atomic_write_text(directory / f"{DCP_PART_HASHES}{prefix.strip('_')}.json",
                          json.dumps({name: sha256_file(directory / name) for name in files}))
        return future


class DCPCheckpointer(Checkpointer):
    """Saves `.dcp` checkpoints; every rank calls `save`, `settle`, `check_failed` and `wait`.

    `save(state, ...)`: `state` holds "model" and "optimizer" (DCP state dicts: this rank's
    shards) on every rank, and on rank 0 everything else a checkpoint holds.
    """

    suffix = DCP_SUFFIX
    collective = True

    def __init__(self, directory: str | Path, *, ctx: DistContext, keep_rolling: int, keep_epoch: int,
                 async_save: bool) -> None:
        super().__init__(directory, keep_rolling=keep_rolling, keep_epoch=keep_epoch, async_save=async_save,
                         enabled=ctx.is_main)
        self.ctx = ctx
        self.group = None
        if ctx.distributed:  # a rank writes for as long as the slowest: the control group's timeout
            self.group = dist.new_group(backend="gloo", timeout=control_timeout(ctx.timeout_s))
        # Reused from save to save: its staging buffers too (pinned host memory on CUDA).
        self._writer = _HashingWriter(self.directory, cache_staged_state_dict=torch.cuda.is_available())
        self._upload: Future | None = None
        self._upload_dir: Path | None = None

    def total_bytes(self, local_bytes: int) -> int:
        """Every rank writes its share: the checkpoint is the sum."""
        return sum(all_gather_objects(local_bytes, self.ctx))

    @property
    def in_flight(self) -> bool:
        return super().in_flight or (self._upload is not None and not self._upload.done())

    # ---- saving ---------------------------------------------------------------------------

    def save(self, state: dict, *, step: int, epoch: int, val_loss: float | None, tiers: Any,
             wait: bool = False) -> None:
        tiers = list(tiers)
        names = self._names_for(tiers, step, epoch)
        if not names:
            return
        token = self._agree_and_name()
        weights = {key: state[key] for key in WEIGHT_KEYS}
        directory = self.directory / f"{TMP_PREFIX}{token}{DCP_SUFFIX}"
        train_state = snapshot_state({k: v for k, v in state.items() if k not in WEIGHT_KEYS}) \
            if self.ctx.is_main else None

        def publish() -> None:
            self._publish_save(directory, token, train_state, names, step, epoch, val_loss)

        if wait or not self.async_save or "final" in tiers:
            try:
                dcp.save(weights, checkpoint_id=directory, storage_writer=self._writer, process_group=self.group)
            except (Exception, CheckpointException) as err:  # DCP raises it on every rank
                if self.ctx.is_main:
                    remove_temps(self.directory, token)
                raise CheckpointError(self._failure_message(first_failure(err))) from None
            rank0_decides(publish, self.ctx)  # a failure on rank 0 stops every rank alike
            return
        self._upload = dcp.async_save(weights, checkpoint_id=directory, storage_writer=self._writer,
                                      process_group=self.group)
        self._upload_dir = directory
        if self.ctx.is_main:
            upload = self._upload
            self._start_background(lambda: (self._upload_result(upload), publish()))

    def _agree_and_name(self) -> str:
        """Collective: the previous save is complete on every rank (else CheckpointError on every
        rank, with the first rank's reason); the new save's token, rank 0's."""
        error = self._settle_locally()
        outcomes = all_gather_objects((error, new_token()), self.ctx)
        errors = [e for e, _ in outcomes if e]
        if errors:
            raise CheckpointError(errors[0])
        return outcomes[0][1]

    def settle(self) -> None:
        """Collective: wait for the in-flight save on every rank; CheckpointError on every rank if
        it failed on any."""
        self._agree_and_name()

    def _settle_locally(self) -> str | None:
        try:
            self.wait()
        except CheckpointError as err:
            return str(err)
        return None

    def _upload_result(self, upload: Future) -> None:
        try:
            upload.result()
        except (Exception, CheckpointException) as err:
            raise CheckpointError(self._failure_message(first_failure(err))) from None

    def wait(self) -> None:
        """This rank's part: its parts written (and on rank 0 the save published)."""
        upload, self._upload = self._upload, None
        error: CheckpointError | None = None
        if upload is not None:
            try:
                self._upload_result(upload)
            except CheckpointError as err:
                error = err
        super().wait()  # rank 0's publication: its failure (or the same upload failure) first
        if error is not None:
            raise error

    def check_failed(self) -> None:
        upload = self._upload
        if upload is not None and upload.done():
            self._upload = None
            self._upload_result(upload)
        super().check_failed()

    def _publish_save(self, directory: Path, token: str, train_state: dict | None, names: list[str], step: int,
                      epoch: int, val_loss: float | None) -> None:
        """Rank 0, once every rank's part is written: train_state.pt, the manifest, the names."""
        assert train_state is not None
        started = time.perf_counter()
        try:
            write_state(train_state, directory / DCP_TRAIN_STATE)
            sizes, manifest_sha = seal_dcp_directory(directory)
            size = sum(sizes.values())
            record = sidecar_record(None, train_state, step=step, epoch=epoch, val_loss=val_loss, size=size,
                                     sha256=manifest_sha, saved_as=names)
            record.update({"format": "dcp", "files": sizes})
            for name in names:
                self._publish(directory, name, token, dict(record, file=name))
        except BaseException as exc:
            remove_temps(self.directory, token)
            if not isinstance(exc, Exception):
                raise
            raise CheckpointError(self._failure_message(exc)) from exc
        remove_temps(self.directory, token)  # the save's own directory: the names hold their links
        try:
            self._rotate(set(names))
        except OSError as err:
            log.warning("could not rotate old checkpoints in %s: %s", self.directory, err.strerror or err)
        log.info("saved checkpoint step %d as %s (%s in %d files, %.2f s after its parts)", step, ", ".join(names),
                 format_bytes(size), len(sizes), time.perf_counter() - started)
