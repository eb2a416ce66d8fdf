"""Tokenize a text corpus into llm.c-format shards for training.

    python src/prepare_data.py --dataset stdlib --out data/stdlib
    python src/prepare_data.py --dataset 'corpus/**/*.jsonl' --out data/mine --text_field body
    python src/prepare_data.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT \
        --out data/fineweb --shard_tokens 100000000 --tokenizer meta-llama/Meta-Llama-3.1-8B
    python src/prepare_data.py --dataset stdlib --out data/stdlib_bpe --train_tokenizer bpe --vocab_size 32768
    python src/prepare_data.py --dataset chats.jsonl --out data/chat --tokenizer my_tokenizer_dir \
        --allow_special '<|im_start|>,<|im_end|>'

Documents -> the tokenizer (common.tokenizer: tiktoken, a Hugging Face tokenizer.json, a
SentencePiece model, or a byte-level BPE trained here first) in a worker pool -> one token stream
with the tokenizer's separator before every document -> the first --val_tokens to
val_000000.bin[.lz4]..., the rest to train_000000... (uint16 tokens, uint32 in llm.c's Llama 3
layout above 65,536 ids). Each shard is written under a temporary name and renamed when complete;
meta.json is rewritten after every shard, so a trainer may read the directory while it grows. The
tokenizer's files are copied beside the shards and listed in meta.json.

Run the same command again to continue an interrupted run, or to append shards after the corpus
grew: the stream is tokenized again, the finished shards are checked against it (never rewritten)
and new shards follow them.

    python src/prepare_data.py --verify data/stdlib

checks a prepared directory completely (see `verify`); exit status 0 when every shard is intact.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import logging
import multiprocessing
import os
import signal
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.dataset_writer import DatasetWriter, DirectoryLock, remove_stale_temporaries
from common.errors import RunFailed, UserError, one_line, run_cli
from common.fsutil import sha256_file
from common.shards import (
    MAX_SHARD_TOKENS,
    MAX_VOCAB,
    META_FORMAT_VERSION,
    ShardInfo,
    meta_shards,
    read_meta,
    shard_like_files,
    shard_path,
    verify_shard,
)
from common.tokenizer import (
    HF_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    HUGGINGFACE,
    TokenizerSpec,
    encode_documents,
    encode_in_worker,
    init_worker,
    resolve_tokenizer,
    store_tokenizer_files,
    tokenizer_files,
    train_bpe,
)

log = logging.getLogger("prepare_data")

# Text per worker task: large enough to amortize the task overhead, small enough that little work
# is in flight (and wasted) when --max_tokens stops the run.
CHUNK_CHARS = 1 << 18
CHUNK_DOCS = 256
LOCAL_KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def main() -> int:
    args = parse_args()
    setup_logging()
    if args.verify is not None:
        return verify(Path(args.verify))
    source = open_source(args)
    out = Path(args.out)
    previous = read_meta(out) if out.is_dir() else None
    settings = layout_settings(args, source, previous)
    requested = None if args.train_tokenizer else requested_tokenizer(args)
    tokenizer_name = requested.name if requested else trained_tokenizer_name(args.vocab_size)
    check_same_layout(out, previous, tokenizer_name, source.name, settings)
    if requested is not None:
        requested.load()  # a tokenizer that cannot be loaded, or lacks an --allow_special token: before any write
    lock = open_output(out, previous)

    if is_up_to_date(out, previous, source.fingerprint, args.max_tokens):
        log.info("%s is up to date (%s train tokens); nothing to do", out, f"{previous['expected_train_tokens']:,}")
        return 0
    if requested is None:
        spec, files = train_tokenizer(args, out, previous, source)
    else:
        spec, files = install_tokenizer(requested, out, previous)
    tok = spec.load()
    meta = {
        "format_version": META_FORMAT_VERSION, "tokenizer": spec.name, "tokenizer_kind": spec.kind,
        "tokenizer_files": files, "vocab_size": tok.n_vocab, "eot_token": tok.eot_token, "source": source.name,
        "settings": settings, "source_fingerprint": source.fingerprint, "max_tokens": args.max_tokens,
        "shards": previous["shards"] if previous else [], "complete": False,
    }
    writer = DatasetWriter(out, meta, shard_tokens=settings["shard_tokens"], val_tokens=settings["val_tokens"],
                           compress=settings["compress"] == "lz4", max_tokens=args.max_tokens)
    log.info("tokenizer %s (%s): %s tokens, %r (id %d) before every document, %s shards of %s tokens", spec.name,
             spec.kind, f"{tok.n_vocab:,}", tok.separator, tok.eot_token, writer.layout.name, writer.dtype.name)
    started = time.monotonic()
    try:
        exhausted = write_stream(writer, source, spec, args.workers)
    except KeyboardInterrupt:
        log.info("interrupted: %d shards are finished in %s; run the same command again to continue",
                 len(writer.finished), out)
        return 130
    meta = writer.finish(exhausted)
    lock.release()
    report(meta, out, writer.position, time.monotonic() - started)
    return 0


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line via run_cli instead of usage + error
        raise UserError(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(description="Tokenize text into llm.c-format shards (see the module docstring).",
                epilog="Exit status: 0 done (with --verify: every shard is intact); 1 the run could not finish, "
                       "or --verify found damaged shards (one line each on stdout); 2 a usage or data error, "
                       "such as a missing or malformed meta.json (one line on stderr).")
    p.add_argument("--dataset",
                   help="'stdlib' (this Python's standard library), a local file/directory/glob of .txt, .jsonl, "
                        ".json or .parquet, or a Hugging Face dataset id (required unless --verify)")
    p.add_argument("--out", help="output directory (created; rerun to continue it; required unless --verify)")
    p.add_argument("--verify", metavar="DIR",
                   help="instead of preparing, check every shard of a prepared directory: header, size, the "
                        "sha256 and tokens_sha256 recorded in meta.json, token ids below the vocabulary size")
    p.add_argument("--tokenizer", default=None,
                   help="a tiktoken encoding or model name (default gpt2), a Hugging Face tokenizer (a directory "
                        "holding tokenizer.json, a tokenizer.json, or a hub id), or a SentencePiece .model file")
    p.add_argument("--train_tokenizer", choices=("bpe",), default=None,
                   help="train a byte-level BPE tokenizer of --vocab_size tokens on the source, keep it beside the "
                        "shards (tokenizer.json) and tokenize with it")
    p.add_argument("--vocab_size", type=int, default=None, help="tokens of the tokenizer --train_tokenizer trains")
    p.add_argument("--allow_special", type=_token_list, default=(), metavar="TOKENS",
                   help="special tokens recognised inside documents, comma-separated (e.g. '<|im_start|>,<|im_end|>' "
                        "for ChatML); any other special-token text is encoded as plain text. A trained tokenizer "
                        "gets them as special tokens")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (default 100M)")
    p.add_argument("--val_tokens", type=int, default=None,
                   help="tokens of the validation split (default: about 3%% of the source, at most 10M)")
    p.add_argument("--compress", choices=("lz4", "none"), default="lz4", help="shard compression (default lz4)")
    p.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes (default: all cores)")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (val + train)")
    p.add_argument("--text_field", default="text", help="field holding the text in .jsonl/.json/.parquet/Hub rows")
    p.add_argument("--dataset_config", default=None, help="Hugging Face dataset configuration (e.g. sample-10BT)")
    p.add_argument("--split", default="train", help="Hugging Face dataset split (default train)")
    args = p.parse_args(argv)
    if args.verify is not None and (args.dataset or args.out):
        raise UserError("--verify DIR checks a prepared directory: give it without --dataset and --out")
    if args.train_tokenizer:
        if args.tokenizer is not None:
            raise UserError("--tokenizer names an existing tokenizer and --train_tokenizer trains one: give only one")
        if args.vocab_size is None:
            raise UserError("--train_tokenizer bpe needs --vocab_size N (e.g. 32768)")
        smallest = MIN_TRAINED_VOCAB + len(special_tokens_to_train(args))
        if not smallest <= args.vocab_size <= MAX_VOCAB:
            raise UserError(f"--vocab_size {args.vocab_size}: a byte-level BPE tokenizer holds at least the 256 bytes "
                            f"and its special tokens ({smallest}), at most {MAX_VOCAB:,} ids")
    elif args.vocab_size is not None:
        raise UserError("--vocab_size sets the size of the tokenizer --train_tokenizer trains; use it with "
                        "--train_tokenizer bpe (an existing tokenizer has its own)")
    else:
        args.tokenizer = args.tokenizer or "gpt2"
    if args.verify is None and not (args.dataset and args.out):
        raise UserError("--dataset and --out are required (or --verify DIR to check a prepared directory)")
    for name in ("shard_tokens", "workers", "max_tokens", "val_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, not {value}")
    if args.shard_tokens > MAX_SHARD_TOKENS:
        raise UserError(f"--shard_tokens {args.shard_tokens} exceeds the shard header's limit of {MAX_SHARD_TOKENS}")
    return args


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def setup_logging() -> None:
    # Progress goes to stdout: stderr is kept for the one-line error of a failed run.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def layout_settings(args: argparse.Namespace, source: Source, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The settings that shape the stream; --val_tokens defaults to the existing directory's."""
    val_tokens = args.val_tokens
    if val_tokens is None:
        val_tokens = (previous or {}).get("settings", {}).get("val_tokens") or default_val_tokens(
            source.total_bytes, args.max_tokens)
    if args.max_tokens is not None and args.max_tokens <= val_tokens:
        raise UserError(f"--max_tokens {args.max_tokens} leaves nothing for training after --val_tokens "
                        f"{val_tokens}; raise --max_tokens or lower --val_tokens")
    return {"shard_tokens": args.shard_tokens, "val_tokens": val_tokens, "compress": args.compress,
            "text_field": args.text_field, "dataset_config": args.dataset_config, "split": args.split,
            "allow_special": list(args.allow_special)}


def default_val_tokens(total_bytes: int | None, max_tokens: int | None) -> int:
    """About 3% of the source (bytes / 64: ~500k tokens for stdlib), at most 10M, 1/30 of a --max_tokens cap."""
    estimate = 10_000_000 if total_bytes is None else total_bytes // 64
    if max_tokens is not None:
        estimate = min(estimate, max_tokens // 30)
    return max(1, min(estimate, 10_000_000))


def check_same_layout(out: Path, previous: dict[str, Any] | None, tokenizer: str, source: str,
                      settings: dict[str, Any]) -> None:
    """A rerun into an existing directory must produce the same stream, or shards would mix."""
    if previous is None:
        return
    old = {"tokenizer": previous.get("tokenizer"), "dataset": previous.get("source"), **previous.get("settings", {})}
    new = {"tokenizer": tokenizer, "dataset": source, **settings}
    for key, value in new.items():
        if key in old and old[key] != value:
            shown = [",".join(v) or "(none)" if isinstance(v, list) else v for v in (old[key], value)]
            raise UserError(f"{out} was prepared with --{key} {shown[0]}, not {shown[1]}; rerun with the same flags "
                            "to continue it, or use a new --out directory")


def open_output(out: Path, previous: dict[str, Any] | None) -> DirectoryLock:
    """Create and lock the output directory; refuse a directory holding shards that are not ours."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose a directory path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(out)
        lock.acquire()
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror or err}); choose a writable directory") from None
    if previous is None and shard_like_files(out):
        lock.release()
        raise UserError(f"{out} already holds shards but no meta.json; use an empty directory for --out")
    remove_stale_temporaries(out)
    return lock


def is_up_to_date(out: Path, previous: dict[str, Any] | None, fingerprint: str, max_tokens: int | None) -> bool:
    """A complete directory of the unchanged source (or one already past --max_tokens) needs no work."""
    if not previous or not previous.get("complete"):
        return False
    if any(not (out / e["file"]).exists() for e in previous["shards"]):
        return False  # rewrite what went missing
    if max_tokens is not None and sum(e["tokens"] for e in previous["shards"]) >= max_tokens:
        return True
    same_source = previous.get("source_fingerprint") == fingerprint
    return same_source and (previous.get("exhausted") or previous.get("max_tokens") == max_tokens)


# ----------------------------------------------------------------------------- the tokenizer


MIN_TRAINED_VOCAB = 256  # a byte-level BPE starts from the 256 byte tokens
TRAINED_EOT = "<|endoftext|>"


def _token_list(value: str) -> tuple[str, ...]:
    tokens = tuple(t for t in (part.strip() for part in value.split(",")) if t)
    if not tokens:
        raise argparse.ArgumentTypeError("name at least one token, e.g. '<|im_start|>,<|im_end|>'")
    return tokens


def special_tokens_to_train(args: argparse.Namespace) -> list[str]:
    """The special tokens a trained tokenizer gets: its end-of-text token, then --allow_special's."""
    return list(dict.fromkeys([TRAINED_EOT, *args.allow_special]))


def trained_tokenizer_name(vocab_size: int) -> str:
    return f"bpe-{vocab_size}"


def requested_tokenizer(args: argparse.Namespace) -> TokenizerSpec:
    """--tokenizer (found, not loaded yet) with the --allow_special tokens."""
    return dataclasses.replace(resolve_tokenizer(args.tokenizer), allow_special=tuple(args.allow_special))


def train_tokenizer(args: argparse.Namespace, out: Path, previous: dict[str, Any] | None,
                    source: Source) -> tuple[TokenizerSpec, list[dict[str, str]]]:
    """--train_tokenizer: train on the source and keep the tokenizer in `out`; a rerun that
    continues the directory uses the tokenizer trained the first time."""
    spec = TokenizerSpec.with_files(HUGGINGFACE, trained_tokenizer_name(args.vocab_size),
                                    {name: out / name for name in (HF_TOKENIZER_FILE, HF_CONFIG_FILE)},
                                    tuple(args.allow_special))
    if previous is not None:
        return spec, _kept_tokenizer_files(out, previous)
    log.info("training a byte-level BPE tokenizer of %s tokens on %s", f"{args.vocab_size:,}", source.name)
    started = time.monotonic()
    progress = Progress(source.total_bytes, count_name="docs", unit="chars", bar=False)  # tokenizers draws its own
    try:
        train_bpe(_counted(source.documents(), progress), args.vocab_size, special_tokens_to_train(args), out,
                  show_progress=sys.stderr.isatty())
    finally:
        progress.close()
    spec, files = store_tokenizer_files(spec, out)
    trained = spec.load().n_vocab
    log.info("trained the tokenizer in %.1fs: %s tokens%s, saved as %s", time.monotonic() - started, f"{trained:,}",
             " (the corpus offers no more merges)" if trained < args.vocab_size else "", out / HF_TOKENIZER_FILE)
    return spec, files


def _counted(documents: Iterator[str], progress: Progress) -> Iterator[str]:
    chars = count = 0
    for doc in documents:
        chars, count = chars + len(doc), count + 1
        progress.update(chars, count)
        yield doc


def install_tokenizer(spec: TokenizerSpec, out: Path,
                      previous: dict[str, Any] | None) -> tuple[TokenizerSpec, list[dict[str, str]]]:
    """Keep a copy of the tokenizer's files in `out`; refuse, on a rerun, files that changed since."""
    if previous is not None:
        kept = {e["file"]: e["sha256"] for e in _kept_tokenizer_files(out, previous)}
        if kept != {stored: sha256_file(Path(path)) for stored, path in spec.files}:
            raise UserError(f"--tokenizer {spec.name} changed since {out} was prepared with it (its files differ "
                            f"from the copies in {out}); prepare into a new --out, or restore the tokenizer")
    return store_tokenizer_files(spec, out)


def _kept_tokenizer_files(out: Path, previous: dict[str, Any]) -> list[dict[str, str]]:
    tokenizer_files(out)  # each checked against its sha256
    return list(previous.get("tokenizer_files", []))


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    name: str  # recorded in meta.json
    fingerprint: str  # changes when the corpus does
    total_bytes: int | None  # for the ETA and the default validation size
    documents: Callable[[], Iterator[str]]


def open_source(args: argparse.Namespace) -> Source:
    if args.dataset == "stdlib":
        return stdlib_source()
    files = local_files(args.dataset)
    if files is not None:
        return local_source(args.dataset, files, args.text_field)
    return hub_source(args.dataset, args.dataset_config, args.split, args.text_field)


def stdlib_files() -> list[Path]:
    """This interpreter's standard-library .py files (no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text_file(path: Path) -> str:
    """A file as text; undecodable bytes (a few stdlib test files on purpose) become U+FFFD."""
    return path.read_bytes().decode("utf-8", errors="replace")


def stdlib_source() -> Source:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    sizes = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]

    def documents() -> Iterator[str]:
        for path in files:
            text = read_text_file(path)
            if text:  # empty __init__.py files are not documents
                yield text

    return Source("stdlib", _digest(sys.version, sizes), sum(s for _, s in sizes), documents)


def local_files(spec: str) -> list[Path] | None:
    """The files a local --dataset names, None when it is not a local path (a Hub id then)."""
    expanded = os.path.expanduser(spec)
    if glob.has_magic(expanded):
        files = [Path(f) for f in glob.glob(expanded, recursive=True) if Path(f).is_file()]
    elif os.path.isdir(expanded):
        root = Path(expanded)
        files = [p for p in root.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    elif os.path.isfile(expanded):
        if Path(expanded).suffix not in LOCAL_KINDS:
            raise UserError(f"--dataset {spec}: unsupported file type; use {', '.join(LOCAL_KINDS)}")
        return [Path(expanded)]
    elif spec.startswith((".", "/", "~")) or Path(spec).suffix in LOCAL_KINDS:
        raise UserError(f"--dataset {spec}: no such file or directory")
    else:
        return None
    files = sorted((p for p in files if p.suffix in LOCAL_KINDS), key=lambda p: p.as_posix())
    if not files:
        raise UserError(f"--dataset {spec}: no {', '.join(LOCAL_KINDS)} files found")
    return files


def local_source(spec: str, files: list[Path], text_field: str) -> Source:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    name = os.path.abspath(os.path.expanduser(spec))

    def documents() -> Iterator[str]:
        # One load_dataset call per run of files of the same kind keeps the sorted file order.
        group: list[Path] = []
        for path in [*files, None]:
            if group and (path is None or LOCAL_KINDS[path.suffix] != LOCAL_KINDS[group[0].suffix]):
                yield from _local_documents(spec, group, text_field)
                group = []
            if path is not None:
                group.append(path)

    return Source(name, _digest(stats), sum(s for _, s, _ in stats), documents)


def _local_documents(spec: str, files: list[Path], text_field: str) -> Iterator[str]:
    kind = LOCAL_KINDS[files[0].suffix]
    options = {"sample_by": "document"} if kind == "text" else {}  # one .txt file = one document
    field = "text" if kind == "text" else text_field
    try:
        rows = _datasets().load_dataset(kind, data_files=[str(p) for p in files], split="train", streaming=True,
                                        **options)
        yield from _texts(rows, field, spec)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - malformed input files surface as many exception types
        raise UserError(f"cannot read --dataset {spec}: {one_line(err)}") from None


def hub_source(name: str, config: str | None, split: str, text_field: str) -> Source:
    try:
        rows = _datasets().load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 - hub, network and config errors alike
        raise UserError(f"--dataset {name!r} is neither stdlib, a local path, nor a loadable Hugging Face "
                        f"dataset ({one_line(err)}); check the name, --dataset_config and the network") from None
    size = getattr(getattr(rows, "info", None), "dataset_size", None)

    def documents() -> Iterator[str]:
        try:
            yield from _texts(rows, text_field, name)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a dropped connection mid-stream
            raise RunFailed(f"reading {name} failed ({one_line(err)}); run the same command again to "
                            "continue") from None

    return Source(name, _digest("hub", name, config, split), size, documents)


def _texts(rows: Iterable[dict[str, Any]], field: str, spec: str) -> Iterator[str]:
    for row in rows:
        if field not in row:
            raise UserError(f"--dataset {spec}: records have no field {field!r} (fields: {', '.join(row)}); "
                            "pass --text_field")
        text = row[field]
        if isinstance(text, str) and text:
            yield text


def _datasets() -> Any:
    """Import `datasets` (slow, so only for non-stdlib sources) with its bars and warnings off."""
    # Otherwise streaming datasets import torch (seconds) to share an epoch counter we never use.
    os.environ.setdefault("USE_TORCH", "0")
    for name in ("datasets", "huggingface_hub"):  # before the import: it already logs
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    datasets.disable_progress_bars()
    return datasets


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- tokenizing


def write_stream(writer: DatasetWriter, source: Source, spec: TokenizerSpec, workers: int) -> bool:
    """Feed the source's tokens to the writer; True if the source was read to its end."""
    # concurrent.futures rather than multiprocessing.Pool: Pool.terminate() can deadlock when a
    # worker is stopped while it holds the task queue's lock (seen here when --max_tokens ends
    # the run early). Spawned workers: the parent already runs threads (tqdm, datasets).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_pool_worker, initargs=(spec, writer.dtype)) if workers > 1 else None
    progress = Progress(total=writer.max_tokens)
    stream = tokenize(source.documents(), spec, writer.dtype, pool, workers)
    seen_chars = 0
    try:
        for tokens, chars in stream:
            seen_chars += chars
            if source.total_bytes and seen_chars:  # refine the size estimate as the stream goes
                writer.estimated_tokens = int(writer.position * source.total_bytes / seen_chars)
                progress.total = writer.max_tokens or writer.estimated_tokens
            full = writer.add(tokens)
            progress.update(writer.position, writer.documents)
            if full:
                return False
        return True
    finally:
        stream.close()
        progress.close()
        if pool is not None:
            # Queued chunks are dropped; the few running ones finish in a fraction of a second.
            pool.shutdown(wait=True, cancel_futures=True)


def tokenize(documents: Iterator[str], spec: TokenizerSpec, dtype: np.dtype, pool: Any,
             workers: int) -> Iterator[tuple[np.ndarray, int]]:
    """(tokens, characters) per chunk of documents, in document order whatever the worker count."""
    chunks = chunked(documents)
    if pool is None:
        tok = spec.load()
        for chunk in chunks:
            yield encode_documents(tok, chunk, dtype), sum(map(len, chunk))
        return
    # A bounded window of tasks in flight: ordered results without reading the whole corpus ahead.
    pending: deque = deque()
    for chunk in chunks:
        pending.append((pool.submit(encode_in_worker, chunk), sum(map(len, chunk))))
        if len(pending) >= 2 * workers:
            result, chars = pending.popleft()
            yield result.result(), chars
    while pending:
        result, chars = pending.popleft()
        yield result.result(), chars


def _init_pool_worker(spec: TokenizerSpec, dtype: np.dtype) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is handled once, by the parent
    init_worker(spec, dtype)


def chunked(documents: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- verify


def verify(data_dir: Path) -> int:
    """Check every shard of a directory completely (common.shards.verify_shard); a line per problem.

    0 when all are intact, 1 when any is not. The tokenizer files kept beside the shards are
    checked against their sha256 too. A directory without meta.json (llm.c shards) is checked for
    what its files alone can show, against the vocabulary of each shard's layout.
    """
    if not data_dir.is_dir():
        raise UserError(f"--verify {data_dir}: no such directory")
    meta = read_meta(data_dir)
    vocab_size: int | None = None
    if meta is not None:
        shards: list[tuple[str, ShardInfo | None]] = [(s.file, s) for s in meta_shards(meta)]
        vocab_size, total = meta["vocab_size"], sum(e["tokens"] for e in meta["shards"])
        try:
            tokenizer_files(data_dir)
        except UserError as err:
            log.error("%s", err)
            return 1
    else:
        shards = [(name, None) for name in shard_like_files(data_dir)]
        total = None
    if not shards:
        raise UserError(f"--verify {data_dir}: no shards to check (no meta.json entries, no *_train_*.bin files)")
    progress = Progress(total, count_name="shards")
    damaged = tokens = 0
    try:
        for done, (name, listed) in enumerate(shards, 1):
            held, problems = verify_shard(shard_path(data_dir, name), vocab_size, listed)
            for problem in problems:
                log.error("%s", problem)
            damaged += bool(problems)
            tokens += held
            progress.update(tokens, done)
    finally:
        progress.close()
    if damaged:
        log.error("%d of %d shards in %s failed verification (lines above): delete them and rerun prepare_data.py "
                  "with the original flags to rewrite them", damaged, len(shards), data_dir)
        return 1
    log.info("verified %d shards (%s tokens) in %s: all intact", len(shards), f"{tokens:,}", data_dir)
    return 0


# ----------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar (tokens, tokens/s, ETA when the size is known) on a terminal, log lines otherwise
    (or always with bar=False, when something else draws a bar). `unit` names what is counted."""

    LOG_EVERY = 10.0  # seconds between plain log lines

    def __init__(self, total: int | None, count_name: str = "docs", unit: str = "tokens", bar: bool = True) -> None:
        self.total = total
        self.count_name = count_name  # what the second number counts
        self.unit = unit
        self.start = time.monotonic()
        self.last_log = self.start
        self.tokens = 0
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if bar and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.bar = tqdm(total=total, unit=unit[:3], unit_scale=True, dynamic_ncols=True, smoothing=0.1)
            self._redirect.enter_context(logging_redirect_tqdm())  # log lines above the bar, not through it

    def update(self, tokens: int, count: int) -> None:
        step, self.tokens = tokens - self.tokens, tokens
        if self.bar is not None:
            if self.total and self.bar.total != self.total:
                self.bar.total = self.total
            self.bar.set_postfix_str(f"{count:,} {self.count_name}", refresh=False)
            self.bar.update(step)
            return
        now = time.monotonic()
        if now - self.last_log >= self.LOG_EVERY:
            self.last_log = now
            rate = tokens / max(now - self.start, 1e-9)
            eta = f", ETA {(self.total - tokens) / rate:.0f}s" if self.total and rate else ""
            log.info("%s %s, %s %s, %s %s/s%s", f"{count:,}", self.count_name, f"{tokens:,}", self.unit,
                     f"{rate:,.0f}", self.unit, eta)

    def close(self) -> None:
        self._redirect.close()
        if self.bar is not None:
            self.bar.close()


def report(meta: dict[str, Any], out: Path, tokens: int, seconds: float) -> None:
    def split(name: str) -> str:
        shards = [e for e in meta["shards"] if e["split"] == name]
        return f"{name} {sum(e['tokens'] for e in shards):,} tokens in {len(shards)} shards"

    log.info("done: %s documents, %s tokens in %.2fs (%s tokens/s): %s, %s -> %s", f"{meta['documents']:,}",
             f"{tokens:,}", seconds, f"{tokens / max(seconds, 1e-9):,.0f}", split("val"), split("train"), out)


if __name__ == "__main__":
    run_cli(main)
