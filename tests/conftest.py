"""Shared fixtures: a small deterministic text corpus and a dataset prepared from it by the real
prepare_data.py (a subprocess), reused by the loader, trainer and checkpoint tests.

`prepared_data` is shared by the whole session: treat it as read-only (copy it with
`prepared_copy` to change anything).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from runs import REPO, SRC, env

# tiktoken cannot download without a network: use the shared cache beside the checkout when the
# caller (CI sets it) has not pointed TIKTOKEN_CACHE_DIR elsewhere.
_SHARED_CACHE = REPO.parent / "shared" / "tiktoken_cache"
if not os.environ.get("TIKTOKEN_CACHE_DIR") and _SHARED_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_CACHE)

# The layout of `prepared_data` (tests may rely on these numbers).
PREPARED_SHARD_TOKENS = 50_000
PREPARED_VAL_TOKENS = 20_000
CORPUS_DOCS = 40

_WORDS = ("the of and to in is that for it as with was on be by this are from or at an which but not have "
          "model token shard epoch batch resume checkpoint gradient loss tensor rank window stream seed "
          "naïve café Zürich façade 日本語 テキスト Ελληνικά кириллица emoji 🚀 ✓ — … “quoted” (parens) [x] "
          "def return lambda 0 1 2 42 3.14 1e-3 x_1 foo.bar() {'k': 'v'}").split()


def corpus_document(i: int) -> str:
    """Document i of the test corpus: seeded pseudo-text with unicode, code-like words, odd spacing."""
    rng = random.Random(1000 + i)
    lines = []
    for _ in range(rng.randint(120, 220)):
        words = rng.choices(_WORDS, k=rng.randint(3, 16))
        lines.append(" " * rng.choice((0, 0, 4)) + " ".join(words))
    text = "\n".join(lines)
    if i == 3:
        text += "\nA literal <|endoftext|> inside a document stays ordinary text.\n"
    if i % 7 == 0:
        text += "\n\n\ttrailing tab and blank lines\n\n"
    return text


def write_corpus(directory: Path, docs: int = CORPUS_DOCS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (directory / f"doc_{i:03d}.txt").write_text(corpus_document(i), encoding="utf-8")
    return directory


def run_prepare(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run src/prepare_data.py as a real process; returns it (check returncode yourself)."""
    cmd = [sys.executable, str(SRC / "prepare_data.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def prepare_ok(*args: str | Path) -> subprocess.CompletedProcess:
    proc = run_prepare(*args)
    assert proc.returncode == 0, f"prepare_data.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CORPUS_DOCS deterministic .txt documents (about 200k gpt2 tokens in total). Read-only."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def prepared_data(small_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_corpus_dir` prepared with lz4: one val shard of PREPARED_VAL_TOKENS and >= 3 train shards."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_ok("--dataset", small_corpus_dir, "--out", out, "--shard_tokens", PREPARED_SHARD_TOKENS,
               "--val_tokens", PREPARED_VAL_TOKENS, "--workers", "2")
    return out


@pytest.fixture()
def prepared_copy(prepared_data: Path, tmp_path: Path) -> Path:
    """A private copy of `prepared_data` that a test may change."""
    return Path(shutil.copytree(prepared_data, tmp_path / "data_copy"))


@pytest.fixture(scope="session")
def prepare() -> Callable[..., subprocess.CompletedProcess]:
    """`prepare(*args)` runs prepare_data.py and returns the CompletedProcess."""
    return run_prepare


# `make test` hands whole files to two workers in the order collected (--dist loadfile
# --no-loadscope-reorder). xdist's own reorder puts the files with the most tests first, which left
# files of few but long tests (test_healing.py, test_gpu_check.py, test_resume.py) to start when
# the other worker was nearly done. The longest files go first, roughly longest first, so that the
# two workers finish together; the rest (each well under a minute alone) keep their usual order.
LONGEST_FIRST = (
    "test_resume.py",
    "test_tokenizers.py",
    "test_checkpoint_recovery.py",
    "test_healing.py",
    "test_faults.py",
    "test_fsdp.py",
    "test_hellaswag.py",
    "test_hf.py",
    "test_train.py",
    "test_bench.py",
    "test_slurm.py",
    "test_signals.py",
    "test_gpu_check.py",
    "test_prepare_data.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
