"""HellaSwag (Zellers et al., 2019): pick the right ending of a short description out of four.

Data: the validation split (10,042 examples) as a local jsonl in HellaSwag's own fields
(`hellaswag_val.jsonl`: `ctx`, `endings`, `label`, plus `ctx_a`, `ctx_b`, `activity_label`, `ind`,
`split`, `split_type`, `source_id`, which are not needed), or a Hugging Face dataset id (or a local
dataset directory) read with `datasets` (`label` may be a string there). Scored as llm.c does:
context = `ctx`, each choice = " " + ending.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.evals.multiple_choice import Example

SPLIT = "validation"
CHOICES = 4
FIELDS_HINT = "a HellaSwag record has 'ctx' (text), 'endings' (4 texts) and 'label' (0-3), as in hellaswag_val.jsonl"


def load_records(source: str) -> list[dict[str, Any]]:
    """HellaSwag's validation records from a jsonl file, a dataset directory or a Hugging Face id,
    each checked: {"ctx": str, "endings": [4 x str], "label": int}. UserError on missing or
    malformed data, naming the record."""
    path = Path(source).expanduser()
    if path.is_file():
        rows = _jsonl_rows(path)
    elif path.is_dir() or _looks_like_hub_id(source):
        rows = _dataset_rows(source)
    else:
        raise UserError(f"HellaSwag data {source}: no such file (download hellaswag_val.jsonl, or give a Hugging "
                        "Face dataset id such as Rowan/hellaswag)")
    records = [_checked(row, where) for where, row in rows]
    if not records:
        raise UserError(f"HellaSwag data {source} holds no examples")
    return records


def render(record: dict[str, Any], encode: Callable[[str], list[int]]) -> Example:
    return Example(context=encode(record["ctx"]), choices=[encode(" " + ending) for ending in record["endings"]],
                   label=record["label"])


def _looks_like_hub_id(source: str) -> bool:
    """`owner/name` or `name`: no file suffix, not an explicit path."""
    return not source.startswith((".", "/", "~")) and source.count("/") <= 1 and not Path(source).suffix


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"HellaSwag data {path}: cannot read it as UTF-8 text ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"HellaSwag data {where}: not JSON ({err.msg}); {FIELDS_HINT}") from None


def _dataset_rows(source: str) -> list[tuple[str, Any]]:
    """The validation split through `datasets` (a hub id, or a local dataset directory), streamed:
    nothing is written to the datasets cache."""
    import datasets

    try:
        rows = list(datasets.load_dataset(source, split=SPLIT, streaming=True))
    except Exception as err:  # noqa: BLE001 - offline hub, unknown id, missing split: one line for each
        detail = " ".join(str(err).split())[:300]
        raise UserError(f"HellaSwag data {source}: datasets cannot load its {SPLIT} split ({type(err).__name__}: "
                        f"{detail}); without network access pass a local hellaswag_val.jsonl") from None
    return [(f"{source} {SPLIT} row {index}", row) for index, row in enumerate(rows)]


def _checked(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise UserError(f"HellaSwag data {where}: not a JSON object; {FIELDS_HINT}")
    label = _label(row.get("label"))
    problem = None
    if not isinstance(row.get("ctx"), str) or not row["ctx"].strip():
        problem = "'ctx' is missing or empty"
    elif not (isinstance(row.get("endings"), list) and len(row["endings"]) == CHOICES
              and all(isinstance(e, str) and e.strip() for e in row["endings"])):
        problem = f"'endings' must be a list of {CHOICES} non-empty texts"
    elif label is None:
        unlabelled = " (the test split has no labels: use the validation split)" if row.get("label") == "" else ""
        problem = f"'label' must be 0-{CHOICES - 1}, got {row.get('label')!r}{unlabelled}"
    if problem:
        raise UserError(f"HellaSwag data {where}: {problem}; {FIELDS_HINT}")
    return {"ctx": row["ctx"], "endings": list(row["endings"]), "label": label}


def _label(value: Any) -> int | None:
    """0-3 as HellaSwag's jsonl (int) or the Hugging Face dataset (str) spells it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and 0 <= value < CHOICES else None
