"""The on-disk format both sides of the data layer share: shard files and meta.json.

prepare_data.py writes it (common.dataset_writer), training reads it (common.data). Nothing here
imports torch.

Shard (llm.c / modded-nanogpt): a header of 256 little-endian int32 ([0] = magic, [1] = version,
[2] = token count) followed by the tokens. Two layouts, both llm.c's own: GPT-2's (magic 20240520,
version 1, uint16 tokens) for vocabularies of up to 65,536 ids, and Llama 3's (magic 20240801,
version 7, uint32 tokens) above that. `NAME.bin.lz4` holds exactly those bytes in one LZ4 frame.
Shards are plain files directly inside the data directory.

meta.json lists every finished shard (file, split, tokens, sha256 of the file as stored,
tokens_sha256 of the tokens alone) and the tokenizer. It is checked field by field when read:
a damaged or hand-edited file ends in one line naming it, never a traceback, and no entry may
name a file outside the data directory (prepare_data.py rewrites missing shards by name).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.frame
import numpy as np

from common.errors import UserError
from common.fsutil import atomic_write_bytes, sha256_file

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = (1 << 31) - 1  # the int32 count in the header
META_NAME = "meta.json"
META_FORMAT_VERSION = 1
TOKENIZER_KINDS = ("tiktoken", "huggingface", "sentencepiece")  # meta.json's tokenizer_kind (tiktoken when absent)
LZ4_SUFFIX = ".lz4"
SPLITS = ("train", "val")



@dataclass(frozen=True)
class ShardLayout:
    """One of llm.c's shard layouts, and what a directory of such shards without meta.json is
    assumed to hold (the tokenizer llm.c's own preparation scripts use for it)."""

    name: str
    magic: int
    version: int
    dtype: np.dtype
    tokenizer: str
    vocab_size: int
    eot_token: int  # the token before every document


GPT2_LAYOUT = ShardLayout("gpt-2", 20240520, 1, np.dtype("<u2"), "gpt2", 50257, 50256)
LLAMA3_LAYOUT = ShardLayout("llama-3", 20240801, 7, np.dtype("<u4"), "meta-llama/Meta-Llama-3.1-8B", 128256, 128000)
LAYOUTS = {layout.magic: layout for layout in (GPT2_LAYOUT, LLAMA3_LAYOUT)}
MAX_VOCAB = 1 << 32  # ids that fit the widest layout


def layout_for_vocab(vocab_size: int) -> ShardLayout:
    """uint16 shards while every id fits (GPT-2's layout, half the bytes), uint32 above 65,536 ids."""
    if vocab_size > MAX_VOCAB:
        raise UserError(f"a vocabulary of {vocab_size:,} ids does not fit the uint32 shard format")
    return GPT2_LAYOUT if vocab_size <= 1 << 16 else LLAMA3_LAYOUT



# ----------------------------------------------------------------------------- names


def is_compressed(path: Path | str) -> bool:
    return str(path).endswith(LZ4_SUFFIX)


_SPLIT_RE = re.compile(r"(?:^|_)(train|val)(?:_|$)")


def split_of(name: str) -> str | None:
    """`train`/`val` for llm.c-style names (fineweb_train_000001.bin, val_000000.bin, ..._val.bin)."""
    stem = name[: -len(LZ4_SUFFIX)] if is_compressed(name) else name
    if not stem.endswith(".bin"):
        return None
    found = _SPLIT_RE.findall(stem[: -len(".bin")])
    return found[-1] if found else None


def shard_like_files(directory: Path) -> list[str]:
    """Names of the shard files in a directory (hidden temporaries excluded), sorted."""
    return sorted(p.name for p in Path(directory).iterdir() if split_of(p.name) and not p.name.startswith("."))


def _is_plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _file_name_problem(root: Path, name: str) -> str | None:
    """Why `name` cannot be a file of the directory `root` (resolved; None when it can): a plain
    name directly inside it that does not link outside it."""
    if not _is_plain_name(name):
        return "is not a plain file name inside the data directory"
    path = os.path.join(root, name)  # a bare name in a resolved directory: only a link can lead elsewhere
    if os.path.islink(path) and root not in Path(path).resolve().parents:
        return f"links to {Path(path).resolve()}, outside {root}"
    return None


def _shard_name_problem(root: Path, name: str) -> str | None:
    """Why `name` cannot be a shard of the directory `root`: shards are files inside it (see
    _file_name_problem) named *.bin or *.bin.lz4."""
    if _is_plain_name(name) and not name.endswith((".bin", ".bin" + LZ4_SUFFIX)):
        return "does not end in .bin or .bin.lz4"
    return _file_name_problem(root, name)


def shard_path(data_dir: Path, name: str) -> Path:
    """`data_dir / name`, refused when the name could read or write outside the directory."""
    problem = _shard_name_problem(Path(data_dir).resolve(), name)
    if problem:
        raise UserError(f"shard {name!r} of {data_dir} {problem}; shards must be files inside the data directory")
    return Path(data_dir) / name


# ----------------------------------------------------------------------------- writing and reading


def shard_bytes(tokens: np.ndarray, layout: ShardLayout = GPT2_LAYOUT) -> bytes:
    """The uncompressed file contents of a shard holding `tokens` in `layout`."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (layout.magic, layout.version, len(tokens))
    return header.tobytes() + np.ascontiguousarray(tokens, dtype=layout.dtype).tobytes()


def tokens_sha256(tokens: np.ndarray) -> str:
    """Hash of the token bytes alone, as a shard stores them (uint16 or uint32 as the array's
    dtype says): the same for the .bin and .bin.lz4 form of a shard."""
    if tokens.dtype not in {layout.dtype for layout in LAYOUTS.values()}:
        raise TypeError(f"tokens as a shard stores them are uint16 or uint32, not {tokens.dtype}")
    return hashlib.sha256(np.ascontiguousarray(tokens).data).hexdigest()


def write_shard(path: Path, tokens: np.ndarray, layout: ShardLayout = GPT2_LAYOUT) -> dict[str, Any]:
    """Write a shard atomically (LZ4 when the name ends in .lz4); its meta.json entry.

    `sha256` is of the file as stored (what `sha256sum` prints), `tokens_sha256` of the tokens.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (int(tokens.max()) > np.iinfo(layout.dtype).max or int(tokens.min()) < 0):
        raise ValueError(f"{path.name}: token ids {int(tokens.min())}..{int(tokens.max())} do not fit the "
                         f"{layout.name} shard format")
    stored = np.ascontiguousarray(tokens, dtype=layout.dtype)
    data = shard_bytes(stored, layout)
    if is_compressed(path):
        data = lz4.frame.compress(data, store_size=True, content_checksum=True)
    atomic_write_bytes(path, data)
    return {"file": path.name, "tokens": int(len(tokens)), "sha256": hashlib.sha256(data).hexdigest(),
            "tokens_sha256": tokens_sha256(stored)}


@dataclass(frozen=True)
class ShardHeader:
    tokens: int
    layout: ShardLayout


def _check_header(path: Path, header: bytes, data_size: int | None) -> ShardHeader:
    """Validate a header (and the uncompressed size when known); the token count and layout."""
    if len(header) < HEADER_BYTES:
        raise UserError(f"{path}: truncated shard ({len(header)} bytes, shorter than the {HEADER_BYTES}-byte "
                        "header); delete it and rerun prepare_data.py")
    magic, version, ntok = (int(v) for v in np.frombuffer(header, dtype="<i4", count=3))
    layout = LAYOUTS.get(magic)
    if layout is None:
        expected_magic = " or ".join(str(m) for m in LAYOUTS)
        raise UserError(f"{path}: not a token shard (magic {magic}, expected {expected_magic}); "
                        "remove it from the data directory")
    if version != layout.version:
        raise UserError(f"{path}: shard format version {version} is not supported for magic {magic}, only "
                        f"version {layout.version} ({layout.name}: {layout.dtype.itemsize * 8}-bit tokens)")
    if ntok < 0:
        raise UserError(f"{path}: corrupt shard header (token count {ntok})")
    expected = HEADER_BYTES + layout.dtype.itemsize * ntok
    if data_size is not None and data_size != expected:
        raise UserError(f"{path}: truncated or corrupt shard: the header says {ntok} tokens ({expected} bytes) "
                        f"but it holds {data_size} bytes; delete it and rerun prepare_data.py")
    return ShardHeader(ntok, layout)


def _corrupt_lz4(path: Path, err: Exception) -> UserError:
    return UserError(f"{path}: truncated or corrupt LZ4 shard ({err}); delete it and rerun prepare_data.py")


def _unreadable(path: Path, err: OSError) -> UserError:
    return UserError(f"{path}: cannot read shard ({err.strerror or err})")


def read_shard_header(path: Path) -> ShardHeader:
    """Token count and layout of a shard after checking its header and size, without reading the tokens.

    For .lz4 the size is checked against the frame's recorded content size; the data itself
    is verified (checksum, length) when the shard is read.
    """
    path = Path(path)
    try:
        if not is_compressed(path):
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
            return _check_header(path, header, path.stat().st_size)
        with open(path, "rb") as f:
            info = lz4.frame.get_frame_info(f.read(32))
        with lz4.frame.open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        return _check_header(path, header, info["content_size"] or None)
    except (RuntimeError, EOFError) as err:  # lz4 reports damage as RuntimeError
        raise _corrupt_lz4(path, err) from None
    except OSError as err:
        raise _unreadable(path, err) from None


def read_shard(path: Path) -> np.ndarray:
    """All tokens of a shard as uint16 or uint32 (its layout's): a read-only memmap for .bin,
    decompressed for .bin.lz4."""
    path = Path(path)
    if not is_compressed(path):
        header = read_shard_header(path)
        if header.tokens == 0:
            return np.empty(0, dtype=header.layout.dtype)
        # A plain ndarray view of the mapping: slicing np.memmap objects costs Python overhead per window.
        return np.memmap(path, dtype=header.layout.dtype, mode="r", offset=HEADER_BYTES,
                         shape=(header.tokens,)).view(np.ndarray)
    try:
        data = lz4.frame.decompress(path.read_bytes())
    except RuntimeError as err:
        raise _corrupt_lz4(path, err) from None
    except OSError as err:
        raise _unreadable(path, err) from None
    header = _check_header(path, data[:HEADER_BYTES], len(data))
    return np.frombuffer(data, dtype=header.layout.dtype, offset=HEADER_BYTES, count=header.tokens)


# ----------------------------------------------------------------------------- content checks


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    tokens: int
    sha256: str | None = None  # of the file as stored
    tokens_sha256: str | None = None

    def windows(self, block_size: int) -> int:
        """Windows of block_size + 1 tokens, stride block_size."""
        return max(0, (self.tokens - 1) // block_size)


def check_token_count(path: Path, ntok: int, listed: ShardInfo) -> None:
    if ntok != listed.tokens:
        raise UserError(f"{path}: holds {ntok} tokens but {META_NAME} says {listed.tokens}; the shard or "
                        f"{META_NAME} was changed after preparation")


def check_file_sha256(path: Path, expected: str | None) -> None:
    """Refuse a shard whose bytes differ from those prepare_data.py recorded (no-op when none were)."""
    if expected is None:
        return
    try:
        actual = sha256_file(path)
    except OSError as err:
        raise _unreadable(path, err) from None
    if actual != expected:
        raise UserError(f"{path}: sha256 {actual[:12]}... differs from the {expected[:12]}... recorded in "
                        f"{META_NAME}, so the file changed after preparation; delete it and rerun prepare_data.py "
                        "with the same flags to rewrite it")


def check_tokens_sha256(path: Path, tokens: np.ndarray, expected: str | None) -> None:
    if expected is not None and tokens_sha256(tokens) != expected:
        raise UserError(f"{path}: tokens_sha256 differs from {META_NAME}: the tokens changed after preparation; "
                        "delete it and rerun prepare_data.py with the same flags to rewrite it")


def check_token_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse a shard holding a token id >= vocab_size (it would index past the embedding)."""
    if tokens.size == 0 or vocab_size > np.iinfo(tokens.dtype).max:
        return
    if int(tokens.max()) < vocab_size:
        return
    offset = int(np.argmax(tokens >= vocab_size))
    raise UserError(f"{path}: token id {int(tokens[offset])} at token offset {offset} is outside the vocabulary "
                    f"of {vocab_size} ids; the shard is damaged or was made with another tokenizer: check the "
                    "directory with `python src/prepare_data.py --verify DIR` and prepare it again")


def verify_shard(path: Path, vocab_size: int | None, listed: ShardInfo | None) -> tuple[int, list[str]]:
    """The tokens a shard holds (0 when unreadable) and every problem it has, each a line naming it:
    header and size (for .lz4 the whole frame and its content checksum), then what meta.json
    recorded (`listed`: token count, sha256 of the file, tokens_sha256), then the id range
    (`vocab_size`, None: the vocabulary llm.c uses with the shard's layout)."""
    if not path.exists():
        return 0, [f"{path}: missing; restore it or rerun prepare_data.py with the same flags to rewrite it"]
    try:
        tokens = read_shard(path)
        if vocab_size is None:
            vocab_size = read_shard_header(path).layout.vocab_size
    except UserError as err:
        return 0, [str(err)]
    checks: list[tuple[Any, ...]] = [(check_token_ids, path, tokens, vocab_size)]
    if listed is not None:
        checks[:0] = [(check_token_count, path, len(tokens), listed), (check_file_sha256, path, listed.sha256),
                      (check_tokens_sha256, path, tokens, listed.tokens_sha256)]
    problems = []
    for check, *args in checks:
        try:
            check(*args)
        except UserError as err:
            problems.append(str(err))
    return len(tokens), problems


# ----------------------------------------------------------------------------- meta.json

_META_FIX = "restore it from a backup, or prepare the data again with prepare_data.py into a new --out"
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonnegative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _sha(value: Any) -> bool:
    return isinstance(value, str) and _SHA_RE.fullmatch(value) is not None


# field -> (check, what it must be). Unknown fields are kept: newer writers may add some.
_META_REQUIRED = {
    "tokenizer": (lambda v: isinstance(v, str) and v != "", "a tokenizer name"),
    "vocab_size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "eot_token": (_nonnegative_int, "a token id"),
    "shards": (lambda v: isinstance(v, list), "a list of shard entries"),
}
_META_OPTIONAL = {
    "complete": (lambda v: isinstance(v, bool), "true or false"),
    "exhausted": (lambda v: isinstance(v, bool), "true or false"),
    "expected_train_tokens": (_nonnegative_int, "a token count"),
    "documents": (_nonnegative_int, "a document count"),
    "max_tokens": (lambda v: v is None or _nonnegative_int(v), "a token count or null"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "source_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "settings": (lambda v: isinstance(v, dict), "an object"),
    "tokenizer_kind": (lambda v: v in TOKENIZER_KINDS, "one of " + ", ".join(TOKENIZER_KINDS)),
    "tokenizer_files": (lambda v: isinstance(v, list), "a list of file entries"),
}
_ENTRY_REQUIRED = {
    "file": (lambda v: isinstance(v, str), "a file name"),
    "split": (lambda v: v in SPLITS, "'train' or 'val'"),
    "tokens": (_nonnegative_int, "a token count >= 0"),
}
_ENTRY_OPTIONAL = {
    "sha256": (_sha, "64 lowercase hex digits"),
    "tokens_sha256": (_sha, "64 lowercase hex digits"),
}
_TOKENIZER_FILE_REQUIRED = {
    "file": (lambda v: isinstance(v, str), "a file name"),
    "sha256": (_sha, "64 lowercase hex digits"),
}


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _field_problems(obj: dict[str, Any], required: dict, optional: dict, where: str) -> str | None:
    for name in required:
        if name not in obj:
            return f"{where}field {name!r} is missing"
    for name, (ok, what) in (required | optional).items():
        if name in obj and not ok(obj[name]):
            shown = repr(obj[name])
            return f"{where}field {name!r} must be {what}, not {shown if len(shown) < 60 else shown[:57] + '...'}"
    return None


def meta_problem(data_dir: Path, meta: Any) -> str | None:
    """What is wrong with a parsed meta.json (None when it can be trusted)."""
    if not isinstance(meta, dict):
        return f"holds {_json_type(meta)}, not an object"
    if meta.get("format_version") != META_FORMAT_VERSION:
        return f"unsupported format_version {meta.get('format_version')!r} (this version reads {META_FORMAT_VERSION})"
    problem = _field_problems(meta, _META_REQUIRED, _META_OPTIONAL, "")
    if problem:
        return problem
    if meta["eot_token"] >= meta["vocab_size"]:
        return f"eot_token {meta['eot_token']} is not below vocab_size {meta['vocab_size']}"
    root = Path(data_dir).resolve()
    seen: set[str] = set()
    for i, entry in enumerate(meta["shards"]):
        if not isinstance(entry, dict):
            return f"shards[{i}] is {_json_type(entry)}, not an object"
        problem = _field_problems(entry, _ENTRY_REQUIRED, _ENTRY_OPTIONAL, f"shards[{i}]: ")
        if problem:
            return problem
        name = entry["file"]
        problem = _shard_name_problem(root, name)
        if problem:
            return f"shards[{i}]: file {name!r} {problem}"
        if name in seen:
            return f"shards[{i}]: file {name!r} is listed twice"
        seen.add(name)
    for i, entry in enumerate(meta.get("tokenizer_files", [])):
        if not isinstance(entry, dict):
            return f"tokenizer_files[{i}] is {_json_type(entry)}, not an object"
        problem = _field_problems(entry, _TOKENIZER_FILE_REQUIRED, {}, f"tokenizer_files[{i}]: ")
        if problem:
            return problem
        problem = _file_name_problem(root, entry["file"])
        if problem:
            return f"tokenizer_files[{i}]: file {entry['file']!r} {problem}"
    return None


def read_meta(data_dir: Path) -> dict[str, Any] | None:
    """meta.json of a data directory, checked field by field; None when there is none."""
    path = Path(data_dir) / META_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); {_META_FIX}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err}); {_META_FIX}") from None
    problem = meta_problem(Path(data_dir), meta)
    if problem:
        raise UserError(f"{path}: {problem}; {_META_FIX}")
    return meta


def write_meta(data_dir: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(Path(data_dir) / META_NAME, (json.dumps(meta, indent=1) + "\n").encode())


def meta_shards(meta: dict[str, Any]) -> list[ShardInfo]:
    """The shard entries of a checked meta.json."""
    return [ShardInfo(e["file"], e["split"], e["tokens"], e.get("sha256"), e.get("tokens_sha256"))
            for e in meta["shards"]]
