"""The GPT model, the optimizer groups and the learning-rate schedule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from common.metrics import flops_per_token, format_duration, gpu_peak_flops
from common.model import GPT, GPTConfig, padded_vocab
from common.optim import build_adamw, lr_at

SMALL = GPTConfig(block_size=16, vocab_size=101, n_layer=2, n_head=2, n_embd=32)


def test_vocab_padded_and_embeddings_tied() -> None:
    model = GPT(SMALL)
    assert padded_vocab(50257) == 50304 and model.transformer.wte.weight.shape[0] == 128
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, SMALL.vocab_size, (3, 16))
    logits, loss = model.eval()(idx, idx)
    assert logits.shape == (3, 16, SMALL.vocab_size)
    # At initialisation the prediction is close to uniform over the (padded) vocabulary.
    assert abs(loss.item() - math.log(128)) < 0.5


def test_gpt2_initialisation_scales_residual_projections() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=101, n_layer=8, n_head=4, n_embd=256))
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0


def test_linear_factory_builds_every_block_linear() -> None:
    made: list[tuple[int, int, bool]] = []

    def factory(i: int, o: int, bias: bool) -> nn.Module:
        made.append((i, o, bias))
        return nn.Linear(i, o, bias=bias)

    GPT(SMALL, linear_factory=factory)
    assert made.count((32, 96, True)) == 2 and made.count((128, 32, True)) == 2 and len(made) == 8


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    model = GPT(SMALL).eval()
    a = torch.randint(0, 101, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 101
    la, _ = model(a, a)
    lb, _ = model(b, b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-5)
    assert not torch.allclose(la[0, 10:], lb[0, 10:])


def test_generate_is_reproducible_with_a_private_generator() -> None:
    model = GPT(SMALL).eval()
    prompt = torch.tensor([[1, 2, 3]])
    outs = [model.generate(prompt, 8, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (1, 11)
    assert int(outs[0].max()) < SMALL.vocab_size  # never a padding id


def test_weight_decay_only_on_matrices() -> None:
    model = GPT(SMALL)
    opt = build_adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


def test_lr_schedule_warmup_then_cosine() -> None:
    kw = dict(max_lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_flops_formula_and_helpers() -> None:
    # GPT-2 124M: 6N + 12 L H Q T with N ~ 124M at T=1024: about 0.87 GFLOP per token.
    assert flops_per_token(124_000_000, 12, 768, 1024) == pytest.approx(6 * 124e6 + 12 * 12 * 768 * 1024)
    assert gpu_peak_flops(torch.device("cpu")) is None
    assert format_duration(3725) == "1h02m" and format_duration(None) == "?"
