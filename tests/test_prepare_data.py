"""prepare_data.py as a real process on real files: shard format, contents, resume, refusals."""
from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
from pathlib import Path

import lz4.frame
import numpy as np
import pytest
from conftest import (
    CORPUS_DOCS,
    PREPARED_SHARD_TOKENS,
    PREPARED_VAL_TOKENS,
    corpus_document,
    prepare_ok,
    run_prepare,
    write_corpus,
)

from common.dataset_writer import DatasetWriter
from common.shards import read_shard, write_shard
from common.tokenizer import get_tokenizer

EOT = 50256


def meta_of(data_dir: Path) -> dict:
    return json.loads((data_dir / "meta.json").read_text())


def raw_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lz4.frame.decompress(data) if path.name.endswith(".lz4") else data


def stream(data_dir: Path) -> np.ndarray:
    """All tokens of the directory in stream order (meta order: val first, then train)."""
    return np.concatenate([read_shard(data_dir / e["file"]) for e in meta_of(data_dir)["shards"]])


def documents_of(tokens: np.ndarray) -> list[str]:
    """Split a stream at the end-of-text tokens (one before every document) and decode."""
    enc = get_tokenizer("gpt2")
    cuts = np.flatnonzero(tokens == EOT)
    assert cuts.size and cuts[0] == 0, "the stream must start with the end-of-text token"
    bounds = [*cuts.tolist(), len(tokens)]
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]


def file_ids(data_dir: Path) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime_ns, sha256) of every shard: unchanged means never rewritten."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(data_dir.glob("*.bin*"))}


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def plain_data(small_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus and flags as `prepared_data` but --compress none (and one worker)."""
    out = tmp_path_factory.mktemp("plain") / "data"
    prepare_ok("--dataset", small_corpus_dir, "--out", out, "--shard_tokens", PREPARED_SHARD_TOKENS,
               "--val_tokens", PREPARED_VAL_TOKENS, "--compress", "none", "--workers", "1")
    return out


def test_local_corpus_shards_are_llmc_format(prepared_data: Path) -> None:
    meta = meta_of(prepared_data)
    assert meta["complete"] is True and meta["tokenizer"] == "gpt2"
    assert (meta["vocab_size"], meta["eot_token"]) == (50257, EOT)
    names = [e["file"] for e in meta["shards"]]
    assert names[0] == "val_000000.bin.lz4"
    train = [e for e in meta["shards"] if e["split"] == "train"]
    assert len(train) >= 3 and [e["file"] for e in train] == [f"train_{i:06d}.bin.lz4" for i in range(len(train))]
    assert sum(e["tokens"] for e in meta["shards"] if e["split"] == "val") == PREPARED_VAL_TOKENS
    assert all(e["tokens"] == PREPARED_SHARD_TOKENS for e in train[:-1]) and 0 < train[-1]["tokens"]
    assert meta["expected_train_tokens"] == sum(e["tokens"] for e in train)
    assert meta["documents"] == CORPUS_DOCS
    assert sorted(p.name for p in prepared_data.iterdir() if not p.name.startswith(".")) == sorted(
        [*names, "meta.json"])  # no temporary files left
    for entry in meta["shards"]:
        path = prepared_data / entry["file"]
        data = raw_bytes(path)
        header = np.frombuffer(data[:1024], dtype="<i4")
        assert (header[0], header[1], header[2]) == (20240520, 1, entry["tokens"])
        assert len(data) == 1024 + 2 * entry["tokens"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert hashlib.sha256(data[1024:]).hexdigest() == entry["tokens_sha256"]


def test_lz4_and_plain_shards_hold_identical_tokens(prepared_data: Path, plain_data: Path) -> None:
    lz4_meta, plain_meta = meta_of(prepared_data), meta_of(plain_data)
    assert [e["file"] + ".lz4" for e in plain_meta["shards"]] == [e["file"] for e in lz4_meta["shards"]]
    for lz, pl in zip(lz4_meta["shards"], plain_meta["shards"]):
        plain_path = plain_data / pl["file"]
        assert plain_path.stat().st_size == 1024 + 2 * pl["tokens"]
        assert raw_bytes(prepared_data / lz["file"]) == plain_path.read_bytes()
        assert lz["tokens_sha256"] == pl["tokens_sha256"]
    # lz4 was worth it: the compressed directory is smaller
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.bin*"))  # noqa: E731
    assert size(prepared_data) < size(plain_data)


def test_decoding_gives_back_each_document(prepared_data: Path, small_corpus_dir: Path) -> None:
    expected = [p.read_text(encoding="utf-8") for p in sorted(small_corpus_dir.glob("*.txt"))]
    assert documents_of(stream(prepared_data)) == expected
    assert "A literal <|endoftext|> inside" in expected[3]  # special-token text survives as text


def test_second_run_rewrites_no_finished_shard(small_corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    args = ["--dataset", small_corpus_dir, "--out", out, "--shard_tokens", 30_000, "--val_tokens", 10_000,
            "--workers", "1"]
    prepare_ok(*args)
    before, meta_before = file_ids(out), meta_of(out)
    proc = prepare_ok(*args)
    assert "up to date" in proc.stdout
    assert file_ids(out) == before and meta_of(out) == meta_before

    # An interrupted run: meta.json lists only the first shards; the same command finishes the
    # job, re-tokenizing the prefix without rewriting any of it.
    kept, dropped = meta_before["shards"][:3], meta_before["shards"][3:]
    for entry in dropped:
        (out / entry["file"]).unlink()
    (out / "meta.json").write_text(json.dumps({**meta_before, "shards": kept, "complete": False}))
    (out / ".train_000009.bin.lz4.999.tmp").write_bytes(b"partial write of a killed run")
    prepare_ok(*args)
    after = file_ids(out)
    assert {e["file"]: after[e["file"]] for e in kept} == {e["file"]: before[e["file"]] for e in kept}
    assert {k: v[2] for k, v in after.items()} == {k: v[2] for k, v in before.items()}  # same bytes
    assert meta_of(out)["shards"] == meta_before["shards"] and meta_of(out)["complete"]
    assert not list(out.glob(".*.tmp"))


def test_grown_corpus_appends_shards_without_touching_old_ones(small_corpus_dir: Path, tmp_path: Path) -> None:
    corpus = Path(shutil.copytree(small_corpus_dir, tmp_path / "corpus"))
    out = tmp_path / "data"
    args = ["--dataset", corpus, "--out", out, "--shard_tokens", 40_000, "--val_tokens", 10_000, "--workers", "2"]
    prepare_ok(*args)
    before, old_meta = file_ids(out), meta_of(out)
    extra = [corpus_document(100 + i) for i in range(8)]
    for i, text in enumerate(extra):
        (corpus / f"zz_new_{i}.txt").write_text(text, encoding="utf-8")
    prepare_ok(*args)
    meta = meta_of(out)
    assert meta["shards"][: len(old_meta["shards"])] == old_meta["shards"]
    assert len(meta["shards"]) > len(old_meta["shards"])
    assert {k: v for k, v in file_ids(out).items() if k in before} == before
    assert meta["documents"] == CORPUS_DOCS + len(extra) and meta["complete"]
    assert meta["expected_train_tokens"] == sum(e["tokens"] for e in meta["shards"] if e["split"] == "train")
    assert documents_of(stream(out))[-len(extra):] == extra


def test_changed_source_is_refused_and_nothing_is_damaged(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", docs=12)
    out = tmp_path / "data"
    args = ["--dataset", corpus, "--out", out, "--shard_tokens", 20_000, "--val_tokens", 5_000, "--workers", "1"]
    prepare_ok(*args)
    before, meta_before = file_ids(out), (out / "meta.json").read_bytes()
    (corpus / "doc_000.txt").write_text("an edited first document\n", encoding="utf-8")
    line = one_line_error(run_prepare(*args))
    assert "source changed" in line and "val_000000.bin.lz4" in line
    assert file_ids(out) == before and (out / "meta.json").read_bytes() == meta_before


def test_stdlib_default_prepares(tmp_path: Path) -> None:
    out = tmp_path / "stdlib"
    prepare_ok("--dataset", "stdlib", "--out", out, "--max_tokens", 300_000, "--shard_tokens", 100_000,
               "--workers", "2")
    meta = meta_of(out)
    assert meta["source"] == "stdlib" and meta["complete"] and meta["exhausted"] is False
    assert sum(e["tokens"] for e in meta["shards"]) == 300_000
    assert meta["settings"]["val_tokens"] == 10_000  # the default under a --max_tokens cap
    assert [e["split"] for e in meta["shards"]] == ["val", "train", "train", "train"]
    for entry in meta["shards"]:
        data = raw_bytes(out / entry["file"])
        assert tuple(np.frombuffer(data[:12], dtype="<i4")) == (20240520, 1, entry["tokens"])
        assert len(data) == 1024 + 2 * entry["tokens"]
    # The stream is the standard library's non-empty .py files in sorted order, one document each.
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts),
                   key=lambda p: p.relative_to(root).as_posix())
    texts = [t for t in (p.read_bytes().decode("utf-8", "replace") for p in files) if t]
    docs = documents_of(stream(out))
    assert meta["documents"] == len(docs) > 10
    assert docs[:-1] == texts[: len(docs) - 1]  # the last one is cut by --max_tokens
    assert texts[len(docs) - 1].startswith(docs[-1])


def test_jsonl_source_reads_the_text_field(tmp_path: Path) -> None:
    rows = [{"id": i, "body": corpus_document(i)} for i in range(6)]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "data"
    prepare_ok("--dataset", src, "--out", out, "--text_field", "body", "--val_tokens", 2_000, "--workers", "1",
               "--compress", "none")
    assert documents_of(stream(out)) == [r["body"] for r in rows]
    line = one_line_error(run_prepare("--dataset", src, "--out", tmp_path / "other", "--val_tokens", 2_000))
    assert "no field 'text'" in line and "--text_field" in line


def test_writer_publishes_an_estimate_while_growing_and_the_exact_total_at_the_end(tmp_path: Path) -> None:
    meta = {"format_version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": EOT, "shards": []}
    writer = DatasetWriter(tmp_path, meta, shard_tokens=1000, val_tokens=500, compress=True, max_tokens=None,
                           estimated_tokens=50_000)
    tokens = np.arange(2600, dtype=np.uint16)
    tokens[::100] = EOT
    writer.add(tokens)
    partial = meta_of(tmp_path)  # what a trainer sees while prepare_data.py runs
    assert [e["file"] for e in partial["shards"]] == ["val_000000.bin.lz4", "train_000000.bin.lz4",
                                                     "train_000001.bin.lz4"]
    assert partial["complete"] is False and partial["expected_train_tokens"] == 50_000 - 500
    final = writer.finish(exhausted=True)
    assert final == meta_of(tmp_path) and final["complete"] and final["documents"] == 26
    assert final["expected_train_tokens"] == 2100 and final["shards"][-1]["tokens"] == 100
    assert np.array_equal(stream(tmp_path), tokens)


@pytest.mark.parametrize("case", ["missing_path", "unknown_dataset", "unknown_tokenizer", "empty_corpus",
                                  "out_is_a_file", "out_under_a_file", "too_small_for_val", "max_below_val",
                                  "bad_flag"])
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, small_corpus_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    small = tmp_path / "small.txt"
    small.write_text("a short corpus")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    out = tmp_path / "out"
    args, fragment = {
        "missing_path": (["--dataset", tmp_path / "nope" / "corpus.txt"], "no such file"),
        "unknown_dataset": (["--dataset", "no_such_org/no_such_dataset"], "no_such_org/no_such_dataset"),
        "unknown_tokenizer": (["--dataset", small_corpus_dir, "--tokenizer", "bpe_9000"], "unknown tokenizer"),
        "empty_corpus": (["--dataset", empty], "no text"),
        "out_is_a_file": (["--dataset", small_corpus_dir, "--out", a_file], "not a directory"),
        "out_under_a_file": (["--dataset", small_corpus_dir, "--out", a_file / "sub"], "cannot write"),
        "too_small_for_val": (["--dataset", small, "--val_tokens", 1000], "only 4 tokens, not more than --val_tokens"),
        "max_below_val": (["--dataset", small_corpus_dir, "--max_tokens", 1000, "--val_tokens", 5000], "--max_tokens"),
        "bad_flag": (["--dataset", small_corpus_dir, "--compress", "zip"], "invalid choice: 'zip'"),
    }[case]
    if "--out" not in args:
        args += ["--out", out]
    line = one_line_error(run_prepare(*args, "--workers", "1"))
    assert line.startswith("prepare_data.py: error: ") and fragment in line, line
    if case in ("missing_path", "unknown_dataset", "unknown_tokenizer", "max_below_val", "bad_flag"):
        assert not out.exists()  # refused before anything was created
    if case in ("empty_corpus", "too_small_for_val"):
        assert not (out / "meta.json").exists()


def test_other_tokenizer_into_existing_dir_is_refused(prepared_copy: Path, small_corpus_dir: Path) -> None:
    before, meta_before = file_ids(prepared_copy), (prepared_copy / "meta.json").read_bytes()
    line = one_line_error(run_prepare("--dataset", small_corpus_dir, "--out", prepared_copy,
                                      "--shard_tokens", PREPARED_SHARD_TOKENS, "--val_tokens", PREPARED_VAL_TOKENS,
                                      "--tokenizer", "p50k_base"))
    assert "--tokenizer gpt2, not p50k_base" in line
    line = one_line_error(run_prepare("--dataset", small_corpus_dir, "--out", prepared_copy,
                                      "--shard_tokens", 1234, "--val_tokens", PREPARED_VAL_TOKENS))
    assert "--shard_tokens" in line
    assert file_ids(prepared_copy) == before and (prepared_copy / "meta.json").read_bytes() == meta_before


def test_refuses_to_write_over_foreign_shards(tmp_path: Path, small_corpus_dir: Path) -> None:
    out = tmp_path / "llmc"
    out.mkdir()
    (out / "train_000000.bin").write_bytes(b"someone else's data")
    line = one_line_error(run_prepare("--dataset", small_corpus_dir, "--out", out, "--workers", "1"))
    assert "no meta.json" in line
    assert (out / "train_000000.bin").read_bytes() == b"someone else's data"


def test_tokenizer_offline_fallback_and_errors() -> None:
    enc = get_tokenizer("gpt2")
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.encode_ordinary("hello world") == [31373, 995]  # GPT-2's ids
    from common.errors import UserError
    with pytest.raises(UserError, match="unknown tokenizer 'nope'.*r50k_base"):
        get_tokenizer("nope")
    assert get_tokenizer("gpt-2").n_vocab == 50257  # a model name maps to its encoding


# ----------------------------------------------------------------------------- what is trusted


def rerun_args(prepared_copy: Path, small_corpus_dir: Path) -> list:
    """The command that made `prepared_data`, aimed at a copy of it: a rerun that continues it."""
    return ["--dataset", small_corpus_dir, "--out", prepared_copy, "--shard_tokens", PREPARED_SHARD_TOKENS,
            "--val_tokens", PREPARED_VAL_TOKENS, "--workers", "1"]


def test_rerun_never_writes_outside_out(prepared_copy: Path, small_corpus_dir: Path, tmp_path: Path) -> None:
    out, args = prepared_copy, rerun_args(prepared_copy, small_corpus_dir)
    meta = meta_of(out)
    name = meta["shards"][-1]["file"]
    (out / name).unlink()  # a missing shard is rewritten by name on the next run
    for escape in (f"../{name}", str(tmp_path / name)):
        meta["shards"][-1]["file"] = escape
        (out / "meta.json").write_text(json.dumps(meta))
        line = one_line_error(run_prepare(*args))
        assert "meta.json" in line and escape in line and "not a plain file name" in line, line
        assert not (tmp_path / name).exists()
    meta["shards"][-1]["file"] = name
    (out / "meta.json").write_text(json.dumps(meta))
    (out / name).symlink_to(tmp_path / "elsewhere" / name)  # dangling: writing through it would escape
    line = one_line_error(run_prepare(*args))
    assert name in line and "outside" in line, line
    assert not (tmp_path / "elsewhere").exists() and (out / name).is_symlink()


@pytest.mark.parametrize("damage", [b'{"format_version": 1, "source": "caf\xe9"}', b'{"format_version": 1, '
                                    b'"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256, "shards": [7]}'])
def test_malformed_meta_json_stops_a_rerun_with_one_line(prepared_copy: Path, small_corpus_dir: Path,
                                                         damage: bytes) -> None:
    (prepared_copy / "meta.json").write_bytes(damage)
    before = file_ids(prepared_copy)
    line = one_line_error(run_prepare(*rerun_args(prepared_copy, small_corpus_dir)))
    assert f"{prepared_copy / 'meta.json'}: " in line and "prepare the data again" in line, line
    assert file_ids(prepared_copy) == before and (prepared_copy / "meta.json").read_bytes() == damage


def test_a_rewritten_shard_gets_the_sha256_of_its_bytes(prepared_copy: Path, small_corpus_dir: Path) -> None:
    """Another lz4 release may compress the same tokens to other bytes: meta.json must say what is stored."""
    out, args = prepared_copy, rerun_args(prepared_copy, small_corpus_dir)
    meta = meta_of(out)
    entry = meta["shards"][1]
    (out / entry["file"]).unlink()
    entry["sha256"] = "0" * 64  # what an older lz4 would have produced
    (out / "meta.json").write_text(json.dumps(meta))
    prepare_ok(*args)
    rewritten = meta_of(out)["shards"][1]
    assert rewritten["sha256"] == hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest()
    assert rewritten["tokens_sha256"] == entry["tokens_sha256"]


def _flip_token_byte(path: Path, token: int) -> None:
    data = bytearray(path.read_bytes())
    data[1024 + 2 * token + 1] ^= 0x01  # the high byte: the id moves by 256, header and size stay intact
    path.write_bytes(data)


def test_verify_passes_intact_data_and_names_every_damaged_shard(prepared_data: Path, plain_data: Path,
                                                                tmp_path: Path) -> None:
    proc = run_prepare("--verify", prepared_data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all intact" in proc.stdout and proc.stderr == ""

    data = Path(shutil.copytree(plain_data, tmp_path / "plain"))
    names = [e["file"] for e in meta_of(data)["shards"]]
    assert names[:4] == ["val_000000.bin", "train_000000.bin", "train_000001.bin", "train_000002.bin"]
    _flip_token_byte(data / "train_000000.bin", 1000)  # other bytes: both hashes differ
    with open(data / "train_000001.bin", "r+b") as f:  # cut short
        f.truncate(1024 + 2 * 100)
    (data / "val_000000.bin").unlink()
    tokens = np.array(read_shard(data / "train_000002.bin"))
    tokens[4321] = 60000  # beyond gpt2's 50257 ids, recorded in meta.json as if prepared so
    meta = meta_of(data)
    meta["shards"][3].update(write_shard(data / "train_000002.bin", tokens))
    (data / "meta.json").write_text(json.dumps(meta))

    proc = run_prepare("--verify", data)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    problems = [line for line in proc.stdout.splitlines() if str(data) in line and "failed verification" not in line]
    expected = {"train_000000.bin": ["sha256", "tokens_sha256"], "train_000001.bin": ["truncated or corrupt"],
                "val_000000.bin": ["missing"], "train_000002.bin": ["token id 60000 at token offset 4321"]}
    assert len(problems) == sum(map(len, expected.values())), proc.stdout
    for name, fragments in expected.items():
        mine = [line for line in problems if f"{data / name}:" in line]
        assert len(mine) == len(fragments) and all(f in line for f, line in zip(fragments, mine)), (name, mine)
    assert "4 of" in proc.stdout and "failed verification" in proc.stdout

    (data / "meta.json").write_text("{")
    assert "not valid JSON" in one_line_error(run_prepare("--verify", data))
    assert "without --dataset" in one_line_error(run_prepare("--verify", data, "--dataset", "stdlib"))
    assert "no such directory" in one_line_error(run_prepare("--verify", tmp_path / "nowhere"))


def test_verify_checks_the_lz4_frame(prepared_copy: Path) -> None:
    path = prepared_copy / "train_000001.bin.lz4"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    proc = run_prepare("--verify", prepared_copy)
    assert proc.returncode == 1 and f"{path}: truncated or corrupt LZ4 shard" in proc.stdout, proc.stdout
