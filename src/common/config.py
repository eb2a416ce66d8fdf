"""Run configuration: one validated dataclass, JSON presets with "extends", every field a flag.

Precedence: dataclass defaults < the JSON file given with --config (and the files it extends)
< command-line flags. Mistakes end in one line and exit status 2 (UserError), naming the field
and, for a misspelt name, the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import subprocess
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from common import __version__
from common.errors import UserError
from common.fsutil import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

_CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("auto", "cpu", "cuda", "mps"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "fp8_format": ("hybrid", "e4m3", "e5m2"),
    "fp8_recipe": ("delayed", "current"),
    "fp8_amax_compute_algo": ("max", "most_recent"),
}


@dataclass
class TrainConfig:
    # data
    data_dir: str = "data/stdlib"
    block_size: int = 1024
    batch_size: int = 8  # per-rank micro-batch, in sequences
    total_batch_size: int = 524288  # tokens per optimizer step; gradient accumulation derives from it
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257  # padded up to a multiple of 64 inside the model
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    max_steps: int = 0  # 0: size the run from the dataset's expected tokens and `epochs`
    epochs: float = 1.0
    learning_rate: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 700
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    # evaluation and samples
    eval_freq: int = 250
    eval_batches: int = 20  # micro-batches per rank per evaluation
    sample_tokens: int = 64  # 0 disables the text sample at each evaluation
    sample_prompt: str = "def "
    # checkpoints
    checkpoint_dir: str = "./checkpoints"
    checkpoint_freq: int = 250
    keep_rolling: int = 10
    keep_epoch: int = 5
    async_checkpoint: bool = True
    resume: str = ""  # latest | best | auto | PATH; empty starts fresh
    # logging
    log_dir: str = "./logs"
    log_freq: int = 10  # human log lines every N steps (metrics.jsonl gets every step)
    use_tensorboard: bool = False
    use_wandb: bool = False
    wandb_project: str = "llm-pretrain"
    run_name: str = ""
    histogram_freq: int = 500  # 0 disables parameter/gradient histograms
    viz_freq: int = 0  # write PNG charts every N steps (0: never during training)
    # system
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU/MPS
    compile: bool | None = None  # None: on for CUDA, off elsewhere
    cpu_threads: int = 0  # 0: cores divided among the ranks on this node
    nan_check_freq: int = 1  # steps between NaN/Inf loss checks (each costs a host sync)

    def model_shape(self) -> dict[str, Any]:
        """Fields a checkpoint's weights depend on: they may not change on resume."""
        return {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "vocab_size", "bias")}

    def validate(self) -> None:
        positive = ("block_size", "batch_size", "total_batch_size", "n_layer", "n_head", "n_embd",
                    "vocab_size", "eval_freq", "checkpoint_freq", "log_freq", "nan_check_freq")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        non_negative = ("max_steps", "warmup_steps", "weight_decay", "grad_clip", "eval_batches",
                        "sample_tokens", "keep_rolling", "keep_epoch", "histogram_freq", "viz_freq",
                        "cpu_threads", "seed")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if self.n_embd % self.n_head:
            raise UserError(f"--n_embd {self.n_embd} must be divisible by --n_head {self.n_head}")
        for name, allowed in _CHOICES.items():
            if hasattr(self, name) and getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")


@dataclass
class FP8TrainConfig(TrainConfig):
    checkpoint_dir: str = "./checkpoints_fp8"
    use_fp8: bool = False
    fp8_format: str = "hybrid"  # hybrid: E4M3 forward, E5M2 gradients
    fp8_recipe: str = "delayed"  # delayed | current scaling
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0
    require_fp8: bool = False  # refuse to fall back to bf16

    def validate(self) -> None:
        """The FP8 flags, refused on every machine (before any fallback to the ordinary model)."""
        super().validate()
        if self.fp8_format == "e5m2":
            raise UserError("--fp8_format e5m2 is not accepted: TransformerEngine refuses pure E5M2 training "
                            "(too few mantissa bits for weights and activations); use --fp8_format hybrid "
                            "(E4M3 forward, E5M2 gradients) or --fp8_format e4m3")
        if self.fp8_amax_history_len <= 0:
            raise UserError(f"--fp8_amax_history_len must be positive, got {self.fp8_amax_history_len}")
        if self.fp8_margin < 0:
            raise UserError(f"--fp8_margin must be >= 0, got {self.fp8_margin}")
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
