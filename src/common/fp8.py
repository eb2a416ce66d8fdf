"""TransformerEngine (TE) adapter for the FP8 trainer: the fallback decision, the recipe built from
flags, the FP8 shape checks, one context manager over TE's API changes, and the export of an
FP8-trained state dict to the plain model's format.

Nothing here imports TE when this module is imported: ``load_te()`` does it, guarded, and every
TE call goes through the ``TEInfo`` it returns. On a machine without TE (or without CUDA) the
functions still work and say why FP8 is off.

Written against the TE API as documented and as found in TE's sources:

* TE >= 2.9 (checked against 2.9 release notes and the source of 2.9 to 2.20):
  ``transformer_engine.pytorch.autocast(enabled, calibrating, recipe, amax_reduction_group)``,
  ``transformer_engine.pytorch.is_fp8_available(return_reason=False)`` (``(bool, str)`` with
  ``return_reason=True``). ``fp8_autocast`` still exists there as a deprecated shim.
* TE 1.x to 2.8: ``transformer_engine.pytorch.fp8_autocast(enabled, calibrating, fp8_recipe,
  fp8_group)`` and ``transformer_engine.pytorch.fp8.check_fp8_support() -> (bool, str)``.
* Both: ``transformer_engine.pytorch.Linear(in_features, out_features, bias=True,
  params_dtype=None, device="cuda", init_method=None, sequence_parallel=False, ...)`` with a
  ``weight`` of shape (out_features, in_features) like ``torch.nn.Linear``;
  ``transformer_engine.common.recipe.DelayedScaling(margin=0, fp8_format=Format.HYBRID,
  amax_history_len=1024, amax_compute_algo="max", scaling_factor_compute_algo=None,
  reduce_amax=True)`` and ``Float8CurrentScaling(fp8_format=Format.HYBRID)`` (2.x); both assert
  ``fp8_format != Format.E5M2`` ("Pure E5M2 training is not supported").
* FP8 GEMM shapes (``assert_dim_for_fp8_exec``): the product of all dimensions but the last a
  multiple of 8, the last dimension a multiple of 16.
* torch.compile: TE modules' ``forward`` is excluded from TorchDynamo (``no_torch_dynamo``) before
  2.20; 2.20 enabled ``torch.compile(fullgraph=True)`` for ``Linear`` with supported recipes, and
  ``DelayedScaling`` raises under torch.compile.
* Checkpoints: every TE module adds ``<prefix>._extra_state`` to its state dict (a uint8 tensor
  of pickled FP8 scaling state; an ``io.BytesIO`` in very old TE), restored by
  ``load_state_dict``, so a resume keeps the amax history and scales.

None of this has run against a real TE here (no GPU, TE not installable): the TE paths are
unit-tested with stand-in objects of the documented shapes only.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

LinearFactory = Callable[[int, int, bool], torch.nn.Module]

TE_VERSIONS_WRITTEN_AGAINST = "TransformerEngine 1.x-2.8 (fp8_autocast) and 2.9-2.20 (autocast)"
INSTALL_HINT = "pip install --no-build-isolation transformer_engine[pytorch]; see docs/FP8_TRAINING_GUIDE.md"

_AUTOCAST_RENAMED_IN = (2, 9)  # te.pytorch.autocast / is_fp8_available replace fp8_autocast / check_fp8_support
_COMPILE_SUPPORTED_FROM = (2, 20)  # torch.compile(fullgraph=True) for te.pytorch.Linear
_MIN_FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.0 / 12.0
_MIN_BF16_CAPABILITY = (8, 0)

_FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}
_RECIPES = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling"}
_AMAX_ALGOS = ("max", "most_recent")
_DELAYED_DEFAULTS = {"fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max", "fp8_margin": 0}
_OPTIONAL_RECIPE_KWARGS = ("reduce_amax",)  # absent from old DelayedScaling; True is the default anyway

_FP8_SHAPE_NOTE = "which FP8 matrix products need"

_WRAPPER_PREFIX = "module"  # DistributedDataParallel
_COMPILE_SEGMENT = "_orig_mod"  # torch.compile's OptimizedModule
_EXTRA_STATE = "_extra_state"  # torch.nn.Module's key for get_extra_state(); TE stores FP8 scaling there


# ----------------------------------------------------------------------------- loading TE

@dataclass(frozen=True)
class TEInfo:
    """What ``load_te()`` found. ``module`` is ``transformer_engine.pytorch`` or None."""

    installed: bool
    version: str | None
    module: object | None
    recipe_module: object | None = None  # transformer_engine.common.recipe
    error: str | None = None  # set when TE is present but failed to import


def _te_distribution_version() -> str | None:
    for name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:  # a broken metadata directory must not stop training
            return None
    return None


def load_te() -> TEInfo:
    """Import TransformerEngine if it is there. Never raises.

    Importing TE may initialise CUDA, so call this after the rank's CUDA device is chosen.
    """
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch as te_pytorch
        from transformer_engine.common import recipe as te_recipe
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "transformer_engine":
            return TEInfo(installed=False, version=None, module=None)
        return TEInfo(False, _te_distribution_version(), None, error=f"{type(err).__name__}: {err}")
    except Exception as err:  # undefined symbols, missing CUDA libraries, version asserts...
        return TEInfo(False, _te_distribution_version(), None, error=f"{type(err).__name__}: {err}")
    version = getattr(transformer_engine, "__version__", None) or _te_distribution_version()
    return TEInfo(installed=True, version=str(version) if version else None, module=te_pytorch,
                  recipe_module=te_recipe)


def _release(version: str | None) -> tuple[int, ...] | None:
    """(major, minor, micro) of a version string, ignoring dev/local parts; None if unknown."""
    if not version:
        return None
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # packaging comes with pip and setuptools; be safe anyway
        parts = []
        for piece in version.split("+")[0].split(".")[:3]:
            if not piece.isdigit():
                break
            parts.append(int(piece))
        return tuple(parts) or None
    try:
        return Version(version).release
    except InvalidVersion:
        return None


def _version_at_least(te: TEInfo, wanted: tuple[int, int]) -> bool | None:
    release = _release(te.version)
    return None if release is None else tuple(release[:2]) >= wanted


# ----------------------------------------------------------------------------- the version adapter

def _uses_new_autocast(te: TEInfo) -> bool:
    """TE >= 2.9 spells it ``autocast(recipe=, amax_reduction_group=)``; older ``fp8_autocast``."""
    if not hasattr(te.module, "autocast"):
        return False
    return _version_at_least(te, _AUTOCAST_RENAMED_IN) is not False  # unknown version: trust the attribute


def fp8_autocast(te: TEInfo, *, enabled: bool, recipe: Any, group: Any) -> ContextManager:
    """TE's FP8 autocast for one forward pass (the backward runs outside it).

    ``group`` is the process group the amaxes are all-reduced over when the context exits (with
    ``reduce_amax=True`` in the delayed recipe): the data-parallel group, see
    ``amax_reduction_group()``. Enter a new context per micro-batch: with amax reduction a TE
    module must not run twice inside one region. A null context when FP8 is off or TE absent.
    """
    if not enabled or not te.installed or te.module is None:
        return contextlib.nullcontext()
    module: Any = te.module
    if _uses_new_autocast(te):
        return module.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    if hasattr(module, "fp8_autocast"):
        return module.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)
    raise RuntimeError(f"TransformerEngine {te.version} has neither autocast nor fp8_autocast")


def _normalise_support(result: Any) -> tuple[bool, str]:
    if isinstance(result, tuple):
        ok = bool(result[0])
        reason = str(result[1]) if len(result) > 1 and result[1] else ""
        return ok, reason
    return bool(result), ""


def fp8_supported(te: TEInfo) -> tuple[bool, str]:
    """TE's own FP8 check: ``is_fp8_available(return_reason=True)`` (TE >= 2.9) or
    ``transformer_engine.pytorch.fp8.check_fp8_support()`` (before). Never raises."""
    if not te.installed or te.module is None:
        return False, "TransformerEngine is not installed"
    module: Any = te.module
    try:
        if hasattr(module, "is_fp8_available"):
            return _normalise_support(module.is_fp8_available(return_reason=True))
        fp8_module: Any = getattr(module, "fp8", None)
        if fp8_module is None:
            fp8_module = importlib.import_module(getattr(module, "__name__", "transformer_engine.pytorch") + ".fp8")
        if hasattr(fp8_module, "check_fp8_support"):
            return _normalise_support(fp8_module.check_fp8_support())
        return _normalise_support(fp8_module.FP8GlobalStateManager.is_fp8_available())
    except Exception as err:
        return False, f"TransformerEngine's FP8 check failed ({type(err).__name__}: {err})"


def amax_reduction_group() -> Any:
    """The data-parallel group for amax reduction: the whole world (this suite is data-parallel
    only), or None outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def te_linear_factory(te: TEInfo, params_dtype: torch.dtype,
                      device: str | torch.device = "cuda") -> LinearFactory:
    """A LinearFactory building ``te.pytorch.Linear(in, out, bias=, params_dtype=, device=)``.

    Use ``params_dtype=torch.float32`` with torch.autocast(bf16) around the forward: TE takes its
    activation dtype from torch.autocast and keeps fp32 master weights for the optimizer. TE
    initialises the weight itself (normal, std 0.023); the GPT re-initialises it afterwards.
    """
    if not te.installed or te.module is None:
        raise RuntimeError("te_linear_factory needs TransformerEngine (check plan.use_te first)")
    linear_cls: Any = te.module.Linear

    def make(in_features: int, out_features: int, bias: bool) -> torch.nn.Module:
        return linear_cls(in_features, out_features, bias=bias, params_dtype=params_dtype, device=device)

    return make


# ----------------------------------------------------------------------------- recipe from flags

def recipe_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments for TE's recipe class, from the config's flags. Pure: no TE needed.

    ``fp8_format`` is the *name* of a ``transformer_engine.common.recipe.Format`` member
    ("HYBRID" or "E4M3"); ``build_recipe`` turns it into the enum. Raises UserError for a value
    TE would refuse, e5m2 included, whatever the hardware.
    """
    return _recipe_kwargs(cfg, note_ignored=True)


def _recipe_kwargs(cfg: Any, note_ignored: bool) -> dict[str, Any]:
    fmt = str(getattr(cfg, "fp8_format", "hybrid")).lower()
    if fmt == "e5m2":
        raise UserError("--fp8_format e5m2 is not accepted: TransformerEngine refuses pure E5M2 training "
                        "(too few mantissa bits for weights and activations); use --fp8_format hybrid "
                        "(E4M3 forward, E5M2 gradients) or --fp8_format e4m3")
    if fmt not in _FORMATS:
        raise UserError(f"--fp8_format must be one of {', '.join(_FORMATS)}; got {fmt!r}")
    recipe = str(getattr(cfg, "fp8_recipe", "delayed")).lower()
    if recipe not in _RECIPES:
        raise UserError(f"--fp8_recipe must be one of {', '.join(_RECIPES)}; got {recipe!r}")
    if recipe == "current":
        if note_ignored:
            _note_ignored_delayed_flags(cfg)
        return {"fp8_format": _FORMATS[fmt]}
    return {
        "margin": _int_flag(cfg, "fp8_margin", minimum=0),
        "fp8_format": _FORMATS[fmt],
        "amax_history_len": _int_flag(cfg, "fp8_amax_history_len", minimum=1),
        "amax_compute_algo": _amax_algo(cfg),
        "reduce_amax": True,  # over the group given to autocast: see amax_reduction_group()
    }


def _int_flag(cfg: Any, name: str, minimum: int) -> int:
    value = getattr(cfg, name, _DELAYED_DEFAULTS[name])
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _amax_algo(cfg: Any) -> str:
    algo = str(getattr(cfg, "fp8_amax_compute_algo", "max"))
    if algo not in _AMAX_ALGOS:
        raise UserError(f"--fp8_amax_compute_algo must be one of {', '.join(_AMAX_ALGOS)}; got {algo!r}")
    return algo


def _note_ignored_delayed_flags(cfg: Any) -> None:
    changed = [f"--{k}" for k, default in _DELAYED_DEFAULTS.items() if getattr(cfg, k, default) != default]
    if changed:
        log.warning("ignoring %s: used by --fp8_recipe delayed only, not by --fp8_recipe current",
                    ", ".join(changed))


def _recipe_module(te: TEInfo) -> Any:
    if te.recipe_module is not None:
        return te.recipe_module
    return importlib.import_module("transformer_engine.common.recipe")


def _accepted(cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop optional keyword arguments an older recipe class does not take."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    dropped = [k for k in _OPTIONAL_RECIPE_KWARGS if k in kwargs and k not in params]
    if dropped:
        log.debug("recipe %s does not take %s; using its default", getattr(cls, "__name__", cls), dropped)
    return {k: v for k, v in kwargs.items() if k not in dropped}


def build_recipe(cfg: Any, te: TEInfo) -> Any:
    """``DelayedScaling(**recipe_kwargs(cfg))`` or ``Float8CurrentScaling(fp8_format=...)``.

    Amax reduction over the data-parallel group happens through the group passed to
    ``fp8_autocast(..., group=amax_reduction_group())``; the delayed recipe says
    ``reduce_amax=True``. Current scaling keeps no amax history, so there is nothing to reduce.
    """
    if not te.installed:
        raise RuntimeError("build_recipe needs TransformerEngine (check plan.use_fp8 first)")
    kwargs = recipe_kwargs(cfg)
    recipe_mod = _recipe_module(te)
    recipe_name = str(getattr(cfg, "fp8_recipe", "delayed")).lower()
    cls = getattr(recipe_mod, _RECIPES[recipe_name], None)
    if cls is None:
        raise UserError(f"--fp8_recipe {recipe_name} needs TransformerEngine's {_RECIPES[recipe_name]}, "
                        f"which TransformerEngine {te.version} lacks; upgrade TE or use --fp8_recipe delayed")
    kwargs["fp8_format"] = getattr(recipe_mod.Format, kwargs["fp8_format"])
    return cls(**_accepted(cls, kwargs))


def precision_name(cfg: Any) -> str:
    """Label of an FP8 run, e.g. "fp8-hybrid-delayed"."""
    return f"fp8-{str(cfg.fp8_format).lower()}-{str(cfg.fp8_recipe).lower()}"


# ----------------------------------------------------------------------------- shapes

def check_fp8_shapes(cfg: Any) -> None:
    """Refuse a model whose linear layers FP8 cannot multiply, naming the flag to change.

    Every linear's input and output width must be a multiple of 16 (n_embd, 3*n_embd, 4*n_embd:
    all follow from n_embd) and the tokens of a micro-batch (batch_size * block_size, the
    product of the leading dimensions) a multiple of 8. Call it when ``plan.use_fp8``.
    """
    n_embd = int(cfg.n_embd)
    widths = {"attention qkv": (n_embd, 3 * n_embd), "attention output": (n_embd, n_embd),
              "MLP up": (n_embd, 4 * n_embd), "MLP down": (4 * n_embd, n_embd)}
    for layer, (fan_in, fan_out) in widths.items():
        if fan_in % 16 or fan_out % 16:
            suggestion = (n_embd // 16 + 1) * 16
            raise UserError(f"--n_embd {n_embd} is not a multiple of 16, {_FP8_SHAPE_NOTE} "
                            f"(the {layer} layer is {fan_in} -> {fan_out}); use e.g. --n_embd {suggestion}")
    batch, block = int(cfg.batch_size), int(cfg.block_size)
    if (batch * block) % 8:
        raise UserError(f"--batch_size {batch} x --block_size {block} = {batch * block} tokens per "
                        f"micro-batch is not a multiple of 8, {_FP8_SHAPE_NOTE}; change --batch_size "
                        f"or --block_size")


# ----------------------------------------------------------------------------- the fallback decision

@dataclass(frozen=True)
class PrecisionPlan:
    """How the FP8 script trains on this machine, and why.

    use_te: build the block linears with TE (``te_linear_factory``); else the ordinary model.
    use_fp8: wrap each forward in ``fp8_autocast``. precision: the label for log, meta, hparams.
    fallback: FP8 was asked for and is not possible here (warn with ``reason``).
    """

    use_te: bool
    use_fp8: bool
    precision: str
    reason: str
    fallback: bool = False
    te_version: str | None = None

    def to_meta(self) -> dict[str, Any]:
        return {"precision": self.precision, "transformer_engine": self.te_version, "use_te": self.use_te,
                "use_fp8": self.use_fp8, "fp8_fallback": self.fallback, "precision_reason": self.reason}


def _cuda_device_info(device: torch.device) -> tuple[str, tuple[int, int]]:
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), (int(major), int(minor))


def _plain_precision(cfg: Any, device: torch.device) -> str:
    """The label train_improved.py would use: cfg.dtype, auto meaning bf16 on CUDA, fp32 elsewhere."""
    choice = str(getattr(cfg, "dtype", "auto"))
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" else "float32"
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(choice, choice)


def _te_unavailable(te: TEInfo) -> str:
    if te.error:
        found = f"TransformerEngine {te.version}" if te.version else "TransformerEngine"
        return f"{found} is installed but failed to import ({te.error})"
    return f"TransformerEngine is not installed ({INSTALL_HINT})"


def _fp8_blocker(device: torch.device, te: TEInfo) -> str | None:
    """Why FP8 cannot run here, or None."""
    if not te.installed:
        return _te_unavailable(te)
    if device.type != "cuda":
        return f"no CUDA device (training on {device.type})"
    name, cap = _cuda_device_info(device)
    if cap < _MIN_FP8_CAPABILITY:
        return (f"GPU {name} has compute capability {cap[0]}.{cap[1]}; FP8 needs 8.9 or newer "
                f"(Ada sm_89, Hopper sm_90, Blackwell sm_100/sm_120)")
    ok, why = fp8_supported(te)
    if not ok:
        return f"TransformerEngine's FP8 check fails on GPU {name} (sm_{cap[0]}{cap[1]}): {why or 'no reason given'}"
    return None


def plan_precision(cfg: Any, device: torch.device, te: TEInfo) -> PrecisionPlan:
    """Decide TE or not, FP8 or not. Raises UserError for a refused recipe flag, for
    --require_fp8 without --use_fp8, and for --require_fp8 when FP8 is not possible here."""
    use_fp8 = bool(getattr(cfg, "use_fp8", False))
    if bool(getattr(cfg, "require_fp8", False)) and not use_fp8:
        raise UserError("--require_fp8 needs --use_fp8 (without it FP8 is off); add --use_fp8 or drop --require_fp8")
    if use_fp8:
        return _plan_fp8(cfg, device, te)
    return _plan_without_fp8(cfg, device, te)


def _plan_fp8(cfg: Any, device: torch.device, te: TEInfo) -> PrecisionPlan:
    _recipe_kwargs(cfg, note_ignored=False)  # a refused flag is a mistake on every machine: before any fallback
    problem = _fp8_blocker(device, te)
    if problem is None:
        name, cap = _cuda_device_info(device)
        precision = precision_name(cfg)
        return PrecisionPlan(True, True, precision, f"{precision} with TransformerEngine {te.version} on GPU "
                             f"{name} (sm_{cap[0]}{cap[1]})", te_version=te.version)
    if getattr(cfg, "require_fp8", False):
        raise UserError(f"--require_fp8: FP8 training is not possible here: {problem}")
    plain = _plain_precision(cfg, device)
    return PrecisionPlan(False, False, plain, f"FP8 unavailable: {problem}; training the ordinary model in "
                         f"{plain} instead", fallback=True, te_version=te.version)


def _plan_without_fp8(cfg: Any, device: torch.device, te: TEInfo) -> PrecisionPlan:
    plain = _plain_precision(cfg, device)
    if not te.installed:
        why = _te_unavailable(te)
    elif device.type != "cuda":
        why = f"no CUDA device for TransformerEngine (training on {device.type})"
    else:
        name, cap = _cuda_device_info(device)
        if cap >= _MIN_BF16_CAPABILITY:
            return PrecisionPlan(True, False, plain, f"FP8 off (no --use_fp8): TransformerEngine {te.version} "
                                 f"linear layers in {plain} on GPU {name}", te_version=te.version)
        why = f"GPU {name} (sm_{cap[0]}{cap[1]}) is older than TransformerEngine's bf16 minimum sm_80"
    return PrecisionPlan(False, False, plain, f"FP8 off (no --use_fp8) and {why}: the ordinary model in {plain}",
                         te_version=te.version)


# ----------------------------------------------------------------------------- torch.compile

def compile_allowed(cfg: Any, te: TEInfo, plan: PrecisionPlan) -> tuple[bool, str]:
    """May the model be torch.compiled? (allowed, reason for a log line).

    False means: do not compile even if --compile asks (the trainer logs the reason); True
    leaves the decision to --compile. The ordinary model is never restricted. TE modules are
    compiled only where TE documents support: TE >= 2.20 with the current-scaling FP8 recipe.
    """
    if not plan.use_te:
        return True, "ordinary torch model: torch.compile follows --compile"
    version = te.version or "of unknown version"
    if plan.use_fp8 and str(getattr(cfg, "fp8_recipe", "delayed")) == "delayed":
        return False, ("torch.compile off: TransformerEngine does not support the DelayedScaling recipe under "
                       "torch.compile (use --fp8_recipe current with TE >= 2.20 to compile)")
    if _version_at_least(te, _COMPILE_SUPPORTED_FROM) is not True:
        return False, (f"torch.compile off: TransformerEngine {version} keeps its modules out of TorchDynamo "
                       "(compile support for te.pytorch.Linear starts in TE 2.20), so compiling would only "
                       "add graph breaks")
    if not plan.use_fp8:
        return False, (f"torch.compile off: TransformerEngine {version} documents torch.compile for Linear "
                       "with FP8 recipes; the bf16 TE model runs eagerly")
    return True, f"TransformerEngine {version} supports torch.compile for Linear with Float8CurrentScaling"


# ----------------------------------------------------------------------------- resume across precisions

def _extra_state_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's extra state, found the way torch does (an overridden
    get_extra_state), without calling TE."""
    keys = set()
    for name, module in model.named_modules():
        if getattr(type(module), "get_extra_state", None) is not torch.nn.Module.get_extra_state:
            keys.add(f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE)
    return keys


def align_extra_state(state_dict: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Make a checkpoint's ``_extra_state`` entries match ``model`` for a strict load.

    A checkpoint from a fallback run (ordinary model) resumed on an FP8 GPU lacks TE's entries:
    they are added empty (TE's ``set_extra_state`` treats an empty tensor as "no FP8 state yet",
    so scaling starts afresh). A TE checkpoint resumed by the ordinary model has entries it cannot
    take: they are dropped. Same-model resumes are returned unchanged, scaling history included.
    Keys must be the unwrapped model's (no ``module.`` / ``_orig_mod.``).
    """
    wanted = _extra_state_keys(model)
    present = {k for k in state_dict if k.split(".")[-1] == _EXTRA_STATE}
    out = {k: v for k, v in state_dict.items() if k not in present - wanted}
    for key in sorted(wanted - present):
        out[key] = torch.empty(0, dtype=torch.uint8)
    if wanted != present:
        log.warning("checkpoint and model differ in FP8 scaling state (%d entries added empty, %d dropped): "
                    "the checkpoint was written with another precision; FP8 scaling starts afresh",
                    len(wanted - present), len(present - wanted))
    return out


# ----------------------------------------------------------------------------- export

def plain_key(key: str) -> str:
    """The key without DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` segments."""
    parts = [p for p in key.split(".") if p != _COMPILE_SEGMENT]
    while len(parts) > 1 and parts[0] == _WRAPPER_PREFIX:
        parts = parts[1:]
    return ".".join(parts)


def _storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's data: two state-dict entries of one tied parameter share it."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype, tensor.device.type)


def export_plain_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An FP8/TE-trained model's state dict in the plain GPT's format.

    Drops ``*._extra_state`` (TE's FP8 scaling state: the plain model has none), strips the
    ``module.`` / ``_orig_mod.`` wrapper prefixes, casts floating tensors to float32 and drops
    the empty ``bias`` placeholders some TE versions keep for bias-free layers. TE Linear weights
    are (out_features, in_features) like nn.Linear, so they load as they are. Tensors shared in
    the input (the tied embedding and output head) stay shared.
    """
    out: dict[str, torch.Tensor] = {}
    converted: dict[tuple[Any, ...], torch.Tensor] = {}
    dropped = 0
    for key, value in state_dict.items():
        if key.split(".")[-1] == _EXTRA_STATE:
            dropped += 1
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        name = plain_key(key)
        if name.split(".")[-1] == "bias" and value.numel() == 0:
            dropped += 1
            continue
        if name in out:
            raise ValueError(f"state dict keys {key!r} and another both map to {name!r}")
        ident = _storage_key(value)
        if ident not in converted:
            tensor = value.detach().to("cpu")
            converted[ident] = tensor.float() if tensor.is_floating_point() else tensor
        out[name] = converted[ident]
    log.debug("export: %d tensors kept, %d TE-only entries dropped", len(out), dropped)
    return out
