"""TransformerEngine (TE) adapter for the FP8 trainer: whether FP8 can run here, the recipe from
the flags, FP8's shape rules, the FP8 forward context with TE's weight cache, and loading a
model state that holds TE's FP8 scaling state.

Nothing here imports TE when this module is imported: ``load_te()`` does it, guarded, and every
TE call goes through the ``TEInfo`` it returns. Flag validation lives in
``FP8TrainConfig.validate`` (config.py); the export to the plain format in export_checkpoint.py.

Supported: TE 2.x, read in TE's sources at the release tags named below (no GPU here, so the TE
calls are tested against stand-ins built to behave as those sources do; docs/FP8_TRAINING_GUIDE.md
lists the commands that confirm them on a GPU). TE 1.x (last release 1.13, December 2024) is
refused with a reason: it predates the recipes and API names used here, and no user of this
suite is known to need it.

* FP8 region: ``transformer_engine.pytorch.autocast(enabled, calibrating, recipe,
  amax_reduction_group)`` from v2.9 (transformer_engine/pytorch/quantization.py), where
  ``fp8_autocast`` stays as a deprecated alias; before v2.9 only ``fp8_autocast(enabled,
  calibrating, fp8_recipe, fp8_group)`` (transformer_engine/pytorch/fp8.py).
* FP8 available: ``transformer_engine.pytorch.is_fp8_available(return_reason=True)`` from v2.9;
  ``transformer_engine.pytorch.fp8.check_fp8_support() -> (bool, str)`` before.
* Recipes (transformer_engine/common/recipe/__init__.py): ``DelayedScaling(margin, fp8_format,
  amax_history_len, amax_compute_algo, reduce_amax=True)`` in every 2.x;
  ``Float8CurrentScaling(fp8_format)`` from v2.2. Both assert ``fp8_format != Format.E5M2``.
* ``Linear(in_features, out_features, bias, params_dtype, device)``, weight (out, in) like
  nn.Linear; ``forward(inp, is_first_microbatch=None)`` (transformer_engine/pytorch/module/linear.py).
* torch.compile: ``Linear.forward`` carries an unconditional ``@no_torch_dynamo()`` in every
  2.x tag up to v2.18, on release_v2.19 and at the 2.20.0.dev0 head (linear.py; jit.py's
  decorator wraps it in ``torch._dynamo.disable``), so a compiled model of TE linears breaks its
  graph at every linear: a TE model is never compiled here.
* FSDP2 (``torch.distributed.fsdp.fully_shard``): no TE release documents it for
  ``te.pytorch.Linear``. TE's docs/ mention FSDP2 nowhere at any tag through v2.18 nor at the
  head; the Linear docstring neither. What exists is code and tests: FP8 all-gather hooks for
  Float8Tensor (v2.0, PR 1358), "FSDP2 Support for TE" (v2.10, PR 2245), ``is_fsdp2`` paths in
  module/linear.py that skip the cached FP8 weight workspace (v2.16, PR 2805, a fix of FSDP2
  memory leaks), DCP loading fixes (v2.17, PR 2974); the one user-facing example
  (examples/pytorch/quantized_model_init/fully_shard.py, from v2.14) shards ``TransformerLayer``
  with TE's own FusedAdam, not the suite's GPT of ``Linear`` layers. So ``--parallel fsdp`` with
  TE linears is refused (``check_parallel``); without FP8 (no --use_fp8, or the fallback) the
  plain model is sharded as train_improved.py shards it.
* Extra state: each TE module stores its FP8 scaling state as ``<prefix>._extra_state``, a uint8
  tensor holding a pickle. In v2.16.1, v2.17.1 and from v2.18 on (TE pull request 3123, not in 2.17.0;
  transformer_engine/pytorch/_extra_state.py and module/base.py's ``set_extra_state``),
  loading a pickle that holds delayed-scaling data raises RuntimeError unless the environment
  variable ``NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1`` is set at the moment of the load; empty
  state and stateless recipes' state load without it. See ``load_model_state``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, fields
from typing import Any

import torch

from .config import FP8TrainConfig
from .errors import UserError
from .model import LinearFactory
from .parallel import load_full_state

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-build-isolation transformer_engine[pytorch]; see docs/FP8_TRAINING_GUIDE.md"

_MIN_TE = (2, 0)
_AUTOCAST_RENAMED_IN = (2, 9)  # te.pytorch.autocast / is_fp8_available replace fp8_autocast / check_fp8_support
_MIN_FP8_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0, Blackwell 10.0 / 12.0

_FORMATS = {"hybrid": "HYBRID", "e4m3": "E4M3"}  # flag -> transformer_engine.common.recipe.Format member
_RECIPES = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling"}
_DELAYED_ONLY_FLAGS = ("fp8_amax_history_len", "fp8_amax_compute_algo", "fp8_margin")

_FP8_SHAPE_NOTE = "which FP8 matrix products need"

EXTRA_STATE_SUFFIX = "_extra_state"  # torch.nn.Module's state-dict key for get_extra_state()
UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"  # TE 2.16.1, 2.17.1, >= 2.18: see load_model_state

COMPILE_OFF_REASON = ("torch.compile off for the FP8 model: TransformerEngine's Linear.forward is excluded from "
                      "TorchDynamo (@no_torch_dynamo), so compiling would break the graph at every linear layer")


def is_extra_state_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX


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


def _release(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a TE version such as "2.9.0" or "2.20.0.dev0+8cf3c16"; None if unknown."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _version_at_least(te: TEInfo, wanted: tuple[int, int]) -> bool | None:
    release = _release(te.version)
    return None if release is None else release >= wanted


# ----------------------------------------------------------------------------- the version adapter

def _uses_new_autocast(te: TEInfo) -> bool:
    """TE >= 2.9 spells it ``autocast(recipe=, amax_reduction_group=)``; older ``fp8_autocast``."""
    if not hasattr(te.module, "autocast"):
        return False
    return _version_at_least(te, _AUTOCAST_RENAMED_IN) is not False  # unknown version: trust the attribute


def fp8_autocast(te: TEInfo, *, recipe: Any, group: Any) -> ContextManager:
    """TE's FP8 autocast for one forward pass (the backward runs outside it).

    ``group`` is the process group the amaxes are all-reduced over when the context exits (with
    ``reduce_amax=True`` in the delayed recipe): see ``amax_reduction_group()``. Enter a new
    context per micro-batch: with amax reduction a TE module must not run twice inside one region.
    """
    module: Any = te.module
    if _uses_new_autocast(te):
        return module.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return module.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def fp8_supported(te: TEInfo) -> tuple[bool, str]:
    """TE's own FP8 check: ``is_fp8_available(return_reason=True)`` (TE >= 2.9) or
    ``transformer_engine.pytorch.fp8.check_fp8_support()`` (before). Never raises."""
    module: Any = te.module
    try:
        if hasattr(module, "is_fp8_available"):
            ok, reason = module.is_fp8_available(return_reason=True)
        else:
            fp8_module: Any = getattr(module, "fp8", None) or importlib.import_module(f"{module.__name__}.fp8")
            ok, reason = fp8_module.check_fp8_support()
        return bool(ok), str(reason or "")
    except Exception as err:
        return False, f"TransformerEngine's FP8 check failed ({type(err).__name__}: {err})"


def amax_reduction_group() -> Any:
    """The data-parallel group for amax reduction: the whole world (this suite is data-parallel
    only), or None outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


# ----------------------------------------------------------------------------- recipe from flags

def recipe_kwargs(cfg: FP8TrainConfig) -> dict[str, Any]:
    """Keyword arguments for TE's recipe class (flags validated by ``FP8TrainConfig.validate``).

    ``fp8_format`` is the *name* of a ``transformer_engine.common.recipe.Format`` member;
    ``build_recipe`` turns it into the enum.
    """
    if cfg.fp8_recipe == "current":
        return {"fp8_format": _FORMATS[cfg.fp8_format]}
    return {"margin": cfg.fp8_margin, "fp8_format": _FORMATS[cfg.fp8_format],
            "amax_history_len": cfg.fp8_amax_history_len, "amax_compute_algo": cfg.fp8_amax_compute_algo,
            "reduce_amax": True}  # over the group given to autocast: see amax_reduction_group()


def _note_ignored_delayed_flags(cfg: FP8TrainConfig) -> None:
    defaults = {f.name: f.default for f in fields(FP8TrainConfig)}
    changed = [f"--{name}" for name in _DELAYED_ONLY_FLAGS if getattr(cfg, name) != defaults[name]]
    if changed:
        log.warning("ignoring %s: used by --fp8_recipe delayed only, not by --fp8_recipe current",
                    ", ".join(changed))


def build_recipe(cfg: FP8TrainConfig, te: TEInfo) -> Any:
    """``DelayedScaling(**recipe_kwargs(cfg))`` or ``Float8CurrentScaling(fp8_format=...)``.

    Amax reduction over the data-parallel group happens through the group given to
    ``fp8_autocast``; current scaling keeps no amax history, so it has nothing to reduce.
    """
    recipe_mod: Any = te.recipe_module or importlib.import_module("transformer_engine.common.recipe")
    cls = getattr(recipe_mod, _RECIPES[cfg.fp8_recipe], None)
    if cls is None:  # Float8CurrentScaling arrived in TE 2.2
        raise UserError(f"--fp8_recipe {cfg.fp8_recipe} needs TransformerEngine's {_RECIPES[cfg.fp8_recipe]}, "
                        f"which TransformerEngine {te.version} lacks; upgrade TE or use --fp8_recipe delayed")
    if cfg.fp8_recipe == "current":
        _note_ignored_delayed_flags(cfg)
    kwargs = recipe_kwargs(cfg)
    kwargs["fp8_format"] = getattr(recipe_mod.Format, kwargs["fp8_format"])
    return cls(**kwargs)


def precision_name(cfg: FP8TrainConfig) -> str:
    """Label of an FP8 run, e.g. "fp8-hybrid-delayed"."""
    return f"fp8-{cfg.fp8_format}-{cfg.fp8_recipe}"


# ----------------------------------------------------------------------------- shapes

def check_fp8_shapes(cfg: FP8TrainConfig) -> None:
    """Refuse a model whose linear layers FP8 cannot multiply, naming the flag to change.

    Every linear's input and output width must be a multiple of 16 (n_embd, 3*n_embd, 4*n_embd:
    all follow from n_embd) and the tokens of a micro-batch (batch_size * block_size, the
    product of the leading dimensions) a multiple of 8 (TE's ``assert_dim_for_fp8_exec``).
    """
    n_embd = cfg.n_embd
    widths = {"attention qkv": (n_embd, 3 * n_embd), "attention output": (n_embd, n_embd),
              "MLP up": (n_embd, 4 * n_embd), "MLP down": (4 * n_embd, n_embd)}
    for layer, (fan_in, fan_out) in widths.items():
        if fan_in % 16 or fan_out % 16:
            suggestion = (n_embd // 16 + 1) * 16
            raise UserError(f"--n_embd {n_embd} is not a multiple of 16, {_FP8_SHAPE_NOTE} "
                            f"(the {layer} layer is {fan_in} -> {fan_out}); use e.g. --n_embd {suggestion}")
    batch, block = cfg.batch_size, cfg.block_size
    if (batch * block) % 8:
        raise UserError(f"--batch_size {batch} x --block_size {block} = {batch * block} tokens per "
                        f"micro-batch is not a multiple of 8, {_FP8_SHAPE_NOTE}; change --batch_size "
                        f"or --block_size")


# ----------------------------------------------------------------------------- the fallback decision

@dataclass(frozen=True)
class PrecisionPlan:
    """How the FP8 script trains on this machine, and why.

    use_fp8: TE linears under FP8 autocast; else the ordinary model, as train_improved.py trains
    it. precision: the label for log, meta, hparams. fallback: FP8 was asked for and is not
    possible here (warn with ``reason``). te: the TransformerEngine found (None without --use_fp8).
    """

    use_fp8: bool
    precision: str
    reason: str
    fallback: bool = False
    te: TEInfo | None = None

    def to_meta(self) -> dict[str, Any]:
        return {"precision": self.precision, "transformer_engine": self.te.version if self.te else None,
                "use_fp8": self.use_fp8, "fp8_fallback": self.fallback, "precision_reason": self.reason}


def _cuda_device_info(device: torch.device) -> tuple[str, tuple[int, int]]:
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), (int(major), int(minor))


def _fp8_blocker(device: torch.device, te: TEInfo) -> str | None:
    """Why FP8 cannot run here, or None."""
    if not te.installed:
        if te.error:
            found = f"TransformerEngine {te.version}" if te.version else "TransformerEngine"
            return f"{found} is installed but failed to import ({te.error})"
        return f"TransformerEngine is not installed ({INSTALL_HINT})"
    if _version_at_least(te, _MIN_TE) is False:
        return f"TransformerEngine {te.version} is older than 2.0, which this script needs ({INSTALL_HINT})"
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


def plan_precision(cfg: FP8TrainConfig, device: torch.device, plain_precision: str,
                   load: Callable[[], TEInfo] | None = None) -> PrecisionPlan:
    """FP8 or the ordinary model (trained in ``plain_precision``, as train_improved.py would).
    TE is imported (``load``, default ``load_te``) only under --use_fp8. Raises UserError for
    --require_fp8 when FP8 is not possible here."""
    if not cfg.use_fp8:
        return PrecisionPlan(False, plain_precision, f"FP8 off (no --use_fp8): the ordinary model in "
                             f"{plain_precision}, as train_improved.py trains it")
    te = (load or load_te)()
    problem = _fp8_blocker(device, te)
    if problem is None:
        name, cap = _cuda_device_info(device)
        precision = precision_name(cfg)
        return PrecisionPlan(True, precision, f"{precision} with TransformerEngine {te.version} on GPU "
                             f"{name} (sm_{cap[0]}{cap[1]})", te=te)
    if cfg.require_fp8:
        raise UserError(f"--require_fp8: FP8 training is not possible here: {problem}")
    return PrecisionPlan(False, plain_precision, f"FP8 unavailable: {problem}; training the ordinary model in "
                         f"{plain_precision} instead", fallback=True, te=te)


def check_parallel(plan: PrecisionPlan, parallel: str) -> None:
    """Refuse to shard TE linears with FSDP2 (undocumented by TE: see the module docstring)."""
    if plan.use_fp8 and parallel == "fsdp":
        version = plan.te.version if plan.te else "?"
        raise UserError(f"--parallel fsdp with --use_fp8: TransformerEngine {version} does not document FSDP2 "
                        "(fully_shard) for te.pytorch.Linear (no release up to 2.18 does); use --parallel ddp "
                        "for FP8, or --parallel fsdp without --use_fp8")


# ----------------------------------------------------------------------------- the FP8 forward

class FP8Forward:
    """The FP8 model's per-forward state: TE's autocast, and the ``is_first_microbatch`` flag the
    TE linears built by ``linear_factory`` pass to ``te.pytorch.Linear.forward``.

    What TE does with the flag (module/linear.py and base.py's ``quantize_weight``, the same in
    every 2.x tag through the 2.20.0.dev0 head): None quantizes the weight afresh at every
    forward and caches nothing; True quantizes it into a cached workspace (``_fp8_workspaces``);
    False reuses that workspace as it is. Without FP8 the flag changes nothing here (it only
    steers ``fuse_wgrad_accumulation``, which this suite leaves off). So True on the first
    micro-step of each optimizer step and False on the others quantize each weight once per
    step instead of once per micro-step; None (evaluation, generation, any forward outside
    ``forward_context``) never touches the cache.
    """

    def __init__(self, te: TEInfo, recipe: Any, group: Any) -> None:
        self.te = te
        self.recipe = recipe
        self.group = group
        self.first_microbatch: bool | None = None  # read by the linears during a forward

    @contextlib.contextmanager
    def forward_context(self, first_microbatch: bool | None = None) -> Iterator[None]:
        """One forward pass in FP8. ``first_microbatch``: True on the first micro-step of an
        optimizer step, False on the others, None (the default) for evaluation and generation."""
        previous, self.first_microbatch = self.first_microbatch, first_microbatch
        try:
            with fp8_autocast(self.te, recipe=self.recipe, group=self.group):
                yield
        finally:
            self.first_microbatch = previous

    def linear_factory(self, device: torch.device) -> LinearFactory:
        """Builds ``te.pytorch.Linear(in, out, bias=, params_dtype=torch.float32, device=)`` whose
        forward passes this object's ``first_microbatch``.

        fp32 master weights: TE takes the activation dtype (bf16) from torch.autocast. TE
        initialises the weight itself; the GPT re-initialises it afterwards.
        """
        linear_cls = _first_microbatch_linear(self.te.module.Linear)

        def make(in_features: int, out_features: int, bias: bool) -> torch.nn.Module:
            layer = linear_cls(in_features, out_features, bias=bias, params_dtype=torch.float32, device=device)
            layer.fp8_forward = self
            return layer

        return make


def _first_microbatch_linear(te_linear: type) -> type:
    """A subclass of TE's Linear (same parameters and state-dict keys) passing the flag of its
    ``FP8Forward``. After ``load_state_dict`` (resume, rollback) the cached FP8 weight is stale:
    the next forward that would reuse it (False) quantizes afresh instead."""

    class FirstMicrobatchLinear(te_linear):
        fp8_forward: FP8Forward | None = None
        _weight_cache_stale = False

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            first = self.fp8_forward.first_microbatch if self.fp8_forward is not None else None
            if first is False and self._weight_cache_stale:
                first = True
            if first:
                self._weight_cache_stale = False
            return super().forward(inp, is_first_microbatch=first)

        def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
            super()._load_from_state_dict(*args, **kwargs)
            self._weight_cache_stale = True

    return FirstMicrobatchLinear


# ----------------------------------------------------------------------------- loading a model state

def _extra_state_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the model's extra state, found the way torch does (an overridden
    get_extra_state), without calling TE."""
    keys = set()
    for name, module in model.named_modules():
        if getattr(type(module), "get_extra_state", None) is not torch.nn.Module.get_extra_state:
            keys.add(f"{name}.{EXTRA_STATE_SUFFIX}" if name else EXTRA_STATE_SUFFIX)
    return keys


def align_extra_state(state_dict: Mapping[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Make a checkpoint's ``_extra_state`` entries match ``model`` for a strict load.

    A checkpoint of the ordinary model (a fallback run) resumed on an FP8 GPU lacks TE's entries:
    they are added empty (TE's ``set_extra_state`` returns at once for an empty tensor, so scaling
    starts afresh). A TE checkpoint resumed by the ordinary model has entries it cannot take: they
    are dropped. Same-model resumes keep every entry.
    """
    wanted = _extra_state_keys(model)
    present = {k for k in state_dict if is_extra_state_key(k)}
    out = {k: v for k, v in state_dict.items() if k not in present - wanted}
    for key in sorted(wanted - present):
        out[key] = torch.empty(0, dtype=torch.uint8)
    if wanted != present:
        log.warning("checkpoint and model differ in FP8 scaling state (%d entries added empty, %d dropped): "
                    "the checkpoint was written with another precision; FP8 scaling starts afresh",
                    len(wanted - present), len(present - wanted))
    return out


def _holds_pickle(value: Any) -> bool:
    return not (isinstance(value, torch.Tensor) and value.numel() == 0)


_unsafe_pickle_lock = threading.Lock()


@contextlib.contextmanager
def _te_may_unpickle_extra_state() -> Iterator[None]:
    """Set NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 for the duration of one load, then restore it.

    TE reads the variable at each ``set_extra_state`` call (``unsafe_pickle_extra_state_enabled``
    calls os.getenv), so this scope is all it sees. The environment is process-wide: the lock
    keeps two loads of this process from interleaving their set and restore; the suite loads on
    one thread, and nothing else of it reads the variable.
    """
    with _unsafe_pickle_lock:
        previous = os.environ.get(UNSAFE_PICKLE_ENV)
        os.environ[UNSAFE_PICKLE_ENV] = "1"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(UNSAFE_PICKLE_ENV, None)
            else:
                os.environ[UNSAFE_PICKLE_ENV] = previous


def load_model_state(model: torch.nn.Module, state_dict: Mapping[str, Any], trusted: bool) -> None:
    """Load a checkpoint's model state into ``model`` (unwrapped), strictly, whatever precision
    wrote it (``align_extra_state``).

    TE's FP8 scaling state is a pickle, and unpickling can run code. ``trusted``: the file is one
    the suite wrote itself, its sha256 verified against its sidecar; TE may then unpickle it, so
    delayed scaling continues with its amax history (TE 2.16.1, 2.17.1 and >= 2.18 refuse that without
    NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1, set here for this load only). Otherwise (a file
    without a verified sidecar, a foreign file) every non-empty scaling state is dropped with a
    warning before TE sees it, on any TE version: the weights load, scaling starts afresh.
    """
    state = align_extra_state(state_dict, model)
    pickled = [k for k, v in state.items() if is_extra_state_key(k) and _holds_pickle(v)]
    if pickled and not trusted:
        log.warning("the checkpoint is not verified against a sidecar sha256 written by this suite: dropping "
                    "its FP8 scaling state (%d TransformerEngine entries, pickles that would run code on load); "
                    "the weights load and FP8 scaling starts afresh", len(pickled))
        state.update({k: torch.empty(0, dtype=torch.uint8) for k in pickled})
    with _te_may_unpickle_extra_state() if pickled and trusted else contextlib.nullcontext():
        load_full_state(model, state)
