"""The Hugging Face bridge: checkpoints of both trainers exported with `export_checkpoint.py
--format hf` and loaded by `transformers.GPT2LMHeadModel.from_pretrained`; local GPT-2 directories
read as our GPT (`--init_from`, evaluation); the refusals of what GPT-2 cannot express.

Everything is offline: the GPT-2 directories are made here with random weights, and the tokenizer
files come from tiktoken's cache.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: no hub call, ever

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import corpus_document
from runs import SRC, TINY_FLAGS, load_checkpoint, run, run_dirs, train
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import export_checkpoint
from common.config import TrainConfig
from common.errors import UserError
from common.hf import config_for_init, read_hf_model
from common.model import GPT, padded_vocab
from common.tokenizer import get_tokenizer

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(prepared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """final.pt of a short run of each trainer (train_fp8.py falls back to the plain model here)."""
    out = {}
    for script in ("train_improved.py", "train_fp8.py"):
        tmp = tmp_path_factory.mktemp(script.removesuffix(".py"))
        train(tmp, prepared_data, "--max_steps", "3", "--eval_freq", "3", "--checkpoint_freq", "3", script=script,
              nproc=1)
        out[script] = tmp / "ckpt" / "final.pt"
    return out


def run_export(*args: str | Path) -> subprocess.CompletedProcess:
    return run([sys.executable, str(SRC / "export_checkpoint.py"), *map(str, args)])


def our_model(checkpoint: Path) -> GPT:
    _, cfg, state = export_checkpoint.load_plain_model(checkpoint)
    model = GPT(cfg)
    model.load_state_dict(state)
    return model.eval()


def random_tokens(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(ours: GPT, theirs: GPT2LMHeadModel, length: int) -> None:
    idx = random_tokens(ours.config.vocab_size, length)
    difference = (ours.logits(idx) - theirs(idx).logits).abs().max().item()
    assert difference < TOLERANCE, difference


def fp8_style_checkpoint(source: Path, dest: Path) -> Path:
    """A checkpoint as train_fp8.py writes it with FP8 on (no GPU here, so written by hand): every
    block linear carries TransformerEngine's `_extra_state` (a uint8 tensor holding a pickle), the
    keys sit under DDP's `module.` prefix, and the config has the FP8 fields."""
    ckpt = load_checkpoint(source)
    state = {}
    for key, value in ckpt["model"].items():
        state[f"module.{key}"] = value
        if key.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
            blob = pickle.dumps({"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(16, 3)})
            state[f"module.{key.removesuffix('weight')}_extra_state"] = torch.frombuffer(bytearray(blob),
                                                                                        dtype=torch.uint8)
    ckpt["model"] = state
    ckpt["config"] |= {"use_fp8": True, "fp8_format": "hybrid", "fp8_recipe": "delayed"}
    ckpt["meta"]["precision"] = "fp8-hybrid-delayed"
    torch.save(ckpt, dest)
    return dest


@pytest.mark.parametrize("kind", ["train_improved.py", "train_fp8.py", "fp8 with TE state"])
def test_export_then_from_pretrained_gives_our_logits(checkpoints: dict[str, Path], tmp_path: Path,
                                                      kind: str) -> None:
    source = checkpoints["train_fp8.py" if kind == "train_fp8.py" else "train_improved.py"]
    if kind == "fp8 with TE state":
        source = fp8_style_checkpoint(source, tmp_path / "fp8.pt")
    dest = tmp_path / "hf"
    proc = run_export(source, dest, "--format", "hf")
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in dest.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]  # no staging left behind
    theirs = GPT2LMHeadModel.from_pretrained(dest).eval()
    ours = our_model(checkpoints["train_improved.py"] if kind == "fp8 with TE state" else source)
    assert theirs.config.n_layer == 2 and theirs.config.vocab_size == 50257 and theirs.config.n_positions == 32
    assert_same_logits(ours, theirs, length=32)


def test_exported_tokenizer_gives_tiktokens_ids(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    dest = tmp_path / "hf"
    assert run_export(checkpoints["train_improved.py"], dest, "--format", "hf").returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(dest)
    encoding = get_tokenizer("gpt2")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == encoding.eot_token
    assert GPT2LMHeadModel.from_pretrained(dest).config.eos_token_id == encoding.eot_token
    texts = [corpus_document(i) for i in range(12)] + ["  two  spaces, tabs\t\tand\r\nnewlines 12345 don't",
                                                       "<|endoftext|> between documents"]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == encoding.encode(text, allowed_special="all")
        assert tokenizer.decode(encoding.encode_ordinary(text)) == text


def test_bias_free_model_exports_as_zero_biases(tmp_path: Path) -> None:
    from common.hf import write_hf_model
    from common.model import GPTConfig

    cfg = GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=2, n_embd=32, bias=False)
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    write_hf_model(tmp_path, ours.state_dict(), cfg, eot_token=None)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert not theirs.transformer.h[0].mlp.c_fc.bias.any()
    assert_same_logits(ours, theirs, length=16)
    with pytest.raises(UserError, match=r"no place for \(transformer.h.0.attn.rotary.inv_freq\)"):
        write_hf_model(tmp_path / "odd", {**ours.state_dict(), "transformer.h.0.attn.rotary.inv_freq": torch.ones(4)},
                       cfg, eot_token=None)


def test_export_refusals_keep_what_exists(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    existing = tmp_path / "hf"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    proc = run_export(checkpoints["train_improved.py"], existing, "--format", "hf")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--force" in proc.stderr
    assert (existing / "keep.txt").read_text() == "mine"
    assert run_export(checkpoints["train_improved.py"], existing, "--format", "hf", "--force").returncode == 0
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()

    ckpt = load_checkpoint(checkpoints["train_improved.py"])
    ckpt["model"]["transformer.rotary.inv_freq"] = torch.ones(4)  # a weight GPT-2 has no place for
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="do not fit the model its config describes.*rotary"):
        export_checkpoint.main([str(tmp_path / "odd.pt"), str(tmp_path / "odd_hf"), "--format", "hf"])
    assert not (tmp_path / "odd_hf").exists()
    with pytest.raises(UserError, match="writes a directory"):
        export_checkpoint.main([str(checkpoints["train_improved.py"]), str(tmp_path / "x.pt"), "--format", "hf"])


# ----------------------------------------------------------------------------- import


def random_gpt2_dir(path: Path, seed: int = 0, **overrides: object) -> Path:
    """A GPT-2 directory as `save_pretrained` writes it, random weights (no hub here)."""
    torch.manual_seed(seed)
    config = GPT2Config(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 50257,
                           "initializer_range": 0.1, **overrides})
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # LayerNorms start at 1 and 0: make them count in the comparison
        for name, param in model.named_parameters():
            if ".ln_" in name or "ln_f" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def test_import_of_a_local_gpt2_gives_its_logits(tmp_path: Path) -> None:
    path = random_gpt2_dir(tmp_path / "gpt2")
    cfg, state = read_hf_model(path)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.bias) == (2, 2, 32, 64, 50257,
                                                                                                True)
    ours = GPT(cfg).eval()
    ours.load_state_dict(state)
    theirs = GPT2LMHeadModel.from_pretrained(path).eval()
    assert_same_logits(ours, theirs, length=64)
    # The padding rows (50257 -> 50304) are the mean embedding: their logit is the mean real logit.
    wte = ours.transformer.wte.weight
    assert wte.shape[0] == padded_vocab(50257) and torch.equal(wte[50257], wte[:50257].mean(dim=0))


def test_init_from_starts_a_fresh_run_from_the_directory(prepared_data: Path, tmp_path: Path) -> None:
    """A fresh run takes the model's shape and weights (TINY_FLAGS's n_layer, n_head and n_embd agree
    with the directory; its block_size 32 cuts the 64 positions; the vocabulary comes from there); a
    resumed run keeps its own weights. The learning rate is so small that the first step leaves the
    imported weights as they were."""
    path = random_gpt2_dir(tmp_path / "gpt2")
    flags = [*TINY_FLAGS, *run_dirs(tmp_path, prepared_data), "--init_from", str(path), "--eval_freq", "0",
             "--learning_rate", "1e-12", "--checkpoint_freq", "1"]
    first = run([sys.executable, str(SRC / "train_improved.py"), *flags, "--max_steps", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "weights from the Hugging Face model" in first.stderr
    saved = load_checkpoint(tmp_path / "ckpt" / "latest.pt")
    assert saved["config"]["block_size"] == 32  # set explicitly: the 64 positions are cut to 32
    hf_state = GPT2LMHeadModel.from_pretrained(path).state_dict()
    model = saved["model"]
    assert torch.allclose(model["transformer.h.1.mlp.c_fc.weight"], hf_state["transformer.h.1.mlp.c_fc.weight"].t(),
                          atol=1e-6)
    assert torch.allclose(model["transformer.wpe.weight"], hf_state["transformer.wpe.weight"][:32], atol=1e-6)
    assert torch.allclose(model["transformer.wte.weight"][:50257], hf_state["transformer.wte.weight"], atol=1e-6)

    resumed = run([sys.executable, str(SRC / "train_improved.py"), *flags, "--max_steps", "2", "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "weights from the Hugging Face model" not in resumed.stderr


@pytest.mark.parametrize("overrides, fragment", [
    ({"activation_function": "gelu"}, "activation_function 'gelu'"),
    ({"n_inner": 96}, "n_inner 96"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon 1e-06"),
    ({"scale_attn_by_inverse_layer_idx": True}, "attention scaled otherwise"),
    ({"tie_word_embeddings": False}, "output head is not tied"),
])
def test_import_refuses_what_this_gpt_cannot_be(tmp_path: Path, overrides: dict, fragment: str) -> None:
    path = random_gpt2_dir(tmp_path / "odd", **overrides)
    with pytest.raises(UserError, match=fragment):
        read_hf_model(path)


def test_init_from_refusals(tmp_path: Path, prepared_data: Path) -> None:
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(UserError, match="model_type 'llama'"):
        read_hf_model(tmp_path / "llama")
    with pytest.raises(UserError, match="no config.json"):
        read_hf_model(tmp_path)
    path = random_gpt2_dir(tmp_path / "gpt2")
    cfg = TrainConfig(init_from=str(path), n_layer=4, block_size=128)
    with pytest.raises(UserError, match=r"n_layer=2, block_size=64 but n_layer=4, block_size=128"):
        config_for_init(cfg, {"n_layer", "block_size"})
    adopted = config_for_init(cfg, set())
    assert (adopted.n_layer, adopted.n_embd, adopted.block_size, adopted.vocab_size) == (2, 32, 64, 50257)
    with pytest.raises(UserError, match="exceeds the 64 positions"):
        read_hf_model(path, block_size=128)

    # As a user meets it: one line, exit status 2, nothing written.
    odd = random_gpt2_dir(tmp_path / "gelu", activation_function="gelu")
    proc = run([sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
                "--init_from", str(odd)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "activation_function 'gelu'" in line
    assert not (tmp_path / "ckpt").exists()
