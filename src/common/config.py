"""Run configuration: one validated dataclass, JSON presets with "extends", every field a flag.

Precedence: dataclass defaults < the JSON file given with --config (and the files it extends)
< command-line flags. Mistakes end in one line and exit status 2 (UserError), naming the field
and, for a misspelt name, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import operator
import subprocess
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from common import __version__
from common.errors import UserError
from common.fsutil import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

def _field(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its valid range (bounds, or choices for strings), checked by validate()."""
    limits = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    return field(default=default, metadata={k: v for k, v in limits.items() if v is not None})


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/stdlib"
    block_size: int = _field(1024, ge=1)
    batch_size: int = _field(8, ge=1)  # per-rank micro-batch, in sequences
    total_batch_size: int = _field(524288, ge=1)  # tokens per optimizer step; gradient accumulation derives from it
    # model
    n_layer: int = _field(12, ge=1)
    n_head: int = _field(12, ge=1)
    n_embd: int = _field(768, ge=1)
    vocab_size: int = _field(0, ge=0)  # 0: the dataset's; padded up to a multiple of 64 inside the model
    dropout: float = _field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    init_from: str = ""  # local Hugging Face GPT-2 directory a fresh run starts from (its weights and shape)
    # optimisation
    max_steps: int = _field(0, ge=0)  # 0: size the run from the dataset's expected tokens and `epochs`
    epochs: float = _field(1.0, gt=0.0)
    learning_rate: float = _field(6e-4, gt=0.0)
    min_lr_ratio: float = _field(0.1, ge=0.0, le=1.0)  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = _field(700, ge=0)
    weight_decay: float = _field(0.1, ge=0.0)
    beta1: float = _field(0.9, ge=0.0, lt=1.0)
    beta2: float = _field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = _field(1.0, ge=0.0)  # 0 disables clipping (the norm is still logged)
    # evaluation and samples
    eval_freq: int = _field(250, ge=0)  # 0: no evaluation (and no best.pt)
    eval_batches: int = _field(20, ge=0)  # micro-batches per rank per evaluation
    sample_tokens: int = _field(64, ge=0)  # 0 disables the text sample at each evaluation
    sample_prompt: str = "def "
    hellaswag_path: str = ""  # HellaSwag validation jsonl, dataset directory or HF id, scored during training
    hellaswag_freq: int = _field(0, ge=0)  # steps between HellaSwag scores (and the last step); 0: with eval_freq
    # checkpoints
    checkpoint_dir: str = "./checkpoints"
    checkpoint_freq: int = _field(250, ge=1)
    keep_rolling: int = _field(10, ge=0)
    keep_epoch: int = _field(5, ge=0)
    async_checkpoint: bool = True
    resume: str = ""  # latest | best | auto | PATH; empty starts fresh
    # logging
    log_dir: str = "./logs"
    log_freq: int = _field(10, ge=1)  # human log lines every N steps (metrics.jsonl gets every step)
    use_tensorboard: bool = False
    use_wandb: bool = False
    wandb_project: str = "llm-pretrain"
    run_name: str = ""
    histogram_freq: int = _field(500, ge=0)  # 0 disables parameter/gradient histograms
    viz_freq: int = _field(0, ge=0)  # write PNG charts every N steps (0: never during training)
    # faults: skipped steps, rollbacks, hangs, drills
    spike_zscore: float = _field(6.0, ge=0.0)  # skip a step whose loss or grad norm is this many sigmas up; 0: off
    spike_window: int = _field(128, ge=2)  # accepted steps the mean and sigma are taken over
    max_consecutive_skips: int = _field(3, ge=1)  # then roll back to the last good checkpoint
    max_rollbacks: int = _field(3, ge=0)  # then stop (exit 1)
    collective_timeout_s: float = _field(300.0, gt=0.0)  # a rank silent this long ends the run
    inject_fault: str = ""  # drill: KIND@STEP[:RANK][,...]; never inherited by a resumed run
    # system
    seed: int = _field(1337, ge=0)
    device: str = _field("auto", choices=("auto", "cpu", "cuda", "mps"))
    dtype: str = _field("auto", choices=("auto", "float32", "bfloat16"))  # auto: bf16 on CUDA, fp32 elsewhere
    compile: bool | None = None  # None: on for CUDA, off elsewhere (per block under fsdp)
    parallel: str = _field("ddp", choices=("ddp", "fsdp"))  # fsdp: parameters, gradients, optimizer state sharded
    activation_checkpointing: str = _field("none", choices=("none", "full"))  # full: recompute each block's activations
    fused_ce: str = _field("auto", choices=("auto", "on", "off"))  # chunked linear + cross-entropy in training
    cpu_threads: int = _field(0, ge=0)  # 0: cores divided among the ranks on this node

    def model_shape(self) -> dict[str, Any]:
        """Fields a checkpoint's weights depend on: they may not change on resume."""
        return {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "block_size")}

    def validate(self) -> None:
        """Every field in its range (floats finite), then the rules that tie fields together."""
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name), f.metadata)
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        if self.eval_freq and not self.eval_batches:
            raise UserError("--eval_batches 0 leaves every evaluation empty; use --eval_batches 1 or more, "
                            "or --eval_freq 0 to turn evaluation off")
        if self.hellaswag_freq and not self.hellaswag_path:
            raise UserError("--hellaswag_freq needs --hellaswag_path (HellaSwag's hellaswag_val.jsonl or a dataset id)")
        if self.hellaswag_path and not (self.hellaswag_freq or self.eval_freq):
            raise UserError("--hellaswag_path with --eval_freq 0 needs --hellaswag_freq N (steps between scores)")
        from common.faults import parse_fault_plan  # a malformed drill is refused before any step
        parse_fault_plan(self.inject_fault)


_FLOAT16_HINT = ("float16 needs loss scaling, which this suite does not do; use bfloat16 (GPUs from Ampere on) "
                 "or float32")


def _check_field(name: str, value: Any, limits: Mapping[str, Any]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{name} must be a finite number, got {value}")
    choices = limits.get("choices")
    if choices is not None and value not in choices:
        hint = f": {_FLOAT16_HINT}" if name == "dtype" and value == "float16" else ""
        raise UserError(f"--{name} must be one of {', '.join(choices)}; got {value!r}{hint}")
    if value is None or isinstance(value, bool):
        return
    if any(not _COMPARE[op](value, bound) for op, bound in limits.items() if op in _COMPARE):
        raise UserError(f"--{name} must be {_describe(limits)}, got {value}")


_COMPARE = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}


def _describe(limits: Mapping[str, Any]) -> str:
    low = ("[", limits["ge"]) if "ge" in limits else ("(", limits["gt"]) if "gt" in limits else None
    high = (limits["le"], "]") if "le" in limits else (limits["lt"], ")") if "lt" in limits else None
    if low and high:
        return f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    assert high is not None
    return f"{'<=' if high[1] == ']' else '<'} {high[0]:g}"


@dataclass
class FP8TrainConfig(TrainConfig):
    checkpoint_dir: str = "./checkpoints_fp8"
    use_fp8: bool = False
    # hybrid: E4M3 forward, E5M2 gradients (e5m2 is a choice only to be refused with its reason)
    fp8_format: str = _field("hybrid", choices=("hybrid", "e4m3", "e5m2"))
    fp8_recipe: str = _field("delayed", choices=("delayed", "current"))  # delayed | current scaling
    fp8_amax_history_len: int = _field(1024, ge=1)
    fp8_amax_compute_algo: str = _field("max", choices=("max", "most_recent"))
    fp8_margin: int = _field(0, ge=0)
    require_fp8: bool = False  # refuse to fall back to bf16

    def validate(self) -> None:
        """The FP8 flags, refused on every machine (before any fallback to the ordinary model)."""
        super().validate()
        if self.fp8_format == "e5m2":
            raise UserError("--fp8_format e5m2 is not accepted: TransformerEngine refuses pure E5M2 training "
                            "(too few mantissa bits for weights and activations); use --fp8_format hybrid "
                            "(E4M3 forward, E5M2 gradients) or --fp8_format e4m3")
        if self.require_fp8 and not self.use_fp8:
            raise UserError("--require_fp8 needs --use_fp8 (without it FP8 is off); add --use_fp8 or drop "
                            "--require_fp8")


C = TypeVar("C", bound=TrainConfig)


# ---------------------------------------------------------------- value parsing

def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, accepts None) for `int`, `bool | None`, `Optional[str]`..."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Turn a JSON or command-line value into the field's type, or say what the field accepts."""
    base, nullable = _base_type(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto") and nullable):
        if nullable:
            return None
        raise UserError(f"--{name} needs a value of type {base.__name__}")
    if base is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        extra = " or auto" if nullable else ""
        raise UserError(f"--{name} takes true or false{extra}; got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise UserError(f"--{name} takes an integer; got {value!r}")
        try:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(str(value).replace("_", ""))
        except ValueError:
            raise UserError(f"--{name} takes an integer; got {value!r}") from None
    if base is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"--{name} takes a number; got {value!r}") from None
    return str(value)


def _suggest(name: str, valid: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


# ---------------------------------------------------------------- files

def _resolve_config_path(ref: str, relative_to: Path | None) -> Path:
    candidates = [Path(ref)]
    if relative_to is not None:
        candidates.insert(0, relative_to / ref)
    candidates.append(CONFIG_DIR / ref)
    if not ref.endswith(".json"):
        candidates.append(CONFIG_DIR / f"{ref}.json")
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"config file not found: {ref} (presets live in {CONFIG_DIR})")


def load_config_file(ref: str, relative_to: Path | None = None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a JSON preset, merging the chain of files it `extends` (the child wins)."""
    path = _resolve_config_path(ref, relative_to).resolve()
    if path in _seen:
        raise UserError(f"config files extend each other in a loop: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object of config fields")
    data.pop("_comment", None)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    merged = load_config_file(str(parent_ref), path.parent, _seen + (path,))
    merged.update(data)
    return merged


def _reject_unknown(values: dict[str, Any], types_: dict[str, Any], source: str) -> None:
    unknown = [k for k in values if k not in types_]
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r} in {source}{_suggest(unknown[0], list(types_))}")


def from_dict(cls: type[C], values: dict[str, Any], source: str) -> C:
    types_ = _field_types(cls)
    _reject_unknown(values, types_, source)
    return cls(**{k: coerce(k, v, types_[k]) for k, v in values.items()})


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config_to_dict(cfg), indent=2) + "\n")


# ---------------------------------------------------------------- command line

@functools.cache  # once per process: a checkpoint save must not start a subprocess
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_string() -> str:
    return f"llm-pretrain-suite {__version__} (git {git_commit()})"


def _split_flags(argv: Sequence[str], valid: list[str]) -> dict[str, str | None]:
    """Parse `--key value`, `--key=value` and bare boolean `--key` into a dict of raw strings."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise UserError(f"unexpected argument {token!r}: flags look like --name value")
        key, eq, val = token[2:].partition("=")
        key = key.replace("-", "_")
        if key not in valid:
            raise UserError(f"unknown flag --{key}{_suggest(key, valid, '--')}")
        if eq:
            out[key] = val
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[key] = argv[i + 1]
            i += 1
        else:
            out[key] = None  # bare flag: true for booleans, an error for the rest
        i += 1
    return out


def parse_args(argv: Sequence[str], cls: type[C] = TrainConfig) -> tuple[C, dict[str, Any]]:
    """Build the config from --config FILE and flags.

    Returns the config and the run actions (print_config, save_config, version) plus
    `explicit`, the fields set by the file or a flag.
    """
    types_ = _field_types(cls)
    actions: dict[str, Any] = {"config": None, "save_config": None, "print_config": False, "version": False}
    raw = _split_flags(argv, list(types_) + list(actions))

    if "version" in raw:
        actions["version"] = True
    if "print_config" in raw:
        actions["print_config"] = coerce("print_config", raw.pop("print_config") or "true", bool)
    for key in ("config", "save_config"):
        if key in raw:
            if raw[key] is None:
                raise UserError(f"--{key} needs a file name")
            actions[key] = raw.pop(key)
    raw.pop("version", None)

    values: dict[str, Any] = {}
    if actions["config"]:
        values.update(load_config_file(actions["config"]))
        _reject_unknown(values, types_, actions["config"])
    for key, val in raw.items():
        base, _ = _base_type(types_[key])
        if val is None:
            if base is not bool:
                raise UserError(f"--{key} needs a value")
            val = "true"
        values[key] = val
    cfg = from_dict(cls, values, actions["config"] or "flags")
    cfg.validate()
    actions["explicit"] = set(values)  # what the user chose; a resumed run takes the rest from its checkpoint
    return cfg, actions


def handle_config_actions(cfg: TrainConfig, actions: dict[str, Any]) -> bool:
    """Carry out --version / --print_config / --save_config (their output is the command's
    answer, on stdout). True when the command ends there instead of training."""
    if actions["version"]:
        sys.stdout.write(version_string() + "\n")
        return True
    if actions["save_config"]:
        save_config(cfg, actions["save_config"])
        sys.stdout.write(f"saved config to {actions['save_config']}\n")
    if actions["print_config"]:
        sys.stdout.write(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        return True
    return bool(actions["save_config"])
