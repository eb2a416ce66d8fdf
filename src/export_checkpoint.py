"""Export a checkpoint of either trainer -- a `.pt` file (FP8-trained or not) or a sharded `.dcp`
directory of an fsdp run -- to one `.pt` file of the plain model's format (the one way to get
weights out), or as a Hugging Face GPT-2.

    python src/export_checkpoint.py checkpoints_fp8/best.pt checkpoints/from_fp8.pt
    python src/export_checkpoint.py checkpoints/latest.dcp weights.pt
    python src/export_checkpoint.py checkpoints/best.pt hf/my_gpt --format hf

A DCP directory is validated against its sidecar (every part's sha256) when it has one, and its
tensors assembled from every rank's part in this one process (no torchrun; memory for the
model's weights only: the optimizer state is not read). The plain output holds the weights as
the ordinary GPT names them (TransformerEngine's FP8 scaling state dropped, DDP / torch.compile
prefixes stripped, float32), the run's config without the FP8 fields, the step, epoch and
validation loss, and a `meta` naming the source and its precision (for a DCP source, `sha256`
is its manifest's). It holds no optimizer state: training from it starts a fresh optimizer.
Beside OUT.pt an OUT.json sidecar (common/checkpoint.py's format) repeats step, epoch, val_loss,
meta, sha256 and size. Both files are written atomically; an existing OUT is kept unless
--force is given.

`--format hf` writes a directory that `transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads
(config.json, model.safetensors, and the tokenizer files of the run's dataset, made offline;
common/hf.py). It is written beside DEST and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import pickle
import shutil
import uuid
from contextlib import AbstractContextManager as ContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import DCP_MANIFEST, DCP_TRAIN_STATE, is_dcp, sidecar_path, validate_checkpoint, write_checkpoint
from common.checkpoint import sha256_file as sha256_of
from common.data import DatasetIndex
from common.errors import UserError, run_cli
from common.fp8 import is_extra_state_key
from common.hf import run_tokenizer_name, write_hf_model, write_tokenizer
from common.model import GPT, GPTConfig
from common.tokenizer import tokenizer_files

log = logging.getLogger("export_checkpoint")

PLAIN_CHECKPOINT_DIR = "./checkpoints"
FP8_CHECKPOINT_DIR = "./checkpoints_fp8"
_FP8_CONFIG_KEYS = ("use_fp8", "require_fp8")
_CARRIED_OVER = ("step", "epoch", "val_loss", "best_val_loss")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile: always leading
NO_OPTIMIZER_NOTE = "weights only: no optimizer state; training from this file starts a fresh optimizer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="export_checkpoint.py",
        description="Convert a checkpoint (either trainer's .pt, or a .dcp directory) into one .pt file the plain "
                    "model loads, or a Hugging Face GPT-2 directory.")
    parser.add_argument("source", type=Path, help="checkpoint: a .pt file or a .dcp directory")
    parser.add_argument("dest", type=Path, help="where to write: OUT.pt, or a directory with --format hf")
    parser.add_argument("--format", choices=("pt", "hf"), default="pt",
                        help="pt: the plain model's checkpoint; hf: a transformers GPT2LMHeadModel directory")
    parser.add_argument("--tokenizer", help="--format hf: the tiktoken encoding to write tokenizer files for "
                                            "(default: the one of the run's dataset)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    return parser.parse_args(argv)


def _safe_globals() -> ContextManager:
    """Allow torch's TorchVersion (a str subclass some checkpoints carry in meta) and nothing else
    beyond what weights_only=True already takes."""
    from torch.torch_version import TorchVersion

    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return allow([TorchVersion]) if allow is not None else contextlib.nullcontext()


def _load_error(path: Path, err: Exception) -> UserError:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(err).__name__)
    return UserError(f"{path}: not a loadable checkpoint: {detail}")


def load_source(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return load_dcp_source(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with _safe_globals():
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as err:
        raise _load_error(path, err) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path}: not a training checkpoint (expected a dict with a 'model' state dict)")
    return ckpt


def load_dcp_source(path: Path) -> dict[str, Any]:
    """A DCP checkpoint as a `.pt` checkpoint's dict: its train_state.pt with the full "model"."""
    from common.dcp_checkpoint import read_model_state

    if not is_dcp(path):
        raise UserError(f"{path}: a directory but not a DCP checkpoint (no {DCP_TRAIN_STATE} and .metadata)")
    if sidecar_path(path).exists():
        ok, why = validate_checkpoint(path, full=True)
        if not ok:
            raise UserError(f"{path}: not usable: {why}")
    try:
        ckpt = torch.load(path / DCP_TRAIN_STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as err:
        raise _load_error(path, err) from None
    ckpt["model"] = read_model_state(path)  # a UserError when the parts do not load
    return ckpt


def source_digest(path: Path) -> str:
    """The sha256 that identifies a source: the file's, or a DCP directory's manifest's."""
    return sha256_of(path / DCP_MANIFEST if path.is_dir() else path)


def plain_config(config: Any) -> Any:
    """The run's config for the plain trainer: FP8 fields removed (it rejects unknown keys)."""
    if not isinstance(config, dict):
        return config
    out = {k: v for k, v in config.items() if k not in _FP8_CONFIG_KEYS and not k.startswith("fp8_")}
    if out.get("checkpoint_dir") == FP8_CHECKPOINT_DIR:
        out["checkpoint_dir"] = PLAIN_CHECKPOINT_DIR
    return out


def plain_values(obj: Any) -> Any:
    """Containers rebuilt with plain str in place of str subclasses (torch's TorchVersion), so the
    export loads with torch.load(weights_only=True) without allowlists."""
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, dict):
        return {plain_values(k): plain_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_values(v) for v in obj)
    return obj


def _unwrapped_key(key: str) -> str:
    """The key without the leading segments DDP and torch.compile add when a wrapped model's
    state dict is saved (the trainer saves the unwrapped model's, so its keys have none)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's data: two state-dict entries of one tied parameter share it."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype, tensor.device.type)


def export_plain_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An FP8/TE-trained model's state dict in the plain GPT's format.

    Drops ``*._extra_state`` (TE's FP8 scaling state: the plain model has none), strips leading
    ``module.`` / ``_orig_mod.`` segments and casts floating tensors to float32. TE Linear weights
    are (out_features, in_features) like nn.Linear, and TE 2.x keeps no state-dict entry for the
    bias of a bias-free layer, so the rest loads as it is. Tensors shared in the input (the tied
    embedding and output head) stay shared.
    """
    out: dict[str, torch.Tensor] = {}
    converted: dict[tuple[Any, ...], torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_extra_state_key(key):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        name = _unwrapped_key(key)
        if name in out:
            raise ValueError(f"state dict keys {key!r} and another both map to {name!r}")
        ident = _storage_key(value)
        if ident not in converted:
            tensor = value.detach().to("cpu")
            converted[ident] = tensor.float() if tensor.is_floating_point() else tensor
        out[name] = converted[ident]
    return out


def build_export(ckpt: dict[str, Any], source: Path, source_sha256: str) -> dict[str, Any]:
    try:
        model = export_plain_state_dict(ckpt["model"])
    except ValueError as err:
        raise UserError(f"{source}: {err}") from None
    source_meta = plain_values(ckpt.get("meta")) if isinstance(ckpt.get("meta"), dict) else {}
    meta = dict(source_meta)
    meta.update({
        "precision": "fp32",
        "exported_from": {"file": str(source.resolve()), "sha256": source_sha256,
                          "precision": source_meta.get("precision"), "step": ckpt.get("step")},
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "optimizer": NO_OPTIMIZER_NOTE,
    })
    out: dict[str, Any] = {"model": model, "config": plain_values(plain_config(ckpt.get("config"))), "meta": meta}
    out.update({k: plain_values(ckpt[k]) for k in _CARRIED_OVER if k in ckpt})
    return out


def model_config(ckpt: dict[str, Any], source: Path) -> GPTConfig:
    """The GPT shape recorded in a checkpoint's config."""
    config = ckpt.get("config")
    names = list(GPTConfig.__dataclass_fields__)
    if not isinstance(config, dict) or any(k not in config for k in ("n_layer", "n_head", "n_embd", "block_size")):
        raise UserError(f"{source}: the checkpoint holds no model config (n_layer, n_head, n_embd, block_size)")
    return GPTConfig(**{k: config[k] for k in names if k in config})


def load_plain_model(source: Path) -> tuple[dict[str, Any], GPTConfig, dict[str, torch.Tensor]]:
    """A checkpoint of either trainer, its model's config and its weights in the plain GPT's format
    (checked: they load into that GPT strictly)."""
    ckpt = load_source(source)
    try:
        state = export_plain_state_dict(ckpt["model"])
    except ValueError as err:
        raise UserError(f"{source}: {err}") from None
    cfg = model_config(ckpt, source)
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"{source}: the weights do not fit the model its config describes "
                        f"({' '.join(str(err).split())[:200]})") from None
    return ckpt, cfg, state


def export_hf(source: Path, dest: Path, *, tokenizer: str | None, force: bool) -> int:
    if dest.suffix == ".pt":
        raise UserError(f"{dest}: --format hf writes a directory; give a directory name")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())) and not force:
        raise UserError(f"{dest} already exists; choose another name or pass --force to replace it")
    ckpt, cfg, state = load_plain_model(source)
    name = tokenizer or run_tokenizer_name(ckpt["config"])
    staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        copied = None if tokenizer else _copy_dataset_tokenizer(staging, ckpt["config"])
        eot = copied if copied is not None else _write_tokenizer_files(staging, name, explicit=tokenizer is not None)
        write_hf_model(staging, state, cfg, eot)
        _replace_dir(staging, dest)
    except OSError as err:
        raise UserError(f"cannot write {dest}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: GPT2LMHeadModel (%d layers, %d heads, %d dims, vocabulary %d, %d positions) from %s step %s%s",
             dest, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size, source, ckpt.get("step"),
             f", tokenizer {name}" if eot is not None else ", no tokenizer files")
    return 0


def _copy_dataset_tokenizer(directory: Path, config: dict[str, Any]) -> int | None:
    """A Hugging Face or SentencePiece tokenizer kept beside the run's shards, copied next to the
    weights (its end-of-text id), or None when the dataset has none to copy (tiktoken: written
    from the encoding instead)."""
    data_dir = config.get("data_dir")
    if not isinstance(data_dir, str) or not Path(data_dir).is_dir():
        return None
    index = DatasetIndex.open(data_dir)
    files = tokenizer_files(index)
    for path in files:
        shutil.copyfile(path, directory / path.name)
    return index.eot_token if files else None


def _write_tokenizer_files(directory: Path, name: str | None, *, explicit: bool) -> int | None:
    """The tokenizer files (end-of-text id), or None with a warning when the run's tokenizer
    cannot be written; an explicit --tokenizer that cannot be is an error."""
    if name is None:
        log.warning("no tokenizer files: the run's data directory does not say which tokenizer it used; pass "
                    "--tokenizer NAME (e.g. gpt2)")
        return None
    try:
        return write_tokenizer(directory, name)
    except (UserError, ValueError) as err:
        if explicit:
            raise UserError(f"--tokenizer {name}: cannot write its files: {err}") from None
        log.warning("no tokenizer files: tokenizer %r cannot be written (%s); pass --tokenizer NAME", name, err)
        return None


def _replace_dir(staging: Path, dest: Path) -> None:
    """Put the complete `staging` directory at `dest`, replacing what is there (--force)."""
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    source, dest = args.source, args.dest
    if args.format == "hf":
        return export_hf(source, dest, tokenizer=args.tokenizer, force=args.force)
    if dest.suffix != ".pt":
        raise UserError(f"{dest}: the output name must end in .pt (its sidecar is the same name with .json)")
    if dest.exists() and source.exists() and dest.resolve() == source.resolve():
        raise UserError(f"{dest} is the input file; choose another output name")
    if dest.exists() and not args.force:
        raise UserError(f"{dest} already exists; choose another name or pass --force to replace it")
    ckpt = load_source(source)
    exported = build_export(ckpt, source, source_digest(source))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sidecar = write_checkpoint(exported, dest, step=exported.get("step"), epoch=exported.get("epoch"),
                                   val_loss=exported.get("val_loss"))
    except OSError as err:
        raise UserError(f"cannot write {dest}: {err.strerror or err}") from None
    log.info("wrote %s (%d tensors, step %s, from %s precision %s); %s", dest, len(exported["model"]),
             sidecar["step"], source, exported["meta"]["exported_from"]["precision"], NO_OPTIMIZER_NOTE)
    return 0


if __name__ == "__main__":
    run_cli(main)
