"""Any tokenizer, offline: a byte-level BPE trained by prepare_data.py (a small one, and one above
65,536 ids written as uint32 shards in llm.c's Llama 3 layout), and a SentencePiece model trained
here; each prepared, trained on 2 ranks, stopped, resumed exactly, evaluated (val_accuracy) and
sampled (samples.jsonl). Plus llm.c's own uint32 layout both ways, special tokens, and refusals."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm  # the tokenizers extra, which make setup installs
import torch
from conftest import CORPUS_DOCS, prepare_ok, run_prepare
from runs import (
    SRC,
    TINY_FLAGS,
    kill_tree,
    load_checkpoint,
    read_metrics,
    run,
    run_dirs,
    start,
    step_losses,
    stop_at_step,
    tensorboard_events,
    torchrun_cmd,
    train,
)

from common.data import DatasetIndex, ShardedTrainLoader
from common.shards import read_shard
from common.tokenizer import dataset_tokenizer, tokenizer_files

STEPS = 16
FLAGS = ["--max_steps", str(STEPS), "--eval_freq", "4", "--checkpoint_freq", "1000", "--use_tensorboard",
         "--viz_freq", str(STEPS), "--dropout", "0.1"]
SHARDING = ["--shard_tokens", "50000", "--val_tokens", "20000"]
BIG_VOCAB = 70_000  # above 65,536: uint32 shards


# ----------------------------------------------------------------------------- corpora and datasets


def random_words_document(i: int, words: list[str]) -> str:
    rng = random.Random(5000 + i)
    return "\n".join(" ".join(rng.choices(words, k=rng.randint(8, 20))) for _ in range(150))


@pytest.fixture(scope="module")
def wide_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents over 40,000 seeded pseudo-words: enough distinct pairs for a BPE of BIG_VOCAB merges."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 10))) for _ in range(40_000)]
    directory = tmp_path_factory.mktemp("wide_corpus")
    for i in range(60):
        (directory / f"doc_{i:03d}.txt").write_text(random_words_document(i, words), encoding="utf-8")
    return directory


def train_sentencepiece(corpus: Path, model: Path, vocab_size: int = 1000) -> None:
    """A SentencePiece BPE model of the corpus, lossless: no normalization, whitespace kept, bytes
    for characters outside its pieces."""
    model.parent.mkdir(parents=True, exist_ok=True)
    docs = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    with model.open("wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs), model_writer=f, vocab_size=vocab_size, model_type="bpe",
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            byte_fallback=True, character_coverage=1.0, max_sentence_length=1 << 20, minloglevel=2,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


@pytest.fixture(scope="module")
def datasets(small_corpus_dir: Path, wide_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """name -> (data directory, the corpus it was prepared from)."""
    root = tmp_path_factory.mktemp("tokenized")
    model = root / "sp" / "corpus.model"
    train_sentencepiece(small_corpus_dir, model)
    prepare_ok("--dataset", small_corpus_dir, "--out", root / "bpe", "--train_tokenizer", "bpe", "--vocab_size", "512",
               *SHARDING, "--workers", "1")
    prepare_ok("--dataset", wide_corpus_dir, "--out", root / "bpe_uint32", "--train_tokenizer", "bpe",
               "--vocab_size", str(BIG_VOCAB), *SHARDING, "--compress", "none", "--workers", "2")
    prepare_ok("--dataset", small_corpus_dir, "--out", root / "sentencepiece", "--tokenizer", model, *SHARDING,
               "--workers", "2")
    return {"bpe": (root / "bpe", small_corpus_dir), "bpe_uint32": (root / "bpe_uint32", wide_corpus_dir),
            "sentencepiece": (root / "sentencepiece", small_corpus_dir)}


def meta_of(data_dir: Path) -> dict:
    return json.loads((data_dir / "meta.json").read_text())


def stream(data_dir: Path) -> np.ndarray:
    return np.concatenate([read_shard(data_dir / e["file"]) for e in meta_of(data_dir)["shards"]])


def documents_of(data_dir: Path) -> list[str]:
    """The stream cut at the separator (before every document), each part decoded."""
    tok = dataset_tokenizer(data_dir)
    tokens = stream(data_dir)
    cuts = np.flatnonzero(tokens == tok.eot_token)
    assert cuts.size and cuts[0] == 0, "the stream starts with the separator"
    bounds = [*cuts.tolist(), len(tokens)]
    return [tok.decode(tokens[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------- preparation


@pytest.mark.parametrize("name", ["bpe", "bpe_uint32", "sentencepiece"])
def test_documents_round_trip_through_the_shards(datasets: dict, name: str) -> None:
    data, corpus = datasets[name]
    expected = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    assert documents_of(data) == expected
    if corpus.name.startswith("corpus"):
        assert "A literal <|endoftext|> inside" in expected[3]  # special-token text stays text


def test_meta_records_the_tokenizer_and_its_files(datasets: dict) -> None:
    bpe, sp, big = (datasets[n][0] for n in ("bpe", "sentencepiece", "bpe_uint32"))
    meta = meta_of(bpe)
    assert (meta["tokenizer"], meta["tokenizer_kind"], meta["vocab_size"]) == ("bpe-512", "huggingface", 512)
    assert tokenizer_files(bpe) == [bpe / "tokenizer.json", bpe / "tokenizer_config.json"]
    assert [e["file"] for e in meta["tokenizer_files"]] == ["tokenizer.json", "tokenizer_config.json"]
    assert dataset_tokenizer(bpe).decode([meta["eot_token"]]) == "<|endoftext|>"
    meta = meta_of(sp)
    assert meta["tokenizer_kind"] == "sentencepiece" and meta["tokenizer"].endswith("corpus.model")
    assert tokenizer_files(sp) == [sp / "tokenizer.model"]
    assert (meta["vocab_size"], meta["eot_token"]) == (1000, 1)  # <s>: the model's BOS
    assert meta_of(big)["vocab_size"] == BIG_VOCAB


def test_gpt2_data_keeps_no_tokenizer_files(prepared_data: Path) -> None:
    meta = meta_of(prepared_data)
    assert meta["tokenizer_kind"] == "tiktoken" and meta["tokenizer_files"] == []
    assert tokenizer_files(prepared_data) == []
    assert dataset_tokenizer(prepared_data).eot_token == 50256


def test_sample_ids_a_tokenizer_lacks_are_dropped_when_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's padded vocabulary, or ids a tiktoken encoding leaves unused (cl100k_base has such
    gaps, and cannot be loaded offline: an encoding with a gap stands in), decode to nothing."""
    import tiktoken

    import common.tokenizer as tokenizer_module
    base = tiktoken.get_encoding("r50k_base")
    gapped = tiktoken.Encoding("gapped", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                               special_tokens={"<|endoftext|>": 50300})  # ids 50257..50299 unused
    monkeypatch.setattr(tokenizer_module, "get_tokenizer", lambda name: gapped)
    tok = tokenizer_module.TiktokenTokenizer("gapped")
    hello_world = tok.encode_ordinary("Hello world")
    assert tok.decode([hello_world[0], 50260, *hello_world[1:], 50301, 99_999]) == "Hello world"
    assert (tok.eot_token, tok.separator, tok.n_vocab) == (50300, "<|endoftext|>", 50301)


def test_large_vocabulary_is_written_in_llmc_llama3_layout(datasets: dict) -> None:
    data, _ = datasets["bpe_uint32"]
    top = 0
    for entry in meta_of(data)["shards"]:
        raw = (data / entry["file"]).read_bytes()
        header = np.frombuffer(raw[:1024], dtype="<i4")
        assert (header[0], header[1], header[2]) == (20240801, 7, entry["tokens"])
        assert len(raw) == 1024 + 4 * entry["tokens"]
        top = max(top, int(np.frombuffer(raw[1024:], dtype="<u4").max()))
    assert 65536 <= top < BIG_VOCAB  # ids that need 32 bits are really in the data


# llm.c's Llama 3 shard format, written here after its dev/data/data_common.py (write_datafile with
# model_desc="llama-3") and read after its train_llama3.py (_load_data_shard).
LLMC_MAGIC, LLMC_VERSION = 20240801, 7


def llmc_write_llama3_shard(path: Path, tokens: list[int]) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = LLMC_MAGIC, LLMC_VERSION, len(tokens)
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=np.uint32).tobytes())


def llmc_load_llama3_shard(path: Path) -> np.ndarray:
    with path.open("rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
        assert header[0] == LLMC_MAGIC and header[1] == LLMC_VERSION
        tokens = np.frombuffer(f.read(), dtype=np.uint32)
    assert len(tokens) == header[2]
    return tokens


def test_llmc_uint32_shards_read_as_they_are_and_ours_read_by_llmc(datasets: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    written = {}
    for name, n in (("fineweb_val_000000.bin", 3000), ("fineweb_train_000001.bin", 9000)):
        written[name] = rng.integers(0, 128256, n).tolist()
        llmc_write_llama3_shard(tmp_path / name, written[name])
    index = DatasetIndex.open(tmp_path)  # no meta.json: llm.c's Llama 3 tokenizer is assumed
    assert (index.vocab_size, index.eot_token, index.tokenizer_name) == (128256, 128000, "meta-llama/Meta-Llama-3.1-8B")
    for name, tokens in written.items():
        assert read_shard(tmp_path / name).tolist() == tokens
    with ShardedTrainLoader(tmp_path, block_size=16, micro_batch_size=4, seed=1) as loader:
        x, _ = loader.next_batch()
        assert x.dtype == torch.int64 and int(x.max()) > 65535

    data, _ = datasets["bpe_uint32"]
    for entry in meta_of(data)["shards"]:
        assert np.array_equal(llmc_load_llama3_shard(data / entry["file"]), read_shard(data / entry["file"]))


def test_hugging_face_directory_and_file_give_the_trained_tokenizers_tokens(datasets: dict, tmp_path: Path) -> None:
    bpe, corpus = datasets["bpe"]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_bytes((bpe / name).read_bytes())
    expected = [e["tokens_sha256"] for e in meta_of(bpe)["shards"]]
    for i, spec in enumerate((hf_dir, hf_dir / "tokenizer.json")):
        out = tmp_path / f"out{i}"
        prepare_ok("--dataset", corpus, "--out", out, "--tokenizer", spec, *SHARDING, "--workers", "2")
        assert [e["tokens_sha256"] for e in meta_of(out)["shards"]] == expected
        assert meta_of(out)["tokenizer"] == str(spec)


def test_a_rerun_keeps_the_trained_tokenizer_and_refuses_a_changed_one(small_corpus_dir: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "bpe"
    args = ["--dataset", small_corpus_dir, "--out", out, "--train_tokenizer", "bpe", "--vocab_size", "300",
            *SHARDING, "--workers", "1"]
    prepare_ok(*args)
    trained = (out / "tokenizer.json").stat()
    meta = meta_of(out)
    (out / meta["shards"][-1]["file"]).unlink()  # a shard gone: the rerun has work to do
    proc = prepare_ok(*args)
    assert "training a byte-level BPE" not in proc.stdout
    assert (out / "tokenizer.json").stat().st_mtime_ns == trained.st_mtime_ns and meta_of(out) == meta

    proc = run_prepare(*[a if a != "300" else "400" for a in args])
    assert proc.returncode == 2 and "prepared with --tokenizer bpe-300, not bpe-400" in proc.stderr

    model = tmp_path / "sp" / "m.model"
    train_sentencepiece(small_corpus_dir, model)
    sp_data = tmp_path / "sp_data"
    sp_args = ["--dataset", small_corpus_dir, "--out", sp_data, "--tokenizer", model, *SHARDING]
    prepare_ok(*sp_args)
    before = {p.name: p.read_bytes() for p in sp_data.iterdir()}
    train_sentencepiece(small_corpus_dir, model, vocab_size=900)  # another model under the same name
    (sp_data / "val_000000.bin.lz4").unlink()
    proc = run_prepare(*sp_args)
    assert proc.returncode == 2 and "changed since" in proc.stderr and proc.stderr.count("\n") == 1
    assert {p.name: p.read_bytes() for p in sp_data.iterdir()} == {k: v for k, v in before.items()
                                                                    if k != "val_000000.bin.lz4"}


def test_allow_special_recognises_chatml_tokens_and_nothing_else(tmp_path: Path) -> None:
    corpus = tmp_path / "chat"
    corpus.mkdir()
    turns = [f"<|im_start|>user\nquestion {i}<|im_end|>\n<|im_start|>assistant\nanswer {i} <|endoftext|>"
             "<|im_end|>\n" for i in range(300)]
    (corpus / "chat.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in turns))
    out = tmp_path / "data"
    prepare_ok("--dataset", corpus, "--out", out, "--train_tokenizer", "bpe", "--vocab_size", "400",
               "--allow_special", "<|im_start|>,<|im_end|>", "--val_tokens", "1000", "--workers", "1")
    tok = dataset_tokenizer(out)
    start_id, end_id = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    tokens = stream(out)
    assert np.count_nonzero(tokens == start_id) == np.count_nonzero(tokens == end_id) == 2 * len(turns)
    assert np.count_nonzero(tokens == tok.eot_token) == len(turns)  # the literal <|endoftext|>: text
    assert documents_of(out) == turns


@pytest.mark.parametrize("args, fragment", [
    (["--tokenizer", "no_such_encoding"], "unknown tokenizer 'no_such_encoding'"),
    (["--tokenizer", "./missing/tokenizer.json"], "no such file or directory"),
    (["--tokenizer", "someone/no-such-tokenizer"], "could be downloaded"),
    (["--train_tokenizer", "bpe"], "needs --vocab_size"),
    (["--vocab_size", "1000"], "use it with --train_tokenizer bpe"),
    (["--train_tokenizer", "bpe", "--vocab_size", "100"], "at least the 256 bytes"),
    (["--train_tokenizer", "bpe", "--vocab_size", "1000", "--tokenizer", "gpt2"], "give only one"),
    (["--allow_special", "<|im_start|>"], "--allow_special <|im_start|>: tokenizer gpt2 has no such token"),
])
def test_tokenizer_mistakes_are_one_line(small_corpus_dir: Path, tmp_path: Path, args: list[str],
                                         fragment: str) -> None:
    proc = run_prepare("--dataset", small_corpus_dir, "--out", tmp_path / "out", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert fragment in line, line
    assert not (tmp_path / "out" / "meta.json").exists()


def test_verify_names_a_changed_tokenizer_file(datasets: dict, tmp_path: Path) -> None:
    import shutil
    data = Path(shutil.copytree(datasets["bpe"][0], tmp_path / "copy"))
    assert run_prepare("--verify", data).returncode == 0
    (data / "tokenizer.json").write_text((data / "tokenizer.json").read_text().replace('"<|endoftext|>"', '"<|x|>"'))
    proc = run_prepare("--verify", data)
    assert proc.returncode == 1 and "tokenizer.json: changed since the data was prepared" in proc.stdout


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def references(datasets: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per-step losses of an uninterrupted 2-rank run on each dataset."""
    out = {}
    for name, (data, _) in datasets.items():
        tmp = tmp_path_factory.mktemp(f"ref_{name}")
        train(tmp, data, *FLAGS)
        out[name] = step_losses(tmp / "logs")
        assert sorted(out[name]) == list(range(1, STEPS + 1))
    return out


def sample_rows(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["bpe", "bpe_uint32", "sentencepiece"])
def test_two_ranks_stop_resume_exactly_evaluate_and_sample(datasets: dict, references: dict, tmp_path: Path,
                                                           name: str) -> None:
    data, _ = datasets[name]
    vocab = meta_of(data)["vocab_size"]
    cmd = torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, data), *FLAGS])
    stop_at_step(cmd, tmp_path / "logs", 6)
    stopped = load_checkpoint(tmp_path / "ckpt" / "latest.pt")["step"]
    assert 6 <= stopped < STEPS
    train(tmp_path, data, *FLAGS, "--resume", "latest")

    assert step_losses(tmp_path / "logs") == references[name]  # every step, bit-identical across the stop
    steps, evals = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    assert all(0.0 < r["val_accuracy"] <= 1.0 for r in evals), evals
    samples = sample_rows(tmp_path / "logs")
    assert [r["step"] for r in samples] == [4, 8, 12, 16]  # none lost, none twice
    assert all(r["prompt"] == "def " and r["text"].startswith("def ") and len(r["text"]) > 4 for r in samples)
    assert (tmp_path / "logs" / "plots" / "val_accuracy.png").stat().st_size > 10_000

    ckpt = load_checkpoint(tmp_path / "ckpt" / "final.pt")
    rows = ckpt["model"]["transformer.wte.weight"].shape[0]
    assert ckpt["config"]["vocab_size"] == vocab and rows % 64 == 0 and vocab <= rows < vocab + 64
    if name == "bpe":
        events = tensorboard_events(tmp_path / "logs")
        accuracy = {e.step: e.value for e in events.Scalars("val/accuracy")}
        assert accuracy == pytest.approx({r["step"]: r["val_accuracy"] for r in evals})
        # The Hugging Face export carries the dataset's own tokenizer files beside the weights.
        export = run([sys.executable, str(SRC / "export_checkpoint.py"), str(tmp_path / "ckpt" / "final.pt"),
                      str(tmp_path / "hf"), "--format", "hf"])
        assert export.returncode == 0, export.stderr
        assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()


def test_samples_after_a_crash_are_not_repeated_by_the_resumed_run(datasets: dict, references: dict,
                                                                   tmp_path: Path) -> None:
    """kill -9 after samples were written past the last checkpoint: the resumed run drops them
    and writes each step's sample once."""
    data, _ = datasets["bpe"]
    flags = [*FLAGS, "--eval_freq", "2", "--checkpoint_freq", "8"]
    proc = start(torchrun_cmd("train_improved.py", 2, [*TINY_FLAGS, *run_dirs(tmp_path, data), *flags]))
    samples = tmp_path / "logs" / "samples.jsonl"
    try:
        deadline = time.monotonic() + 180
        while not (samples.exists() and any(json.loads(line)["step"] >= 10 for line in
                                            samples.read_text().splitlines() if line.endswith("}"))):
            assert proc.poll() is None and time.monotonic() < deadline, "no sample at step 10"
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert load_checkpoint(tmp_path / "ckpt" / "latest.pt")["step"] == 8
    assert max(r["step"] for r in sample_rows(tmp_path / "logs")) >= 10  # rows beyond the checkpoint
    train(tmp_path, data, *flags, "--resume", "latest")
    assert [r["step"] for r in sample_rows(tmp_path / "logs")] == list(range(2, STEPS + 1, 2))
    assert step_losses(tmp_path / "logs") == references["bpe"]


def test_a_tokenizer_that_cannot_be_loaded_costs_the_samples_not_the_run(datasets: dict, tmp_path: Path) -> None:
    import shutil
    data = Path(shutil.copytree(datasets["sentencepiece"][0], tmp_path / "data"))
    (data / "tokenizer.model").unlink()
    proc = train(tmp_path, data, "--max_steps", "4", "--eval_freq", "2", nproc=1)
    assert "no text samples in this run" in proc.stderr and "tokenizer.model" in proc.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "logs")[1]] == [2, 4]
    assert sample_rows(tmp_path / "logs") == []


def test_workers_load_the_tokenizer_themselves(small_corpus_dir: Path, datasets: dict, tmp_path: Path) -> None:
    """1 and 2 worker processes make the same shards with a SentencePiece tokenizer."""
    sp = datasets["sentencepiece"][0]
    out = tmp_path / "one"
    prepare_ok("--dataset", small_corpus_dir, "--out", out, "--tokenizer", sp / "tokenizer.model", *SHARDING,
               "--workers", "1")
    assert [e["tokens_sha256"] for e in meta_of(out)["shards"]] == [e["tokens_sha256"] for e in
                                                                    meta_of(sp)["shards"]]
    assert meta_of(out)["documents"] == CORPUS_DOCS
