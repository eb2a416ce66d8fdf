"""Downstream evaluations of a model: HellaSwag now, later tasks beside it.

A task reads and checks its data (`load`: rank 0 reads, every rank gets the records) and turns
each record into a multiple-choice `Example` with the run's tokenizer (`render`); `score` runs
the examples on a model, sharded across ranks.

    examples = load_task("hellaswag", "hellaswag_val.jsonl", lambda: encode, vocab_size, ctx)
    scores = score(model, examples, ctx)        # Scores(examples, acc, acc_norm)
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from common.dist import DistContext, rank0_decides
from common.errors import UserError
from common.evals import hellaswag
from common.evals.multiple_choice import Example, Scores, score

Encode = Callable[[str], list[int]]

# task name -> (load: source -> checked records, render: record, encode -> Example)
TASKS: dict[str, tuple[Callable[[str], list[dict[str, Any]]], Callable[[dict[str, Any], Encode], Example]]] = {
    "hellaswag": (hellaswag.load_records, hellaswag.render),
}

__all__ = ["TASKS", "Example", "Scores", "load_task", "score"]


def load_task(task: str, source: str, tokenizer: Callable[[], Encode], vocab_size: int,
              ctx: DistContext) -> list[Example]:
    """The task's examples, tokenized with the encoder `tokenizer()` returns (loaded once the data
    passed its checks). Collective (rank 0 reads the data); UserError on every rank for missing or
    malformed data, or tokens the model's vocabulary does not hold."""
    load, render = TASKS[task]
    records = rank0_decides(lambda: load(source), ctx)
    encode = tokenizer()
    examples = [render(record, encode) for record in records]
    top = max(max(itertools.chain(e.context, *e.choices)) for e in examples)
    if top >= vocab_size:
        raise UserError(f"{task}: the tokenizer gives token id {top} but the model's vocabulary has {vocab_size} "
                        "ids; score it with the tokenizer the model was trained with")
    return examples
