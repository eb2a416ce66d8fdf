"""The FP8 adapter (common/fp8.py), the FP8 script's model spec, the fallback on this CPU machine,
and the checkpoint export.

TransformerEngine cannot be installed here (no GPU). Every test that needs TE uses ``FakeTE``, a
stand-in built to behave as TE's source does at the release tags named in common/fp8.py: the
API names before and from 2.9, ``Linear.forward``'s weight cache under ``is_first_microbatch``,
and ``set_extra_state``'s refusal of pickled delayed-scaling state in 2.16.1, 2.17.1 and >= 2.18.
They check what the adapter asks of TE, not TE; docs/FP8_TRAINING_GUIDE.md lists the commands
that confirm the same on a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import export_checkpoint
import train_fp8
from common import fp8
from common.checkpoint import validate_checkpoint
from common.config import FP8TrainConfig, parse_args
from common.dist import DistContext
from common.errors import UserError
from common.fp8 import (
    COMPILE_OFF_REASON,
    UNSAFE_PICKLE_ENV,
    FP8Forward,
    PrecisionPlan,
    TEInfo,
    align_extra_state,
    build_recipe,
    check_fp8_shapes,
    fp8_autocast,
    fp8_supported,
    load_model_state,
    load_te,
    plan_precision,
    recipe_kwargs,
)
from common.model import GPT, GPTConfig
from export_checkpoint import export_plain_state_dict

SRC = Path(__file__).resolve().parents[1] / "src"
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only a name here: every CUDA query is replaced in the tests using it
CPU_CTX = DistContext(rank=0, local_rank=0, world_size=1, local_world_size=1, device=CPU, backend=None)
CUDA_CTX = dataclasses.replace(CPU_CTX, device=CUDA)
TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
LINEARS_PER_BLOCK = 4  # c_attn, attn c_proj, c_fc, mlp c_proj


def cfg(**overrides: Any) -> FP8TrainConfig:
    return dataclasses.replace(FP8TrainConfig(use_fp8=True), **overrides)


# ------------------------------------------------------------------ the TE stand-in

class FakeFormat(Enum):
    E4M3 = "e4m3"
    E5M2 = "e5m2"
    HYBRID = "hybrid"


@dataclass
class FakeDelayedScaling:
    """transformer_engine.common.recipe.DelayedScaling as in every 2.x tag."""

    margin: int = 0
    fp8_format: FakeFormat = FakeFormat.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    scaling_factor_compute_algo: Any = None
    reduce_amax: bool = True

    def __post_init__(self) -> None:
        assert self.fp8_format != FakeFormat.E5M2, "Pure E5M2 training is not supported."


@dataclass
class FakeCurrentScaling:
    """Float8CurrentScaling, from v2.2."""

    fp8_format: FakeFormat = FakeFormat.HYBRID


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


class FakeTE:
    """``transformer_engine.pytorch`` as TE's source reads at ``version`` (2.x):

    * ``autocast(enabled, calibrating, recipe, amax_reduction_group)`` and
      ``is_fp8_available(return_reason)`` from 2.9, ``fp8_autocast`` kept as an alias; before 2.9
      ``fp8_autocast(enabled, calibrating, fp8_recipe, fp8_group)`` and
      ``fp8.check_fp8_support()``. ``Float8CurrentScaling`` from 2.2.
    * ``Linear`` (see ``make_linear_class``): the weight workspace cache of module/linear.py.
    * ``set_extra_state``: in 2.16.1, 2.17.1 and >= 2.18 a non-empty pickled state raises unless
      NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE is "1" when it is called (_extra_state.py).
    """

    def __init__(self, version: str = "2.18.0", fp8_ok: tuple[bool, str] = (True, "")) -> None:
        self.version = version
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fp8_enabled = False
        self.quantizations = 0
        self.unpickled = 0
        self.env_seen_at_load: list[str | None] = []
        release = _release(version)
        self.refuses_unsafe_pickle = release >= (2, 18) or release[:2] in {(2, 16), (2, 17)} and release[2:] >= (1,)
        recipes: dict[str, Any] = {"Format": FakeFormat, "DelayedScaling": FakeDelayedScaling}
        if release >= (2, 2):
            recipes["Float8CurrentScaling"] = FakeCurrentScaling
        self.recipe_module = SimpleNamespace(**recipes)
        api: dict[str, Any] = {"__name__": "fake_te.pytorch", "Linear": self.make_linear_class(),
                               "fp8_autocast": self._context("fp8_autocast")}
        if release >= (2, 9):
            api["autocast"] = self._context("autocast")
            api["is_fp8_available"] = lambda return_reason=False: fp8_ok if return_reason else fp8_ok[0]
        else:
            api["fp8"] = SimpleNamespace(check_fp8_support=lambda: fp8_ok)
        self.module = SimpleNamespace(**api)

    def info(self) -> TEInfo:
        return TEInfo(True, self.version, self.module, recipe_module=self.recipe_module)

    def _context(self, name: str):
        @contextlib.contextmanager
        def region(**kwargs: Any) -> Iterator[None]:
            self.calls.append((name, kwargs))
            previous, self.fp8_enabled = self.fp8_enabled, bool(kwargs.get("enabled", True))
            try:
                yield
            finally:
                self.fp8_enabled = previous

        return region

    def quantize(self, weight: torch.Tensor) -> torch.Tensor:
        self.quantizations += 1
        return weight.detach().to(torch.bfloat16).float()  # lossy, like a cast to FP8

    def make_linear_class(self) -> type:
        te = self

        class Linear(nn.Linear):
            """te.pytorch.Linear: (out, in) weight; under FP8, ``is_first_microbatch`` None
            quantizes afresh and caches nothing, True re-quantizes into the cached workspace,
            False reuses the workspace as it is (module/linear.py, base.py quantize_weight).
            Without FP8 the flag changes nothing."""

            def __init__(self, in_features: int, out_features: int, bias: bool = True,
                         params_dtype: torch.dtype | None = None, device: Any = "cuda") -> None:
                te.calls.append(("Linear", dict(in_features=in_features, out_features=out_features, bias=bias,
                                                params_dtype=params_dtype, device=device)))
                super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)
                self._fp8_workspaces: dict[str, torch.Tensor] = {}
                self.scaling: dict[str, Any] | None = None

            def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
                if not te.fp8_enabled:
                    return F.linear(inp, self.weight, self.bias)
                self.scaling = {"recipe": "DelayedScaling", "scale_fwd": torch.ones(3),
                                "amax_history_fwd": torch.full((4, 3), 2.0)}
                cache_name = None if is_first_microbatch is None else "weight"
                workspace = self._fp8_workspaces.get(cache_name) if cache_name else None
                if workspace is None:
                    workspace = te.quantize(self.weight)
                    if cache_name:
                        self._fp8_workspaces[cache_name] = workspace
                elif is_first_microbatch:
                    workspace.copy_(te.quantize(self.weight))
                # the quantized weight forward, the weight's own gradient backward
                return F.linear(inp, workspace + (self.weight - self.weight.detach()), self.bias)

            def get_extra_state(self) -> torch.Tensor:
                if self.scaling is None:
                    return torch.empty(0, dtype=torch.uint8)
                return torch.frombuffer(bytearray(pickle.dumps(self.scaling)), dtype=torch.uint8)

            def set_extra_state(self, state: Any) -> None:
                te.env_seen_at_load.append(os.environ.get(UNSAFE_PICKLE_ENV))
                if state is None or state.numel() == 0:
                    return
                if te.refuses_unsafe_pickle and os.getenv(UNSAFE_PICKLE_ENV, "0") != "1":
                    raise RuntimeError("Refusing to load pickled Transformer Engine extra state for Linear. "
                                       f"To load it anyway, set {UNSAFE_PICKLE_ENV}=1.")
                te.unpickled += 1
                self.scaling = pickle.loads(state.numpy().tobytes())

        return Linear


NO_TE = TEInfo(installed=False, version=None, module=None)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device is the given GPU (name, capability)."""
    def set_gpu(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(fp8, "_cuda_device_info", lambda device: (name, capability))

    return set_gpu


def te_loader(te: TEInfo):
    return lambda: te


def must_not_load() -> TEInfo:
    raise AssertionError("TransformerEngine must not be imported without --use_fp8")


# ------------------------------------------------------------------ flags (validated in config.py)

def test_e5m2_is_refused_at_parse_time_naming_the_choices():
    with pytest.raises(UserError) as err:
        parse_args(["--fp8_format", "e5m2"], FP8TrainConfig)
    text = str(err.value)
    assert "--fp8_format e5m2" in text and "hybrid" in text and "e4m3" in text


@pytest.mark.parametrize("flag,value", [("fp8_recipe", "tensorwise"), ("fp8_format", "fp8"),
                                        ("fp8_amax_compute_algo", "mean"), ("fp8_amax_history_len", "0"),
                                        ("fp8_margin", "-1")])
def test_bad_fp8_flags_are_refused_at_parse_time_naming_the_flag(flag, value):
    with pytest.raises(UserError, match=f"--{flag}"):
        parse_args([f"--{flag}", value], FP8TrainConfig)


def test_require_fp8_without_use_fp8_is_refused_at_parse_time():
    with pytest.raises(UserError, match="--require_fp8 needs --use_fp8"):
        parse_args(["--require_fp8"], FP8TrainConfig)
    assert parse_args(["--require_fp8", "--use_fp8"], FP8TrainConfig)[0].require_fp8


# ------------------------------------------------------------------ recipe from flags

@pytest.mark.parametrize("fmt,expected", [("hybrid", "HYBRID"), ("e4m3", "E4M3")])
@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_recipe_kwargs_delayed(fmt, expected, algo):
    c = cfg(fp8_format=fmt, fp8_amax_compute_algo=algo, fp8_amax_history_len=16, fp8_margin=2)
    assert recipe_kwargs(c) == {"margin": 2, "fp8_format": expected, "amax_history_len": 16,
                                "amax_compute_algo": algo, "reduce_amax": True}


def test_recipe_kwargs_current_takes_only_the_format():
    assert recipe_kwargs(cfg(fp8_recipe="current", fp8_format="e4m3")) == {"fp8_format": "E4M3"}


def test_build_recipe_delayed_passes_every_flag():
    recipe = build_recipe(cfg(fp8_format="e4m3", fp8_amax_history_len=32, fp8_amax_compute_algo="most_recent",
                              fp8_margin=1), FakeTE().info())
    assert recipe == FakeDelayedScaling(margin=1, fp8_format=FakeFormat.E4M3, amax_history_len=32,
                                        amax_compute_algo="most_recent", reduce_amax=True)


def test_build_recipe_current_warns_about_delayed_only_flags(caplog):
    assert build_recipe(cfg(fp8_recipe="current"), FakeTE().info()) == FakeCurrentScaling(FakeFormat.HYBRID)
    assert "ignoring" not in caplog.text
    build_recipe(cfg(fp8_recipe="current", fp8_amax_history_len=16), FakeTE().info())
    assert "ignoring --fp8_amax_history_len: used by --fp8_recipe delayed only" in caplog.text


def test_current_scaling_on_te_before_2_2_is_a_user_error():
    """Float8CurrentScaling arrived in TE 2.2 (common/recipe/__init__.py at v2.2)."""
    te = FakeTE(version="2.1.0").info()
    assert build_recipe(cfg(), te) == FakeDelayedScaling()
    with pytest.raises(UserError, match="Float8CurrentScaling"):
        build_recipe(cfg(fp8_recipe="current"), te)


# ------------------------------------------------------------------ shapes

@pytest.mark.parametrize("n_embd", [768, 1024, 1280, 1600])
def test_gpt2_shapes_pass(n_embd):
    check_fp8_shapes(cfg(n_embd=n_embd, batch_size=8, block_size=1024))
    check_fp8_shapes(cfg(n_embd=n_embd, batch_size=1, block_size=8))


def test_bad_width_names_n_embd():
    with pytest.raises(UserError) as err:
        check_fp8_shapes(cfg(n_embd=100))
    assert "--n_embd 100 is not a multiple of 16, which FP8 matrix products need" in str(err.value)
    assert "--n_embd 112" in str(err.value)


def test_bad_token_count_names_batch_and_block():
    with pytest.raises(UserError) as err:
        check_fp8_shapes(cfg(batch_size=3, block_size=5))
    text = str(err.value)
    assert "--batch_size 3" in text and "--block_size 5" in text and "15 tokens" in text and "multiple of 8" in text


# ------------------------------------------------------------------ the version adapter

@pytest.mark.parametrize("version", ["2.9.0", "2.9.0.dev0+8cf3c16", "2.18.0", "2.20.0.dev0"])
def test_te_2_9_and_later_use_autocast_with_the_new_names(version):
    te = FakeTE(version=version)
    group, recipe = object(), object()
    with fp8_autocast(te.info(), recipe=recipe, group=group):
        assert te.fp8_enabled
    assert te.calls == [("autocast", {"enabled": True, "recipe": recipe, "amax_reduction_group": group})]


@pytest.mark.parametrize("version", ["2.0.0", "2.8.0"])
def test_te_before_2_9_uses_fp8_autocast_with_the_old_names(version):
    te = FakeTE(version=version)
    with fp8_autocast(te.info(), recipe="r", group="g"):
        pass
    assert te.calls == [("fp8_autocast", {"enabled": True, "fp8_recipe": "r", "fp8_group": "g"})]


def test_an_old_version_number_wins_over_a_stray_autocast_attribute():
    te = FakeTE(version="2.9.0")
    info = dataclasses.replace(te.info(), version="2.8.0")
    with fp8_autocast(info, recipe="r", group=None):
        pass
    assert [name for name, _ in te.calls] == ["fp8_autocast"]


def test_fp8_supported_on_both_api_shapes():
    reason = "Device compute capability 8.9 or higher required for FP8 execution."
    assert fp8_supported(FakeTE("2.9.0", fp8_ok=(False, reason)).info()) == (False, reason)
    assert fp8_supported(FakeTE("2.8.0", fp8_ok=(True, "")).info()) == (True, "")


def test_fp8_supported_never_raises():
    def boom(return_reason=False):
        raise RuntimeError("CUDA driver missing")

    ok, reason = fp8_supported(TEInfo(True, "2.9.0", SimpleNamespace(is_fp8_available=boom)))
    assert not ok and "CUDA driver missing" in reason


# ------------------------------------------------------------------ loading TE and the fallback here

def test_load_te_here_reports_it_absent():
    te = load_te()
    assert te.installed is False and te.module is None


def test_load_te_never_raises_on_a_broken_install(tmp_path, monkeypatch):
    pkg = tmp_path / "transformer_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudnn.so.9: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    te = load_te()
    assert te.installed is False and "libcudnn" in (te.error or "")
    plan = plan_precision(cfg(), CPU, "fp32", load=te_loader(te))
    assert plan.fallback and "failed to import" in plan.reason
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        sys.modules.pop(name)  # a failed import leaves nothing behind; make sure of it


def test_fallback_on_this_machine_names_transformer_engine():
    plan = plan_precision(cfg(), CPU, "fp32")
    assert plan.fallback and not plan.use_fp8 and plan.precision == "fp32"
    assert "TransformerEngine is not installed" in plan.reason and "pip install" in plan.reason


def test_require_fp8_here_is_a_user_error_with_the_reason():
    with pytest.raises(UserError) as err:
        plan_precision(cfg(require_fp8=True), CPU, "fp32")
    assert "--require_fp8" in str(err.value) and "TransformerEngine" in str(err.value)


def test_te_without_cuda_falls_back_naming_cuda():
    plan = plan_precision(cfg(), CPU, "fp32", load=te_loader(FakeTE().info()))
    assert plan.fallback and not plan.use_fp8 and "no CUDA device" in plan.reason and plan.precision == "fp32"


def test_te_1_x_is_refused_naming_the_version(gpu):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    te_1 = dataclasses.replace(FakeTE("2.8.0").info(), version="1.13.0")
    plan = plan_precision(cfg(), CUDA, "bf16", load=te_loader(te_1))
    assert plan.fallback and "TransformerEngine 1.13.0 is older than 2.0" in plan.reason


def test_gpu_below_8_9_is_named_with_its_capability(gpu):
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    plan = plan_precision(cfg(), CUDA, "bf16", load=te_loader(FakeTE().info()))
    assert plan.fallback and plan.precision == "bf16" and not plan.use_fp8
    assert "NVIDIA A100-SXM4-80GB" in plan.reason and "8.0" in plan.reason and "8.9" in plan.reason
    with pytest.raises(UserError, match="A100"):
        plan_precision(cfg(require_fp8=True), CUDA, "bf16", load=te_loader(FakeTE().info()))


def test_te_check_saying_no_is_passed_on(gpu):
    gpu("NVIDIA L4", (8, 9))
    te = FakeTE(fp8_ok=(False, "Cuda version 12.1 or higher required for FP8 execution on Ada.")).info()
    plan = plan_precision(cfg(), CUDA, "bf16", load=te_loader(te))
    assert plan.fallback and "Cuda version 12.1" in plan.reason and "NVIDIA L4" in plan.reason


@pytest.mark.parametrize("version", ["2.8.0", "2.18.0"])
def test_fp8_on_hopper(gpu, version):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    plan = plan_precision(cfg(fp8_recipe="current", fp8_format="e4m3"), CUDA, "bf16",
                          load=te_loader(FakeTE(version).info()))
    assert plan.use_fp8 and not plan.fallback
    assert plan.precision == "fp8-e4m3-current" and "H100" in plan.reason and "sm_90" in plan.reason
    assert plan.to_meta()["transformer_engine"] == version


def test_without_use_fp8_the_ordinary_model_and_te_is_not_imported(gpu):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    plan = plan_precision(cfg(use_fp8=False), CUDA, "bf16", load=must_not_load)
    assert plan == PrecisionPlan(False, "bf16", plan.reason)
    assert "no --use_fp8" in plan.reason and plan.to_meta()["transformer_engine"] is None


# ------------------------------------------------------------------ the FP8 script's model spec

def test_without_use_fp8_the_script_trains_the_plain_model_compiled_per_compile_flag():
    """Issue 15: no TE model without --use_fp8, so nothing stops --compile."""
    spec = train_fp8.fp8_model_spec(cfg(use_fp8=False, compile=True), CPU_CTX)
    assert spec.build is GPT and spec.allow_compile and spec.precision == "fp32"
    assert spec.meta["use_fp8"] is False and spec.meta["precision"] == "fp32"
    with spec.forward_context():
        pass


def test_the_fallback_spec_is_the_plain_model_too():
    spec = train_fp8.fp8_model_spec(cfg(compile=True), CPU_CTX)
    assert spec.build is GPT and spec.allow_compile and spec.meta["fp8_fallback"] is True


def test_the_fp8_model_is_never_compiled(gpu, monkeypatch, caplog):
    """TE's Linear.forward carries an unconditional @no_torch_dynamo() at every 2.x tag and at the
    2.20.0.dev0 head (module/linear.py): a compiled TE model breaks its graph at every linear."""
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    caplog.set_level(logging.INFO)
    te = FakeTE("2.18.0")
    monkeypatch.setattr(fp8, "load_te", te.info)
    spec = train_fp8.fp8_model_spec(cfg(fp8_recipe="current", compile=True), CUDA_CTX)
    assert spec.allow_compile is False and spec.precision == "fp8-hybrid-current"
    assert COMPILE_OFF_REASON in caplog.text
    model = spec.build(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    block = model.transformer.h[0]
    for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert isinstance(layer, te.module.Linear) and layer.fp8_forward is not None
    built = [kwargs for name, kwargs in te.calls if name == "Linear"]
    assert len(built) == LINEARS_PER_BLOCK
    assert all(kw["params_dtype"] is torch.float32 and kw["device"] == CUDA for kw in built)  # fp32 master weights
    with spec.forward_context():  # the trainer of today calls it without an argument
        assert te.fp8_enabled


# ------------------------------------------------------------------ --parallel fsdp (issue 13)

@pytest.mark.parametrize("version", ["2.10.0", "2.16.1", "2.18.0"])
def test_fsdp_of_te_linears_is_refused_at_start_in_one_line(gpu, monkeypatch, version):
    """No TE release documents FSDP2 for te.pytorch.Linear (common/fp8.py names what TE has):
    where FP8 would run, --parallel fsdp is refused before any model is built (stand-in TE)."""
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    te = FakeTE(version)
    monkeypatch.setattr(fp8, "load_te", te.info)
    with pytest.raises(UserError) as err:
        train_fp8.fp8_model_spec(cfg(parallel="fsdp"), CUDA_CTX)
    assert f"--parallel fsdp with --use_fp8: TransformerEngine {version} does not document FSDP2" in str(err.value)
    assert "use --parallel ddp" in str(err.value) and "\n" not in str(err.value)
    assert not [name for name, _ in te.calls if name == "Linear"]  # refused before building


def test_fsdp_is_allowed_where_the_plain_model_trains(gpu, monkeypatch):
    """FP8 under ddp (stand-in TE), and under fsdp whenever the plain model trains: without
    --use_fp8, or falling back (no TE, no FP8 GPU). The 2-rank fsdp run of the FP8 script on this
    CPU machine is in tests/test_resume.py."""
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(fp8, "load_te", FakeTE("2.18.0").info)
    assert train_fp8.fp8_model_spec(cfg(parallel="ddp"), CUDA_CTX).precision == "fp8-hybrid-delayed"
    assert train_fp8.fp8_model_spec(cfg(parallel="fsdp", use_fp8=False), CUDA_CTX).build is GPT
    monkeypatch.setattr(fp8, "load_te", lambda: NO_TE)
    fallback = train_fp8.fp8_model_spec(cfg(parallel="fsdp"), CUDA_CTX)
    assert fallback.build is GPT and fallback.meta["fp8_fallback"] is True


# ------------------------------------------------------------------ is_first_microbatch (issue 16)

def fp8_gpt(te: FakeTE) -> tuple[GPT, FP8Forward]:
    forward = FP8Forward(te.info(), recipe=FakeDelayedScaling(), group=None)
    torch.manual_seed(0)
    return GPT(TINY, linear_factory=forward.linear_factory(CPU)), forward


def micro_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
            for _ in range(n)]


def train_steps(model: GPT, forward: FP8Forward, steps: int, accum: int, flags: bool) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        for micro, (x, y) in enumerate(micro_batches(accum)):
            with forward.forward_context((micro == 0) if flags else None):
                _, loss = model(x, y)
            (loss / accum).backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses


def test_weights_are_quantized_once_per_optimizer_step_with_the_same_losses():
    """Stand-in of TE's Linear weight cache (module/linear.py): with True on the first micro-step
    and False on the others each weight is quantized once per step, and since the weights do not
    change inside a step the losses equal those of quantizing at every micro-step (None)."""
    steps, accum = 3, 4
    cached_te, fresh_te = FakeTE(), FakeTE()
    cached = train_steps(*fp8_gpt(cached_te), steps, accum, flags=True)
    fresh = train_steps(*fp8_gpt(fresh_te), steps, accum, flags=False)
    linears = TINY.n_layer * LINEARS_PER_BLOCK
    assert cached_te.quantizations == steps * linears
    assert fresh_te.quantizations == steps * accum * linears
    assert cached == fresh


def test_evaluation_passes_none_and_leaves_the_cache_alone():
    te = FakeTE()
    model, forward = fp8_gpt(te)
    (x, y), = micro_batches(1)
    with forward.forward_context(True):
        _, expected = model(x, y)  # training mode: the loss alone
    with torch.no_grad(), forward.forward_context():  # evaluation: None
        model(x, y)
    before = te.quantizations
    with forward.forward_context(False):
        _, got = model(x, y)
    assert te.quantizations == before and torch.equal(got, expected)
    assert forward.first_microbatch is None  # restored after each forward


def test_reloaded_weights_are_never_served_from_a_stale_cache():
    """A rollback or resume that reloads weights between micro-steps: the next forward quantizes
    the reloaded weights even if it is told False (the stand-in would reuse the stale workspace)."""
    te = FakeTE()
    model, forward = fp8_gpt(te)
    other = GPT(TINY, linear_factory=forward.linear_factory(CPU))
    (x, y), = micro_batches(1)
    with forward.forward_context(True):
        model(x, y)
    model.load_state_dict(other.state_dict())
    with forward.forward_context(False):
        _, got = model(x, y)
    with forward.forward_context(None):
        _, expected = model(x, y)  # training mode: the loss alone
    assert torch.equal(got, expected)
    before = te.quantizations
    with forward.forward_context(False):  # refreshed once; the cache serves the rest of the step
        model(x, y)
    assert te.quantizations == before


# ------------------------------------------------------------------ loading a model state (issue 10, item 14)

def delayed_scaling_checkpoint(te: FakeTE) -> dict[str, Any]:
    """A model state as an FP8 run with delayed scaling saves it: every TE linear's _extra_state
    a non-empty pickle holding scale_fwd / amax_history_fwd."""
    model, forward = fp8_gpt(te)
    (x, y), = micro_batches(1)
    with forward.forward_context(True):
        model(x, y)
    state = model.state_dict()
    assert all(v.numel() > 0 for k, v in state.items() if k.endswith("_extra_state"))
    return state


@pytest.fixture
def no_unsafe_pickle_env(monkeypatch):
    monkeypatch.delenv(UNSAFE_PICKLE_ENV, raising=False)


def test_te_2_18_refuses_the_delayed_scaling_state_of_a_plain_load(no_unsafe_pickle_env):
    """What the trainer did before (align, then load_state_dict) against the refusal of TE 2.16.1, 2.17.1, >= 2.18."""
    te = FakeTE("2.18.0")
    state = delayed_scaling_checkpoint(te)
    model, _ = fp8_gpt(te)
    with pytest.raises(RuntimeError, match=UNSAFE_PICKLE_ENV):
        model.load_state_dict(align_extra_state(state, model))


@pytest.mark.parametrize("version", ["2.15.0", "2.16.1", "2.17.1", "2.18.0", "2.20.0.dev0"])
@pytest.mark.parametrize("before", [None, "0"])
def test_a_verified_checkpoint_keeps_its_scaling_state_with_the_variable_scoped_to_the_load(
        monkeypatch, version, before):
    te = FakeTE(version)
    state = delayed_scaling_checkpoint(te)
    if before is None:
        monkeypatch.delenv(UNSAFE_PICKLE_ENV, raising=False)
    else:
        monkeypatch.setenv(UNSAFE_PICKLE_ENV, before)
    model, _ = fp8_gpt(te)
    load_model_state(model, state, trusted=True)
    linears = TINY.n_layer * LINEARS_PER_BLOCK
    assert te.unpickled == linears and set(te.env_seen_at_load) == {"1"}
    assert torch.equal(model.transformer.h[0].mlp.c_fc.scaling["amax_history_fwd"], torch.full((4, 3), 2.0))
    assert os.environ.get(UNSAFE_PICKLE_ENV) == before


def test_the_variable_is_restored_when_the_load_fails(no_unsafe_pickle_env):
    te = FakeTE()
    state = delayed_scaling_checkpoint(te)
    state["transformer.wte.weight"] = torch.zeros(3)  # a wrong shape: load_state_dict raises
    model, _ = fp8_gpt(te)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model_state(model, state, trusted=True)
    assert UNSAFE_PICKLE_ENV not in os.environ


@pytest.mark.parametrize("version", ["2.15.0", "2.18.0"])
def test_an_unverified_file_loads_its_weights_and_drops_the_scaling_state_unread(
        no_unsafe_pickle_env, caplog, version):
    """Never handed to TE, whichever TE: TE 2.16.0, 2.17.0 and older would unpickle it unasked."""
    te = FakeTE(version)
    state = delayed_scaling_checkpoint(te)
    model, _ = fp8_gpt(te)
    load_model_state(model, state, trusted=False)
    assert te.unpickled == 0 and set(te.env_seen_at_load) == {None}
    assert torch.equal(model.transformer.wte.weight, state["transformer.wte.weight"])
    assert "not verified against a sidecar sha256" in caplog.text and "8 TransformerEngine entries" in caplog.text


def test_states_without_scaling_state_load_without_the_variable(no_unsafe_pickle_env, caplog):
    """Current scaling (stateless in 2.16.1, 2.17.1, >= 2.18: an empty _extra_state) and checkpoints of the
    ordinary model need no unpickling: nothing is set, nothing is warned about."""
    te = FakeTE()
    model, _ = fp8_gpt(te)
    plain = GPT(TINY).state_dict()
    load_model_state(model, plain, trusted=False)  # a fallback run's checkpoint resumed with FP8
    load_model_state(model, model.state_dict(), trusted=True)
    assert set(te.env_seen_at_load) == {None} and "not verified" not in caplog.text
    fp8_state = delayed_scaling_checkpoint(te)
    load_model_state(GPT(TINY), fp8_state, trusted=False)  # an FP8 checkpoint resumed by the fallback
    assert te.unpickled == 0


class TELinearStandIn(nn.Linear):
    """Same parameters as te.pytorch.Linear ((out, in) weight, bias) plus an _extra_state entry
    the way TE 2.x stores it: a uint8 tensor holding pickled FP8 scaling state."""

    def get_extra_state(self) -> torch.Tensor:
        state = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.rand(16, 3),
                 "extra_fp8_variables": {"num_gemms": 1}}
        return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        self.loaded_extra_state = state


class TinyGPT(nn.Module):
    """GPT's module tree in miniature (same key names), for checks without common.model."""

    def __init__(self, linear=nn.Linear, vocab: int = 64, n_embd: int = 32, n_layer: int = 2, block: int = 16):
        super().__init__()

        def block_module() -> nn.Module:
            return nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(n_embd),
                attn=nn.ModuleDict(dict(c_attn=linear(n_embd, 3 * n_embd), c_proj=linear(n_embd, n_embd))),
                ln_2=nn.LayerNorm(n_embd),
                mlp=nn.ModuleDict(dict(c_fc=linear(n_embd, 4 * n_embd), c_proj=linear(4 * n_embd, n_embd)))))

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd), wpe=nn.Embedding(block, n_embd),
            h=nn.ModuleList(block_module() for _ in range(n_layer)), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


def test_align_extra_state_lets_each_model_load_the_other_strictly():
    te_state = TinyGPT(TELinearStandIn).state_dict()
    plain_state = TinyGPT().state_dict()
    te_model = TinyGPT(TELinearStandIn)
    te_model.load_state_dict(align_extra_state(plain_state, te_model), strict=True)  # fallback ckpt -> FP8 GPU
    loaded = te_model.transformer.h[0].attn.c_attn.loaded_extra_state
    assert loaded.dtype == torch.uint8 and loaded.numel() == 0
    TinyGPT().load_state_dict(align_extra_state(te_state, TinyGPT()), strict=True)  # FP8 ckpt -> fallback
    same = align_extra_state(te_state, te_model)
    assert same.keys() == te_state.keys()
    assert all(same[k] is te_state[k] for k in te_state)  # the scaling history passes untouched


# ------------------------------------------------------------------ export

class DDPLike(nn.Module):
    """Adds the ``module.`` prefix exactly as DistributedDataParallel does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def te_trained_state_dict(order: str) -> tuple[dict[str, Any], TinyGPT]:
    torch.manual_seed(0)
    model = TinyGPT(TELinearStandIn).to(torch.bfloat16)
    wrapped = torch.compile(DDPLike(model)) if order == "compile(ddp)" else DDPLike(torch.compile(model))
    return wrapped.state_dict(), model


@pytest.mark.parametrize("order", ["compile(ddp)", "ddp(compile)", "unwrapped"])
def test_export_loads_into_the_plain_model_strictly(order):
    if order == "unwrapped":  # what the trainer saves
        torch.manual_seed(0)
        te_model = TinyGPT(TELinearStandIn).to(torch.bfloat16)
        state = te_model.state_dict()
    else:
        state, te_model = te_trained_state_dict(order)
    assert any(k.endswith("transformer.h.0.attn.c_attn._extra_state") for k in state)
    plain = export_plain_state_dict(state)
    assert not any("_extra_state" in k or k.startswith(("module.", "_orig_mod.")) for k in plain)
    assert all(t.dtype == torch.float32 for t in plain.values())
    model = TinyGPT()
    model.load_state_dict(plain, strict=True)
    for name, tensor in te_model.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(model.state_dict()[name], tensor.float()), name
    assert plain["lm_head.weight"] is plain["transformer.wte.weight"]


def test_export_keeps_names_that_merely_contain_a_wrapper_name():
    state = {"module.transformer.submodule.weight": torch.ones(1), "module.my_module.bias": torch.ones(1)}
    assert set(export_plain_state_dict(state)) == {"transformer.submodule.weight", "my_module.bias"}


def test_export_survives_torch_save_and_weights_only_load(tmp_path):
    state, _ = te_trained_state_dict("ddp(compile)")
    torch.save({"model": state}, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)
    TinyGPT().load_state_dict(export_plain_state_dict(loaded["model"]), strict=True)


def test_export_refuses_colliding_keys():
    with pytest.raises(ValueError, match="both map"):
        export_plain_state_dict({"module.a.weight": torch.ones(1), "a.weight": torch.ones(1)})


def test_export_of_the_real_gpt():
    cfg_ = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)

    def te_like(in_features: int, out_features: int, bias: bool) -> nn.Module:
        return TELinearStandIn(in_features, out_features, bias=bias)

    torch.manual_seed(0)
    fp8_model = GPT(cfg_, linear_factory=te_like).to(torch.bfloat16)
    state = fp8_model.state_dict()
    assert any(k.endswith("_extra_state") for k in state)
    plain_model = GPT(cfg_)
    plain_model.load_state_dict(export_plain_state_dict(state), strict=True)
    idx = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        expected, _ = fp8_model.float()(idx)
        got, _ = plain_model(idx)
    assert torch.allclose(got, expected)


# ------------------------------------------------------------------ the export command

def write_fp8_checkpoint(path: Path) -> dict[str, Any]:
    state, _ = te_trained_state_dict("ddp(compile)")
    ckpt = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "step": 40, "epoch": 0,
            "val_loss": 3.5, "best_val_loss": 3.5,
            "config": {"n_embd": 32, "use_fp8": True, "require_fp8": False, "fp8_format": "hybrid",
                       "fp8_recipe": "delayed", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max",
                       "fp8_margin": 0, "checkpoint_dir": "./checkpoints_fp8", "seed": 1},
            "rng": [{"torch": torch.get_rng_state()}], "data_state": {"position": 7},
            "meta": {"precision": "fp8-hybrid-delayed", "world_size": 2,
                     "torch_version": torch.__version__}}  # a TorchVersion object, as the trainer writes it
    torch.save(ckpt, path)
    return ckpt


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SRC / "export_checkpoint.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_export_command_end_to_end(tmp_path):
    src, dest = tmp_path / "latest.pt", tmp_path / "out" / "plain.pt"
    write_fp8_checkpoint(src)
    result = run_export(str(src), str(dest))
    assert result.returncode == 0, result.stderr
    out = torch.load(dest, weights_only=True)
    assert "optimizer" not in out and "rng" not in out and "data_state" not in out
    TinyGPT().load_state_dict(out["model"], strict=True)
    assert out["step"] == 40 and out["val_loss"] == 3.5
    assert out["config"] == {"n_embd": 32, "checkpoint_dir": "./checkpoints", "seed": 1}
    assert out["meta"]["precision"] == "fp32" and out["meta"]["world_size"] == 2
    assert out["meta"]["exported_from"]["precision"] == "fp8-hybrid-delayed"
    assert "no optimizer state" in out["meta"]["optimizer"]
    sidecar = json.loads(dest.with_suffix(".json").read_text())
    assert set(sidecar) == {"format_version", "file", "step", "epoch", "val_loss", "sha256", "size",
                            "written_at", "meta"}
    assert sidecar["file"] == "plain.pt" and sidecar["step"] == 40 and sidecar["size"] == dest.stat().st_size
    assert sidecar["sha256"] == export_checkpoint.sha256_of(dest)
    assert validate_checkpoint(dest) == (True, "ok")  # the suite's own checker accepts it
    assert not [p for p in dest.parent.iterdir() if p.name.endswith(".tmp")]


def test_export_command_missing_file_exits_2_with_one_line(tmp_path):
    result = run_export(str(tmp_path / "nope.pt"), str(tmp_path / "out.pt"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such checkpoint file" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_export_refuses_bad_inputs_and_keeps_existing_output(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        export_checkpoint.main([str(garbage), str(tmp_path / "a.pt")])
    state = TinyGPT().state_dict()
    state["transformer.h.0.attn.c_attn._extra_state"] = io.BytesIO(b"an object weights_only refuses")
    torch.save({"model": state}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a loadable checkpoint.*BytesIO"):
        export_checkpoint.main([str(tmp_path / "foreign.pt"), str(tmp_path / "a.pt")])
    torch.save({"weights": 1}, tmp_path / "nomodel.pt")
    with pytest.raises(UserError, match="not a training checkpoint"):
        export_checkpoint.main([str(tmp_path / "nomodel.pt"), str(tmp_path / "a.pt")])
    src = tmp_path / "src.pt"
    write_fp8_checkpoint(src)
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep me")
    with pytest.raises(UserError, match="--force"):
        export_checkpoint.main([str(src), str(existing)])
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(UserError, match="is the input file"):
        export_checkpoint.main([str(src), str(src), "--force"])
    assert export_checkpoint.main([str(src), str(existing), "--force"]) == 0
    TinyGPT().load_state_dict(torch.load(existing, weights_only=True)["model"], strict=True)
