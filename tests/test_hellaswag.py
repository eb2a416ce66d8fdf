"""HellaSwag: `src/evaluate.py` on checkpoints and Hugging Face directories, checked against an
independent computation with `transformers`; sharded under torchrun; in the trainer at
--hellaswag_freq, each step's row once across a crash and a resume; missing or malformed data.

HellaSwag itself cannot be downloaded here: the data are small files in its own format made
below (fields of hellaswag_val.jsonl), and a local dataset directory for the `datasets` path.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: no hub call, ever

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import SRC, TINY_FLAGS, read_metrics, run, run_dirs, tensorboard_events, torchrun_cmd
from transformers import GPT2LMHeadModel

from common.config import TrainConfig, parse_args
from common.errors import UserError
from common.evals.hellaswag import load_records
from common.evals.multiple_choice import Example, choice_losses, choice_rows
from common.model import GPT
from common.tokenizer import get_tokenizer

EXAMPLES = 40
BLOCK = ["--block_size", "64", "--total_batch_size", "512"]  # room for most examples; long ones are cut
_WORDS = ("a man woman person is are the then they he she it ball water dog bike car sits stands runs jumps "
          "picks up puts down holds throws walks into out of kitchen field pool camera wall rope slowly again "
          "while with on at to and shows how cuts paint brush ladder table").split()


def hellaswag_record(i: int) -> dict:
    """Example i in the fields of HellaSwag's hellaswag_val.jsonl (seeded words; a few long ones)."""
    rng = random.Random(2000 + i)
    ctx_a = " ".join(rng.choices(_WORDS, k=70 if i % 13 == 5 else rng.randint(4, 10))).capitalize() + "."
    ctx_b = " ".join(rng.choices(_WORDS, k=rng.randint(1, 4)))
    endings = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 9))) + "." for _ in range(4)]
    return {"ind": 100 + i, "activity_label": rng.choice(["Washing dishes", "Playing ball", "Painting"]),
            "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": f"{ctx_a} {ctx_b}", "endings": endings,
            "source_id": f"activitynet~v_{i:05d}", "split": "val",
            "split_type": "indomain" if i % 2 else "zeroshot", "label": rng.randrange(4)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("hellaswag") / "hellaswag_val.jsonl",
                       [hellaswag_record(i) for i in range(EXAMPLES)])


def _flags(tmp: Path, data: Path, hellaswag: Path, *extra: str) -> list[str]:
    return [*TINY_FLAGS, *BLOCK, *run_dirs(tmp, data), "--max_steps", "8", "--eval_freq", "4", "--checkpoint_freq",
            "3", "--hellaswag_path", str(hellaswag), "--hellaswag_freq", "2", "--use_tensorboard", *extra]


@pytest.fixture(scope="module")
def crashed_and_resumed(prepared_data: Path, hellaswag_file: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A 2-rank run scoring HellaSwag every 2 steps that crashes before step 6 (its last checkpoint
    is step 3, its last score step 4), then resumes to step 8. Returns the directory and the rows
    metrics.jsonl held before the resume."""
    tmp = tmp_path_factory.mktemp("inloop")
    crashed = run(torchrun_cmd("train_improved.py", 2, _flags(tmp, prepared_data, hellaswag_file,
                                                              "--inject_fault", "crash@6")))
    assert crashed.returncode != 0 and "crashes before step 6" in crashed.stderr, crashed.stderr[-3000:]
    before = [json.loads(line) for line in (tmp / "logs" / "metrics.jsonl").read_text().splitlines()]
    resumed = run(torchrun_cmd("train_improved.py", 2, _flags(tmp, prepared_data, hellaswag_file,
                                                              "--resume", "latest")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp, before


def hellaswag_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("event") == "hellaswag"]


def evaluate(*args: str | Path, nproc: int = 0) -> subprocess.CompletedProcess:
    args = tuple(map(str, args))
    cmd = torchrun_cmd("evaluate.py", nproc, args) if nproc else [sys.executable, str(SRC / "evaluate.py"), *args]
    return run(cmd)


def evaluate_ok(checkpoint: Path, data: Path, out: Path, nproc: int = 0) -> dict:
    proc = evaluate(checkpoint, "--task", "hellaswag", "--data", data, "--out", out, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@torch.no_grad()
def independent_losses(model: GPT2LMHeadModel, record: dict, block_size: int) -> tuple[list[float], list[float]]:
    """Summed and mean loss of each ending after the context, by the HF model, one ending at a
    time, written from HellaSwag's definition (the llm.c way), not with the code under test."""
    encoding = get_tokenizer("gpt2")
    context = encoding.encode_ordinary(record["ctx"])
    sums, means = [], []
    for ending in record["endings"]:
        tokens = encoding.encode_ordinary(" " + ending)
        row = (context + tokens)[-block_size:]  # a row longer than the model's window keeps its end
        log_probs = torch.log_softmax(model(torch.tensor([row])).logits[0].double(), dim=-1)
        first = len(row) - len(tokens)
        losses = [-log_probs[p - 1, row[p]].item() for p in range(max(first, 1), len(row))]
        sums.append(sum(losses))
        means.append(sum(losses) / len(losses))
    return sums, means


def argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def test_scores_equal_an_independent_computation(crashed_and_resumed: tuple[Path, list[dict]],
                                                 hellaswag_file: Path, tmp_path: Path) -> None:
    """evaluate.py on a trained checkpoint and on its Hugging Face export, against the HF model's
    own losses on the same contexts and endings: every example's losses, then acc and acc_norm."""
    checkpoint = crashed_and_resumed[0] / "ckpt" / "step_00000006.pt"
    hf_dir = tmp_path / "hf"
    export = run([sys.executable, str(SRC / "export_checkpoint.py"), str(checkpoint), str(hf_dir), "--format", "hf"])
    assert export.returncode == 0, export.stderr
    hf_model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    records = [json.loads(line) for line in hellaswag_file.read_text().splitlines()]
    block_size = hf_model.config.n_positions
    assert any(len(get_tokenizer("gpt2").encode_ordinary(r["ctx"] + " " + e)) > block_size
               for r in records for e in r["endings"])  # the cut of long rows is part of the check

    from export_checkpoint import load_plain_model
    _, cfg, state = load_plain_model(checkpoint)
    ours = GPT(cfg).eval()
    ours.load_state_dict(state)
    encoding = get_tokenizer("gpt2")
    right = right_norm = 0
    for record in records:
        sums, means = independent_losses(hf_model, record, block_size)
        example = Example(encoding.encode_ordinary(record["ctx"]),
                          [encoding.encode_ordinary(" " + e) for e in record["endings"]], record["label"])
        tokens, mask = choice_rows(example, block_size)
        with torch.no_grad():
            our_sums, our_means = choice_losses(ours.logits(tokens), tokens, mask)
        assert our_sums.tolist() == pytest.approx(sums, abs=1e-4)
        assert our_means.tolist() == pytest.approx(means, abs=1e-4)
        right += argmin(sums) == record["label"]
        right_norm += argmin(means) == record["label"]
    expected = {"task": "hellaswag", "examples": EXAMPLES, "acc": right / EXAMPLES, "acc_norm": right_norm / EXAMPLES}
    assert 0 < right < EXAMPLES and 0 < right_norm < EXAMPLES  # a score that can be wrong either way

    assert evaluate_ok(checkpoint, hellaswag_file, tmp_path / "pt.json") == expected
    assert evaluate_ok(hf_dir, hellaswag_file, tmp_path / "hf.json") == expected


def test_two_ranks_give_exactly_the_one_process_numbers(crashed_and_resumed: tuple[Path, list[dict]],
                                                        hellaswag_file: Path, tmp_path: Path) -> None:
    checkpoint = crashed_and_resumed[0] / "ckpt" / "final.pt"
    one = evaluate_ok(checkpoint, hellaswag_file, tmp_path / "one.json")
    two = evaluate_ok(checkpoint, hellaswag_file, tmp_path / "two.json", nproc=2)
    assert two == one and one["examples"] == EXAMPLES


def test_in_loop_scores_once_per_step_across_a_crash_and_resume(crashed_and_resumed: tuple[Path, list[dict]],
                                                                hellaswag_file: Path, tmp_path: Path) -> None:
    run_dir, before = crashed_and_resumed
    rows = hellaswag_rows([json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in hellaswag_rows(before)] == [2, 4]  # step 4 scored after the step-3 checkpoint
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # step 4 dropped at the resume, scored again: once each
    assert rows[:2] == hellaswag_rows(before)  # exact resume: the same weights, the same numbers
    assert all(r["examples"] == EXAMPLES and set(r) >= {"eval/hellaswag_acc", "eval/hellaswag_acc_norm"}
               for r in rows)
    events = tensorboard_events(run_dir / "logs")
    for tag in ("eval/hellaswag_acc", "eval/hellaswag_acc_norm"):
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [2, 4, 6, 8], tag
        assert [e.value for e in scalars] == pytest.approx([r[tag] for r in rows])
    # The 2-rank in-loop score at step 6 is the one-process evaluate.py score of the step-6 checkpoint.
    alone = evaluate_ok(run_dir / "ckpt" / "step_00000006.pt", hellaswag_file, tmp_path / "alone.json")
    assert (alone["acc"], alone["acc_norm"]) == (rows[2]["eval/hellaswag_acc"], rows[2]["eval/hellaswag_acc_norm"])
    steps, evals = read_metrics(run_dir / "logs")
    assert [r["step"] for r in steps] == list(range(1, 9)) and [r["step"] for r in evals] == [4, 8]


def test_a_dataset_directory_reads_through_datasets(hellaswag_file: Path, tmp_path: Path) -> None:
    """The Hugging Face path (datasets.load_dataset, validation split, labels as strings as the
    hub's copy has them) on a local dataset directory in the hub's layout."""
    import datasets

    records = [json.loads(line) for line in hellaswag_file.read_text().splitlines()]
    directory = tmp_path / "hellaswag"
    (directory / "data").mkdir(parents=True)
    for split, rows in (("validation", records), ("train", records[:5])):
        datasets.Dataset.from_list([r | {"label": str(r["label"])} for r in rows]).to_parquet(
            str(directory / "data" / f"{split}-00000-of-00001.parquet"))
    assert load_records(str(directory)) == load_records(str(hellaswag_file))
    assert len(load_records(str(directory))) == EXAMPLES  # the validation split, not train


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r.pop("ctx"), "line 3: 'ctx' is missing"),
    (lambda r: r["endings"].pop(), "line 3: 'endings' must be a list of 4"),
    (lambda r: r.update(label=7), "line 3: 'label' must be 0-3, got 7"),
    (lambda r: r.update(label=""), "the test split has no labels"),
])
def test_malformed_records_are_named(tmp_path: Path, change, fragment: str) -> None:
    records = [hellaswag_record(i) for i in range(4)]
    change(records[2])
    with pytest.raises(UserError, match=fragment):
        load_records(str(write_jsonl(tmp_path / "bad.jsonl", records)))


def test_unreadable_sources_are_named(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text(json.dumps(hellaswag_record(0)) + "\n{not json\n")
    with pytest.raises(UserError, match="broken.jsonl line 2: not JSON"):
        load_records(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no examples"):
        load_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="datasets cannot load its validation split.*local hellaswag_val.jsonl"):
        load_records("Rowan/hellaswag")  # the hub is offline here


def test_missing_data_exits_2_with_one_line_before_any_work(prepared_data: Path, tmp_path: Path,
                                                             crashed_and_resumed: tuple[Path, list[dict]]) -> None:
    missing = tmp_path / "nowhere" / "hellaswag_val.jsonl"
    proc = evaluate(crashed_and_resumed[0] / "ckpt" / "final.pt", "--task", "hellaswag", "--data", missing,
                    "--out", tmp_path / "out.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert str(missing) in line and "no such file" in line
    assert not (tmp_path / "out.json").exists()

    bad = write_jsonl(tmp_path / "bad.jsonl", [hellaswag_record(0) | {"endings": ["only one"]}])
    proc = run([sys.executable, str(SRC / "train_improved.py"), *TINY_FLAGS, *run_dirs(tmp_path, prepared_data),
                "--hellaswag_path", str(bad)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "bad.jsonl line 1: 'endings' must be a list of 4" in line
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs" / "metrics.jsonl").exists()


def test_hellaswag_flags_are_checked() -> None:
    with pytest.raises(UserError, match="--hellaswag_freq needs --hellaswag_path"):
        parse_args(["--hellaswag_freq", "10"], TrainConfig)
    with pytest.raises(UserError, match="needs --hellaswag_freq"):
        parse_args(["--hellaswag_path", "h.jsonl", "--eval_freq", "0"], TrainConfig)


def test_a_row_longer_than_the_block_keeps_its_end() -> None:
    example = Example(context=[1, 2, 3, 4, 5], choices=[[6, 7], [8, 9, 10, 11]], label=0)
    tokens, mask = choice_rows(example, block_size=4)
    assert tokens.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert mask.tolist() == [[False, False, True, True], [False, True, True, True]]  # 8 has no predecessor
    logits = torch.zeros(2, 4, 16)
    summed, mean = choice_losses(logits, tokens, mask)
    uniform = float(torch.log(torch.tensor(16.0)))
    assert summed.tolist() == pytest.approx([2 * uniform, 3 * uniform])
    assert mean.tolist() == pytest.approx([uniform, uniform])



def test_in_loop_scores_under_fsdp_equal_the_exported_weights_scores(prepared_data: Path, hellaswag_file: Path,
                                                                     tmp_path: Path) -> None:
    """Under --parallel fsdp the scoring pass gathers the sharded root (embeddings, head) as a
    forward does: the step-4 score is evaluate.py's on the final DCP checkpoint."""
    flags = [*_flags(tmp_path, prepared_data, hellaswag_file, "--parallel", "fsdp"), "--max_steps", "4"]
    proc = run(torchrun_cmd("train_improved.py", 2, flags))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = hellaswag_rows([json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in rows] == [2, 4]
    alone = evaluate_ok(tmp_path / "ckpt" / "final.dcp", hellaswag_file, tmp_path / "alone.json")
    assert (alone["acc"], alone["acc_norm"]) == (rows[1]["eval/hellaswag_acc"], rows[1]["eval/hellaswag_acc_norm"])
