"""Linear layer + cross-entropy in row chunks: the (rows, vocabulary) logits never exist whole.

The output layer of a GPT turns N = B*T hidden states into N x V logits (8 x 256 x 50,304 fp32 is
412 MB), which the plain path writes, soft-maxes into a second tensor of the same size and keeps
for backward, where a third one, the gradient, appears. Here the rows go through in chunks of a
few MB each: a chunk's logits are made, reduced to its loss, turned in place into their gradient
(softmax minus one-hot, over the number of counted targets) and multiplied out into the
gradients of the hidden states and of the weight at once, then freed. Backward only scales the
two gradients kept from forward by the incoming gradient. The idea is Liger-Kernel's
FusedLinearCrossEntropy, written here in plain PyTorch.

Same result as `F.cross_entropy(hidden @ weight.T, targets)` (mean over the targets that are not
`ignore_index`; 0 rather than NaN when none is), within floating-point tolerance. Under autocast
the products run in the autocast dtype and the soft-max in fp32, as the plain path does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# Logits per chunk, by device. CPU: about 32 MB of fp32, the size measured fastest on the CPU of
# docs/BENCHMARKS.md (smaller chunks pay for more passes over the weight's gradient, larger ones
# leave the caches). GPU: large enough that each chunk's products keep the tensor cores busy and
# its few passes over the weight's gradient cost little; still a fraction of the whole logits.
CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**26}
DEFAULT_CHUNK_ELEMENTS = 2**23


def chunk_rows_for(rows: int, vocab: int, device_type: str) -> int:
    """Rows per chunk: `rows` split evenly into as few chunks as keep each chunk's logits within
    the device's budget."""
    budget = CHUNK_ELEMENTS.get(device_type, DEFAULT_CHUNK_ELEMENTS)
    chunks = max(1, math.ceil(rows * vocab / budget))
    return math.ceil(rows / chunks)


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Soft-max, loss and the weight's gradient (a sum over every chunk) in fp32 at least,
        # whatever the dtype of the products.
        acc_dtype = torch.promote_types(dtype, torch.float32)
        counted = targets != ignore_index
        # A tensor, not a Python number: counting the targets needs no host sync.
        scale = 1.0 / counted.sum().clamp(min=1).to(acc_dtype)
        w = weight.to(dtype)
        loss = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_weight else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, keep = hidden[rows].to(dtype), targets[rows], counted[rows]
            logp = torch.log_softmax((h @ w.t()).to(acc_dtype), dim=1)
            safe_t = torch.where(keep, t, 0).unsqueeze(1)
            picked = logp.gather(1, safe_t).squeeze(1)
            loss -= torch.where(keep, picked, 0.0).sum()
            if not (want_hidden or want_weight):
                continue
            # d loss / d logits = (softmax - one_hot) * scale on counted rows, 0 on ignored ones,
            # written over the chunk's log-probabilities.
            grad = logp.exp_()
            grad.scatter_add_(1, safe_t, torch.full_like(picked, -1.0).unsqueeze(1))
            grad = grad.mul_((keep * scale).unsqueeze(1)).to(dtype)
            if want_hidden:
                grad_hidden[rows] = grad @ w
            if want_weight and dtype == acc_dtype:
                grad_weight.addmm_(grad.t(), h)
            elif want_weight:
                grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype, ctx.used = weight.dtype, False
        return loss * scale

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.used:
            raise RuntimeError("linear_cross_entropy computes its gradients in forward and cannot be "
                               "back-propagated twice (retain_graph)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: these buffers belong to this call alone (no copy of the weight's size).
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def cross_entropy_in_chunks(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                            chunk_rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(logits, targets)` for logits that exist already (evaluation), without its
    (N, V) log-softmax copy: row chunks, each soft-maxed in fp32 and summed. No gradient."""
    logits2d, flat = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    rows = chunk_rows or chunk_rows_for(logits2d.size(0), logits2d.size(1), logits.device.type)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, logits2d.size(0), rows):
            total += F.cross_entropy(logits2d[start:start + rows].float(), flat[start:start + rows],
                                     ignore_index=ignore_index, reduction="sum")
        return total / (flat != ignore_index).sum().clamp(min=1)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, computed in row chunks.

    hidden: (..., C); weight: (V, C); targets: (...) integer ids, `ignore_index` not counted.
    Gradients flow to `hidden` and `weight` (computed during forward, kept until backward: the
    hidden states' size plus the weight's size in fp32, instead of three (N, V) tensors).
    """
    hidden2d = hidden.reshape(-1, hidden.size(-1))
    rows = chunk_rows or chunk_rows_for(hidden2d.size(0), weight.size(0), hidden.device.type)
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden2d, weight, targets.reshape(-1), rows, ignore_index, dtype)
