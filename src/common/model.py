"""GPT-2: pre-LayerNorm blocks, causal attention through scaled_dot_product_attention, GELU MLP,
tied embeddings, vocabulary padded to a multiple of 64. The training loss goes through the chunked
linear + cross-entropy of `common.fused_ce` (`--fused_ce`), which never holds the whole logits.

The block's linear layers come from one factory so the FP8 script can swap in TransformerEngine
modules; embeddings, norms and the tied output head stay plain torch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.fused_ce import cross_entropy_in_chunks, linear_cross_entropy

LinearFactory = Callable[[int, int, bool], nn.Module]


def default_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


# Devices where the chunked cross-entropy is on under `--fused_ce auto`: measured faster than the
# plain path on CPU (docs/BENCHMARKS.md), and on CUDA it removes the largest activation of a step
# (`make gpu-check` measures both paths on a GPU).
FUSED_CE_AUTO_DEVICES = ("cpu", "cuda")


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows rounded up: matmuls with a dimension divisible by 64 run on faster kernels."""
    return (vocab_size + multiple - 1) // multiple * multiple


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    fused_ce: str = "auto"  # chunked linear + cross-entropy in training: on | off | auto (where it wins)

    @classmethod
    def from_train_config(cls, cfg: object) -> GPTConfig:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias)
        self.c_proj = linear(cfg.n_embd, cfg.n_embd, cfg.bias)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.c_fc = linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias)
        self.c_proj = linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, linear)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, linear_factory: LinearFactory = default_linear) -> None:
        super().__init__()
        self.config = cfg
        self.padded_vocab_size = padded_vocab(cfg.vocab_size)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, linear_factory) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, self.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation; residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        if getattr(module, "residual_projection", False):
            std /= math.sqrt(2 * self.config.n_layer)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
            nn.init.normal_(weight, mean=0.0, std=std)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                nn.init.zeros_(bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters counted once (tied weights once); position embeddings excluded by default,
        as in the FLOPs-per-token formula."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, loss), each only where a caller uses it:

        - no targets (generation): the last position's logits over the real vocabulary, no loss;
        - targets, training mode: the loss alone (logits None). Nothing of the (B, T, V) logits
          outlives the call: a returned tensor would stay alive through backward and into the
          next micro-step, and the chunked path (`--fused_ce`) never makes them whole;
        - targets, evaluation mode: the logits over the real vocabulary and the loss.
        """
        x = self._hidden_states(idx)
        if targets is None:
            # Generation needs only the last position: skip the full (T, vocab) product.
            return self.lm_head(x[:, -1:, :])[..., : self.config.vocab_size], None
        if self.training and self.uses_fused_ce(x.device):
            return None, linear_cross_entropy(x, self.lm_head.weight, targets)
        # Loss over the padded vocabulary, as nanoGPT does: no copy of the (B, T, V) logits to
        # slice off the padding; the padding ids never occur as targets, so their logits are
        # simply pushed down. cross_entropy runs in fp32 under autocast.
        logits = self.lm_head(x)
        if not torch.is_grad_enabled():  # evaluation: the loss without a second logits-sized tensor
            loss = cross_entropy_in_chunks(logits, targets)
        else:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return (None if self.training else logits[..., : self.config.vocab_size]), loss

    def uses_fused_ce(self, device: torch.device) -> bool:
        """Whether a training forward on `device` takes the chunked linear + cross-entropy."""
        choice = self.config.fused_ce
        return choice == "on" or (choice == "auto" and device.type in FUSED_CE_AUTO_DEVICES)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits at every position over the real vocabulary, (B, T, vocab_size): for scoring every
        token (evaluations) and conversion checks. Training goes through `forward`."""
        return self.lm_head(self._hidden_states(idx))[..., : self.config.vocab_size]

    def _hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output for every position, (B, T, n_embd)."""
        _, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations. A private `generator` keeps sampling off the training RNG stream,
        so a sample at an evaluation does not change the numbers the run draws afterwards."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits, _ = self(context)
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
