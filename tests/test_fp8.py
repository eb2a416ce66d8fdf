"""The FP8 adapter's pure logic, the fallback on this CPU machine, and the checkpoint export.

TransformerEngine cannot be installed here (no GPU), so the version adapter and the recipe
builder are exercised with small stand-in namespaces shaped like TE's documented API (2.9+ and
pre-2.9). They check which TE call the adapter makes and with which keyword arguments, not TE.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn

import export_checkpoint
from common import fp8
from common.checkpoint import validate_checkpoint
from common.errors import UserError
from common.fp8 import (
    PrecisionPlan,
    TEInfo,
    align_extra_state,
    build_recipe,
    check_fp8_shapes,
    compile_allowed,
    export_plain_state_dict,
    fp8_autocast,
    fp8_supported,
    load_te,
    plan_precision,
    recipe_kwargs,
    te_linear_factory,
)

SRC = Path(__file__).resolve().parents[1] / "src"
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only a name here: every CUDA query is replaced in the tests using it


@dataclass
class Cfg:
    use_fp8: bool = True
    fp8_format: str = "hybrid"
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_margin: int = 0
    require_fp8: bool = False
    n_embd: int = 768
    n_head: int = 12
    n_layer: int = 12
    block_size: int = 1024
    batch_size: int = 8
    vocab_size: int = 50257
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None


# ------------------------------------------------------------------ stand-ins for TE

class FakeFormat(Enum):
    E4M3 = "e4m3"
    E5M2 = "e5m2"
    HYBRID = "hybrid"


@dataclass
class FakeDelayedScaling:
    margin: int = 0
    fp8_format: FakeFormat = FakeFormat.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    scaling_factor_compute_algo: Any = None
    reduce_amax: bool = True

    def __post_init__(self) -> None:
        assert self.fp8_format != FakeFormat.E5M2, "Pure E5M2 training is not supported."


@dataclass
class FakeOldDelayedScaling:  # TE 1.x: no reduce_amax
    margin: int = 0
    interval: int = 1
    fp8_format: FakeFormat = FakeFormat.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclass
class FakeCurrentScaling:
    fp8_format: FakeFormat = FakeFormat.HYBRID


def fake_recipe_module(*, old: bool = False) -> SimpleNamespace:
    if old:
        return SimpleNamespace(Format=FakeFormat, DelayedScaling=FakeOldDelayedScaling)
    return SimpleNamespace(Format=FakeFormat, DelayedScaling=FakeDelayedScaling,
                           Float8CurrentScaling=FakeCurrentScaling)


def _recording_context(calls: list, name: str):
    @contextmanager
    def ctx(**kwargs):
        calls.append((name, kwargs))
        yield

    return ctx


def te_new(calls: list, version: str = "2.9.0", fp8_ok: tuple[bool, str] = (True, "")) -> TEInfo:
    """The TE >= 2.9 shape: autocast + is_fp8_available, with the deprecated fp8_autocast kept."""
    def is_fp8_available(return_reason: bool = False):
        return fp8_ok if return_reason else fp8_ok[0]

    module = SimpleNamespace(__name__="fake_te.pytorch", autocast=_recording_context(calls, "autocast"),
                             fp8_autocast=_recording_context(calls, "fp8_autocast"),
                             is_fp8_available=is_fp8_available, Linear=FakeTELinearFactory(calls))
    return TEInfo(True, version, module, recipe_module=fake_recipe_module())


def te_old(calls: list, version: str = "1.11.0", fp8_ok: tuple[bool, str] = (True, "")) -> TEInfo:
    """The TE 1.x-2.8 shape: fp8_autocast and transformer_engine.pytorch.fp8.check_fp8_support."""
    module = SimpleNamespace(__name__="fake_te.pytorch", fp8_autocast=_recording_context(calls, "fp8_autocast"),
                             fp8=SimpleNamespace(check_fp8_support=lambda: fp8_ok),
                             Linear=FakeTELinearFactory(calls))
    return TEInfo(True, version, module, recipe_module=fake_recipe_module(old=True))


class FakeTELinearFactory:
    """Records te.pytorch.Linear's arguments and returns an nn.Linear of the same shape."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def __call__(self, in_features, out_features, *, bias, params_dtype, device):
        self.calls.append(("Linear", dict(in_features=in_features, out_features=out_features, bias=bias,
                                          params_dtype=params_dtype, device=device)))
        return nn.Linear(in_features, out_features, bias=bias, dtype=params_dtype)


NO_TE = TEInfo(installed=False, version=None, module=None)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend the CUDA device is the given GPU (name, capability)."""
    def set_gpu(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(fp8, "_cuda_device_info", lambda device: (name, capability))

    return set_gpu


# ------------------------------------------------------------------ recipe from flags

@pytest.mark.parametrize("fmt,expected", [("hybrid", "HYBRID"), ("e4m3", "E4M3"), ("HYBRID", "HYBRID")])
@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_recipe_kwargs_delayed(fmt, expected, algo):
    cfg = Cfg(fp8_format=fmt, fp8_amax_compute_algo=algo, fp8_amax_history_len=16, fp8_margin=2)
    assert recipe_kwargs(cfg) == {"margin": 2, "fp8_format": expected, "amax_history_len": 16,
                                  "amax_compute_algo": algo, "reduce_amax": True}


@pytest.mark.parametrize("fmt,expected", [("hybrid", "HYBRID"), ("e4m3", "E4M3")])
def test_recipe_kwargs_current_takes_only_the_format(fmt, expected, caplog):
    assert recipe_kwargs(Cfg(fp8_recipe="current", fp8_format=fmt)) == {"fp8_format": expected}
    assert "ignored" not in caplog.text
    recipe_kwargs(Cfg(fp8_recipe="current", fp8_amax_history_len=16))
    assert "ignoring --fp8_amax_history_len: used by --fp8_recipe delayed only" in caplog.text


def test_e5m2_is_refused_naming_the_flag_and_the_choices():
    with pytest.raises(UserError) as err:
        recipe_kwargs(Cfg(fp8_format="e5m2"))
    text = str(err.value)
    assert "--fp8_format e5m2" in text and "hybrid" in text and "e4m3" in text
    with pytest.raises(UserError, match="--fp8_format"):
        recipe_kwargs(Cfg(fp8_format="e5m2", fp8_recipe="current"))


@pytest.mark.parametrize("field,value", [("fp8_recipe", "tensorwise"), ("fp8_format", "fp8"),
                                         ("fp8_amax_compute_algo", "mean"), ("fp8_amax_history_len", 0),
                                         ("fp8_margin", -1)])
def test_bad_recipe_flags_name_the_flag(field, value):
    with pytest.raises(UserError, match=f"--{field}"):
        recipe_kwargs(dataclasses.replace(Cfg(), **{field: value}))


def test_build_recipe_delayed_passes_every_flag():
    recipe = build_recipe(Cfg(fp8_format="e4m3", fp8_amax_history_len=32, fp8_amax_compute_algo="most_recent",
                              fp8_margin=1), te_new([]))
    assert recipe == FakeDelayedScaling(margin=1, fp8_format=FakeFormat.E4M3, amax_history_len=32,
                                        amax_compute_algo="most_recent", reduce_amax=True)


def test_build_recipe_current():
    assert build_recipe(Cfg(fp8_recipe="current"), te_new([])) == FakeCurrentScaling(FakeFormat.HYBRID)


def test_build_recipe_on_old_te_drops_reduce_amax_and_refuses_current():
    recipe = build_recipe(Cfg(fp8_amax_history_len=8), te_old([]))
    assert recipe == FakeOldDelayedScaling(amax_history_len=8)
    with pytest.raises(UserError, match="Float8CurrentScaling"):
        build_recipe(Cfg(fp8_recipe="current"), te_old([]))


# ------------------------------------------------------------------ shapes

@pytest.mark.parametrize("n_embd", [768, 1024, 1280, 1600])
def test_gpt2_shapes_pass(n_embd):
    check_fp8_shapes(Cfg(n_embd=n_embd, batch_size=8, block_size=1024))
    check_fp8_shapes(Cfg(n_embd=n_embd, batch_size=1, block_size=8))


def test_bad_width_names_n_embd():
    with pytest.raises(UserError) as err:
        check_fp8_shapes(Cfg(n_embd=100))
    assert "--n_embd 100 is not a multiple of 16, which FP8 matrix products need" in str(err.value)
    assert "--n_embd 112" in str(err.value)


def test_bad_token_count_names_batch_and_block():
    with pytest.raises(UserError) as err:
        check_fp8_shapes(Cfg(batch_size=3, block_size=5))
    text = str(err.value)
    assert "--batch_size 3" in text and "--block_size 5" in text and "15 tokens" in text and "multiple of 8" in text


# ------------------------------------------------------------------ the version adapter

def test_te_2_9_uses_autocast_with_the_new_names():
    calls: list = []
    te = te_new(calls)
    group, recipe = object(), object()
    with fp8_autocast(te, enabled=True, recipe=recipe, group=group):
        pass
    assert calls == [("autocast", {"enabled": True, "recipe": recipe, "amax_reduction_group": group})]


@pytest.mark.parametrize("version", ["2.9.0", "2.9.0.dev0+8cf3c16", "2.20.2", None])
def test_new_shape_prefers_autocast_over_the_deprecated_fp8_autocast(version):
    calls: list = []
    with fp8_autocast(te_new(calls, version=version), enabled=True, recipe="r", group=None):
        pass
    assert [name for name, _ in calls] == ["autocast"]


def test_pre_2_9_uses_fp8_autocast_with_the_old_names():
    calls: list = []
    te = te_old(calls)
    with fp8_autocast(te, enabled=True, recipe="r", group="g"):
        pass
    assert calls == [("fp8_autocast", {"enabled": True, "fp8_recipe": "r", "fp8_group": "g"})]


def test_old_version_number_wins_over_a_stray_autocast_attribute():
    calls: list = []
    te = te_new(calls, version="2.8.0")
    with fp8_autocast(te, enabled=True, recipe="r", group=None):
        pass
    assert [name for name, _ in calls] == ["fp8_autocast"]


def test_autocast_is_a_null_context_when_off_or_without_te():
    calls: list = []
    with fp8_autocast(te_new(calls), enabled=False, recipe="r", group=None):
        pass
    with fp8_autocast(NO_TE, enabled=True, recipe="r", group=None):
        pass
    assert calls == []


def test_fp8_supported_on_both_shapes():
    assert fp8_supported(te_new([], fp8_ok=(False, "Device compute capability 8.9 or higher required"))) == (
        False, "Device compute capability 8.9 or higher required")
    assert fp8_supported(te_old([], fp8_ok=(True, ""))) == (True, "")
    assert fp8_supported(NO_TE)[0] is False


def test_fp8_supported_never_raises():
    def boom(return_reason=False):
        raise RuntimeError("CUDA driver missing")

    te = TEInfo(True, "2.9.0", SimpleNamespace(is_fp8_available=boom))
    ok, reason = fp8_supported(te)
    assert not ok and "CUDA driver missing" in reason


def test_te_linear_factory_builds_te_linear_with_keywords():
    calls: list = []
    make = te_linear_factory(te_new(calls), torch.float32, device="cpu")
    layer = make(64, 192, True)
    assert tuple(layer.weight.shape) == (192, 64)
    assert calls == [("Linear", {"in_features": 64, "out_features": 192, "bias": True,
                                 "params_dtype": torch.float32, "device": "cpu"})]


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
    plan = plan_precision(Cfg(), CPU, te)
    assert plan.fallback and "failed to import" in plan.reason
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        sys.modules.pop(name)  # a failed import leaves nothing behind; make sure of it


def test_fallback_on_this_machine_names_transformer_engine():
    plan = plan_precision(Cfg(), CPU, load_te())
    assert plan == PrecisionPlan(use_te=False, use_fp8=False, precision="fp32", reason=plan.reason, fallback=True)
    assert "TransformerEngine is not installed" in plan.reason and "pip install" in plan.reason


def test_require_fp8_here_is_a_user_error_with_the_reason():
    with pytest.raises(UserError) as err:
        plan_precision(Cfg(require_fp8=True), CPU, load_te())
    assert "--require_fp8" in str(err.value) and "TransformerEngine" in str(err.value)


def test_require_fp8_without_use_fp8_is_refused():
    with pytest.raises(UserError, match="--require_fp8 needs --use_fp8"):
        plan_precision(Cfg(use_fp8=False, require_fp8=True), CPU, NO_TE)


def test_e5m2_is_refused_before_any_fallback():
    with pytest.raises(UserError, match="e5m2"):
        plan_precision(Cfg(fp8_format="e5m2"), CPU, NO_TE)


def test_te_without_cuda_falls_back_naming_cuda():
    plan = plan_precision(Cfg(), CPU, te_new([]))
    assert plan.fallback and not plan.use_te and "no CUDA device" in plan.reason and plan.precision == "fp32"


def test_gpu_below_8_9_is_named_with_its_capability(gpu):
    gpu("NVIDIA A100-SXM4-80GB", (8, 0))
    plan = plan_precision(Cfg(), CUDA, te_new([]))
    assert plan.fallback and plan.precision == "bf16" and not plan.use_te
    assert "NVIDIA A100-SXM4-80GB" in plan.reason and "8.0" in plan.reason and "8.9" in plan.reason
    with pytest.raises(UserError, match="A100"):
        plan_precision(Cfg(require_fp8=True), CUDA, te_new([]))


def test_te_check_saying_no_is_passed_on(gpu):
    gpu("NVIDIA L4", (8, 9))
    te = te_new([], fp8_ok=(False, "Cuda version 12.1 or higher required for FP8 execution on Ada."))
    plan = plan_precision(Cfg(), CUDA, te)
    assert plan.fallback and "Cuda version 12.1" in plan.reason and "NVIDIA L4" in plan.reason


@pytest.mark.parametrize("shape", [te_new, te_old])
def test_fp8_on_hopper(gpu, shape):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    plan = plan_precision(Cfg(fp8_recipe="current", fp8_format="e4m3"), CUDA, shape([]))
    assert plan.use_te and plan.use_fp8 and not plan.fallback
    assert plan.precision == "fp8-e4m3-current" and "H100" in plan.reason and "sm_90" in plan.reason


def test_without_use_fp8_the_te_model_trains_in_bf16(gpu):
    gpu("NVIDIA H100 80GB HBM3", (9, 0))
    plan = plan_precision(Cfg(use_fp8=False), CUDA, te_new([]))
    assert plan.use_te and not plan.use_fp8 and plan.precision == "bf16" and not plan.fallback


def test_without_use_fp8_or_te_the_ordinary_model():
    plan = plan_precision(Cfg(use_fp8=False), CPU, NO_TE)
    assert not plan.use_te and not plan.use_fp8 and plan.precision == "fp32" and not plan.fallback
    assert plan.to_meta()["precision"] == "fp32"


# ------------------------------------------------------------------ torch.compile

def test_compile_is_free_for_the_ordinary_model():
    plan = plan_precision(Cfg(), CPU, NO_TE)
    assert compile_allowed(Cfg(), NO_TE, plan)[0] is True


def test_compile_off_for_delayed_scaling_and_old_te():
    fp8_plan = PrecisionPlan(True, True, "fp8-hybrid-delayed", "")
    ok, why = compile_allowed(Cfg(), te_new([], version="2.20.2"), fp8_plan)
    assert not ok and "DelayedScaling" in why
    ok, why = compile_allowed(Cfg(fp8_recipe="current"), te_new([], version="2.9.0"), fp8_plan)
    assert not ok and "2.20" in why
    bf16_plan = PrecisionPlan(True, False, "bf16", "")
    assert compile_allowed(Cfg(use_fp8=False), te_new([], version="2.20.2"), bf16_plan)[0] is False
    ok, why = compile_allowed(Cfg(fp8_recipe="current"), te_new([], version="2.20.2"), fp8_plan)
    assert ok and "Float8CurrentScaling" in why


# ------------------------------------------------------------------ export

class TELinearStandIn(nn.Linear):
    """Same parameters as te.pytorch.Linear ((out, in) weight, bias) plus an _extra_state entry
    the way TE >= 1.x stores it: a uint8 tensor holding pickled FP8 scaling state."""

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


@pytest.mark.parametrize("order", ["compile(ddp)", "ddp(compile)"])
def test_export_loads_into_the_plain_model_strictly(order):
    state, te_model = te_trained_state_dict(order)
    prefix = "_orig_mod.module." if order == "compile(ddp)" else "module._orig_mod."
    assert f"{prefix}transformer.h.0.attn.c_attn._extra_state" in state
    plain = export_plain_state_dict(state)
    assert not any("_extra_state" in k or k.startswith(("module.", "_orig_mod.")) for k in plain)
    assert all(t.dtype == torch.float32 for t in plain.values())
    model = TinyGPT()
    model.load_state_dict(plain, strict=True)
    for name, tensor in te_model.state_dict().items():
        if not name.endswith("_extra_state"):
            assert torch.equal(model.state_dict()[name], tensor.float()), name
    assert plain["lm_head.weight"] is plain["transformer.wte.weight"]


def test_export_survives_torch_save_and_weights_only_load(tmp_path):
    state, _ = te_trained_state_dict("ddp(compile)")
    torch.save({"model": state}, tmp_path / "ck.pt")
    loaded = torch.load(tmp_path / "ck.pt", weights_only=True)
    TinyGPT().load_state_dict(export_plain_state_dict(loaded["model"]), strict=True)


def test_export_drops_old_bytesio_extra_state_and_empty_bias():
    state = TinyGPT().state_dict()
    state["transformer.h.0.attn.c_proj._extra_state"] = io.BytesIO(b"old TE")
    plain = export_plain_state_dict({**state, "transformer.h.1.mlp.c_fc.bias_empty.bias": torch.empty(0)})
    assert "transformer.h.0.attn.c_proj._extra_state" not in plain
    assert not any(k.endswith("bias_empty.bias") for k in plain)


def test_export_refuses_colliding_keys():
    with pytest.raises(ValueError, match="both map"):
        export_plain_state_dict({"module.a.weight": torch.ones(1), "a.weight": torch.ones(1)})


def test_export_of_the_real_gpt():
    model_mod = pytest.importorskip("common.model")
    cfg = model_mod.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)

    def te_like(in_features: int, out_features: int, bias: bool) -> nn.Module:
        return TELinearStandIn(in_features, out_features, bias=bias)

    torch.manual_seed(0)
    fp8_model = model_mod.GPT(cfg, linear_factory=te_like).to(torch.bfloat16)
    state = DDPLike(torch.compile(fp8_model)).state_dict()
    assert any(k.endswith("_extra_state") for k in state)
    plain_model = model_mod.GPT(cfg)
    plain_model.load_state_dict(export_plain_state_dict(state), strict=True)
    idx = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        expected, _ = fp8_model.float()(idx)
        got, _ = plain_model(idx)
    assert torch.allclose(got, expected)


# ------------------------------------------------------------------ resume across precisions

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
    state["transformer.h.0.attn.c_attn._extra_state"] = io.BytesIO(b"TE 0.x")
    torch.save({"model": state}, tmp_path / "old_te.pt")
    with pytest.raises(UserError, match="BytesIO"):
        export_checkpoint.main([str(tmp_path / "old_te.pt"), str(tmp_path / "a.pt")])
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
