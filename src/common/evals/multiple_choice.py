"""Multiple-choice scoring, the way llm.c scores HellaSwag.

Each choice is appended to the example's context and the model's loss is taken on the choice's
tokens only. `acc` picks the choice with the lowest summed loss, `acc_norm` the one with the lowest
mean loss per token (no bias towards short choices). One example is one forward pass of its
choices (padded to the longest): the same computation whichever rank it lands on, so a sharded
run gives exactly the numbers of one process.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.dist import DistContext, all_reduce_sum


@dataclass(frozen=True)
class Example:
    context: list[int]  # tokens before every choice (never empty)
    choices: list[list[int]]  # tokens of each choice (never empty)
    label: int  # index of the right choice


@dataclass(frozen=True)
class Scores:
    examples: int
    acc: float
    acc_norm: float


def choice_rows(example: Example, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, mask), each (choices, width): context + choice per row, right-padded with token 0;
    mask marks the choice's tokens. A row longer than the model's block keeps its last block_size
    tokens (the choice and the context nearest it); a token without a predecessor in the row is
    not scored."""
    rows = [example.context + choice for choice in example.choices]
    width = min(max(map(len, rows)), block_size)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        start = max(0, len(row) - block_size)
        kept = row[start:]
        tokens[r, : len(kept)] = torch.tensor(kept)
        mask[r, max(1, len(example.context) - start): len(kept)] = True
    return tokens, mask


def choice_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean loss of each row's masked tokens, each predicted from the tokens before it
    (the cross-entropy taken at the masked positions only: a few tokens out of each row)."""
    scored = mask[:, 1:]
    losses = torch.zeros(scored.shape, dtype=torch.float32, device=logits.device)
    losses[scored] = F.cross_entropy(logits[:, :-1][scored].float(), tokens[:, 1:][scored], reduction="none")
    summed = losses.sum(dim=1)
    return summed, summed / scored.sum(dim=1)


@torch.no_grad()
def score(model: torch.nn.Module, examples: Sequence[Example], ctx: DistContext, *,
          forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
          progress: Callable[[int], None] | None = None) -> Scores:
    """acc and acc_norm of `model` (a GPT: `.logits(idx)` and `.config.block_size`) on `examples`.

    Collective: rank r scores examples r, r + W, r + 2W, ...; the counts are summed over ranks.
    `forward_context` wraps each forward pass (autocast, FP8); `progress(n)` is called after each
    example this rank scores.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=ctx.device)  # examples, right by sum, right by mean
    for i in range(ctx.rank, len(examples), ctx.world_size):
        example = examples[i]
        tokens, mask = (t.to(ctx.device) for t in choice_rows(example, model.config.block_size))
        with forward_context():
            logits = model.logits(tokens)
        summed, mean = choice_losses(logits, tokens, mask)
        counts[0] += 1
        counts[1] += int(summed.argmin()) == example.label
        counts[2] += int(mean.argmin()) == example.label
        if progress is not None:
            progress(1)
    model.train(was_training)
    total, right, right_norm = all_reduce_sum(counts, ctx).tolist()
    return Scores(total, right / total, right_norm / total)
