"""Tokenizers of three kinds behind one small interface, and the one a dataset was prepared with.

* tiktoken encodings by encoding or model name (`gpt2`, `cl100k_base`, `gpt-4o`), with the offline
  fallback gpt2 -> r50k_base: tiktoken's `gpt2` downloads GPT-2's original vocab.bpe/encoder.json,
  while `r50k_base` is the same vocabulary (identical ids, same <|endoftext|> = 50256) in
  tiktoken's own format, so a cache holding only r50k_base still produces and reads gpt2 data.
* Hugging Face tokenizers (a `tokenizer.json`, through the `tokenizers` library).
* SentencePiece models (a `.model` file, through `sentencepiece`).

The two libraries are the optional `tokenizers` extra (`pip install -e '.[tokenizers]'`).

A prepared data directory keeps copies of its tokenizer's files beside the shards under the names
Hugging Face uses (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model)
and lists them with their sha256 in meta.json, so training (samples), evaluation and export load
exactly the tokenizer the tokens came from, whatever happened to the original files since.

Every document is preceded by the tokenizer's own separator: its BOS token when it declares one
(tokenizer_config.json's `bos_token`, SentencePiece's bos id), else its end-of-text token. Special
token strings inside a document are ordinary text unless named in `allow_special`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
import tiktoken.model

from common.data import DatasetIndex
from common.errors import UserError, one_line
from common.fsutil import atomic_write_bytes, atomic_write_text, sha256_file
from common.shards import TOKENIZER_KINDS, read_meta

log = logging.getLogger(__name__)

TIKTOKEN, HUGGINGFACE, SENTENCEPIECE = TOKENIZER_KINDS

# The names a tokenizer's files have in a data directory (and in a Hugging Face model directory).
HF_TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
SP_MODEL_FILE = "tokenizer.model"
_HF_COMPANIONS = (HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE)

# Separators looked for by name in a tokenizer.json without a tokenizer_config.json: GPT-2's
# end-of-text token (which is its BOS too), then BOS tokens, then end-of-text tokens.
_SEPARATOR_NAMES = ("<|endoftext|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>",
                    "<|end_of_text|>", "</s>", "<eos>")

EXTRA_MISSING = "pip install -e '.[tokenizers]' (or pip install tokenizers sentencepiece)"

# Encodings that give the same ids, tried in order when the first cannot be loaded.
_EQUIVALENT = {"gpt2": ("gpt2", "r50k_base")}

_OFFLINE_FIX = (
    "set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached vocabulary files, "
    "or run once with network access so tiktoken can download and cache them"
)


# ----------------------------------------------------------------------------- tiktoken


def tokenizer_names() -> list[str]:
    """The encoding names tiktoken knows (model names such as `gpt-4o` are accepted too)."""
    return sorted(tiktoken.list_encoding_names())


def tiktoken_encoding_name(name: str) -> str | None:
    """The tiktoken encoding an encoding or OpenAI model name stands for; None when neither."""
    if name in tiktoken.list_encoding_names():
        return name
    try:
        return tiktoken.model.encoding_name_for_model(name)
    except KeyError:
        return None


@functools.cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Load a tiktoken encoding by encoding or model name.

    Cached per process, so the network is tried at most once when the vocabulary is absent.
    """
    encoding = tiktoken_encoding_name(name)
    if encoding is None:
        raise UserError(f"unknown tokenizer {name!r}: use one of {', '.join(tokenizer_names())} (or an OpenAI "
                        "model name such as gpt-4o), a Hugging Face tokenizer directory, tokenizer.json or hub id, "
                        "or a SentencePiece .model file")
    errors: list[str] = []
    for candidate in _EQUIVALENT.get(encoding, (encoding,)):
        try:
            enc = tiktoken.get_encoding(candidate)
        except Exception as err:  # noqa: BLE001 - tiktoken raises requests/OS/value errors offline
            errors.append(f"{candidate}: {type(err).__name__}")
            continue
        if candidate != encoding:
            log.info("tokenizer %s unavailable offline; using %s (identical token ids)", encoding, candidate)
        return enc
    raise UserError(f"cannot load tokenizer {name!r} ({'; '.join(errors)}): {_OFFLINE_FIX}")


# ----------------------------------------------------------------------------- the interface


class Tokenizer(ABC):
    """What the suite needs of a tokenizer. `eot_token` is the separator written before every
    document (named after tiktoken's attribute, which the first version of the suite used)."""

    kind: str
    name: str
    n_vocab: int
    eot_token: int

    def __init__(self, allow_special: Sequence[str]) -> None:
        self.allow_special = tuple(allow_special)
        self._special_ids: dict[str, int] = {}
        for text in self.allow_special:
            token = self.token_id(text)
            if token is None:
                raise UserError(f"--allow_special {text}: tokenizer {self.name} has no such token; name only "
                                "special tokens of this tokenizer (e.g. <|im_start|>,<|im_end|> for ChatML)")
            self._special_ids[text] = token
        self._special_re = (re.compile("|".join(re.escape(t) for t in sorted(self._special_ids, key=len,
                                                                                 reverse=True)))
                            if self._special_ids else None)

    @property
    def separator(self) -> str:
        """The separator token's text."""
        return self.token_text(self.eot_token)

    @abstractmethod
    def token_text(self, token: int) -> str:
        """How one token is spelled (special and control tokens too, which `decode` may drop)."""

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with every special-token string in it encoded as plain text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids the tokenizer does not have (a model's padding rows) are dropped."""

    @abstractmethod
    def token_id(self, text: str) -> int | None:
        """The id of the single token spelled `text` (a special token), None when there is none."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, the `allow_special` tokens recognised, any other special text ordinary."""
        if self._special_re is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids += self.encode_ordinary(text[start:match.start()])
            ids.append(self._special_ids[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])


class TiktokenTokenizer(Tokenizer):
    kind = TIKTOKEN

    def __init__(self, name: str, allow_special: Sequence[str] = ()) -> None:
        self.name = name
        self._enc = get_tokenizer(name)
        self.n_vocab = self._enc.n_vocab
        self.eot_token = self._enc.eot_token
        super().__init__(allow_special)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        known = [i for i in ids if 0 <= i < self.n_vocab]
        try:
            return self._enc.decode(known)
        except KeyError:  # an id inside the range the encoding leaves unused (cl100k_base has some)
            parts = []
            for i in known:
                try:
                    parts.append(self._enc.decode_single_token_bytes(i))
                except KeyError:
                    continue
            return b"".join(parts).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        return self._enc.encode_single_token(text) if text in self._enc.special_tokens_set else None

    def token_text(self, token: int) -> str:
        return self._enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; the separator declared by its tokenizer_config.json, if it has one."""

    kind = HUGGINGFACE

    def __init__(self, name: str, path: Path, config_path: Path | None, allow_special: Sequence[str] = ()) -> None:
        tokenizers = _import_extra("tokenizers")
        self.name = name
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the Rust side reports a bad file as a plain Exception
            raise UserError(f"{path}: not a Hugging Face tokenizer.json ({one_line(err)})") from None
        self._tok.encode_special_tokens = True  # special-token text inside documents stays text
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.eot_token = self._find_separator(config_path, path)
        super().__init__(allow_special)

    def _find_separator(self, config_path: Path | None, path: Path) -> int:
        config = _read_json(config_path) if config_path is not None else {}
        declared = [_config_token(config.get(key)) for key in ("bos_token", "eos_token")]
        for text in [t for t in declared if t] + list(_SEPARATOR_NAMES):
            token = self.token_id(text)
            if token is not None:
                return token
        raise UserError(f"{path}: the tokenizer has no end-of-text or BOS token to put between documents (looked "
                        f"for {', '.join(_SEPARATOR_NAMES)} and the bos_token/eos_token of a {HF_CONFIG_FILE} "
                        f"beside it); declare one as bos_token in {HF_CONFIG_FILE}")

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.n_vocab], skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def token_text(self, token: int) -> str:
        return self._tok.id_to_token(token) or ""


class SentencePieceTokenizer(Tokenizer):
    kind = SENTENCEPIECE

    def __init__(self, name: str, path: Path, allow_special: Sequence[str] = ()) -> None:
        spm = _import_extra("sentencepiece")
        self.name = name
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise UserError(f"{path}: not a SentencePiece model ({one_line(err)})") from None
        self.n_vocab = self._sp.get_piece_size()
        separator = next((i for i in (self._sp.bos_id(), self._sp.eos_id()) if i >= 0), None)
        if separator is None:
            raise UserError(f"{path}: the SentencePiece model has neither a BOS nor an EOS id to put between "
                            "documents; train it with bos_id or eos_id set")
        self.eot_token = separator
        super().__init__(allow_special)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._sp.encode(text)  # control pieces (<s>, </s>) are never matched in text

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.n_vocab])

    def token_id(self, text: str) -> int | None:
        token = self._sp.piece_to_id(text)
        return None if token == self._sp.unk_id() and text != self._sp.id_to_piece(token) else token

    def token_text(self, token: int) -> str:
        return self._sp.id_to_piece(token)


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class TokenizerSpec:
    """How to load a tokenizer, picklable so that worker processes load their own copy: its kind,
    the name recorded in meta.json (tiktoken: the encoding or model name it loads by; otherwise the
    path or hub id the user gave), and its files as (stored name, where it is now) pairs."""

    kind: str
    name: str
    files: tuple[tuple[str, str], ...] = ()
    allow_special: tuple[str, ...] = ()

    @classmethod
    def with_files(cls, kind: str, name: str, files: dict[str, Path],
                   allow_special: tuple[str, ...] = ()) -> TokenizerSpec:
        return cls(kind, name, tuple(sorted((stored, str(path)) for stored, path in files.items())), allow_special)

    def file(self, stored_name: str) -> Path | None:
        return next((Path(path) for name, path in self.files if name == stored_name), None)

    def load(self) -> Tokenizer:
        """The tokenizer (one per process and spec); UserError when it cannot be loaded."""
        return _load(self)


@functools.cache
def _load(spec: TokenizerSpec) -> Tokenizer:
    if spec.kind == TIKTOKEN:
        return TiktokenTokenizer(spec.name, spec.allow_special)
    if spec.kind == HUGGINGFACE:
        return HuggingFaceTokenizer(spec.name, spec.file(HF_TOKENIZER_FILE), spec.file(HF_CONFIG_FILE),
                                    spec.allow_special)
    return SentencePieceTokenizer(spec.name, spec.file(SP_MODEL_FILE), spec.allow_special)


def resolve_tokenizer(value: str) -> TokenizerSpec:
    """Interpret `--tokenizer`: a local Hugging Face directory or tokenizer.json, a SentencePiece
    .model, a tiktoken encoding or model name, or else a Hugging Face hub id (downloaded)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return _directory_spec(path.resolve(), str(path.resolve()))
    if path.is_file():
        path = path.resolve()
        if path.suffix == ".json":
            return TokenizerSpec.with_files(HUGGINGFACE, str(path), {HF_TOKENIZER_FILE: path})
        if path.suffix == ".model":
            return TokenizerSpec.with_files(SENTENCEPIECE, str(path), {SP_MODEL_FILE: path})
        raise UserError(f"--tokenizer {value}: use a tokenizer.json, a SentencePiece .model file or a directory "
                        "holding one")
    if value.startswith((".", "/", "~")) or path.suffix in (".json", ".model"):
        raise UserError(f"--tokenizer {value}: no such file or directory")
    if tiktoken_encoding_name(value) is not None:
        return TokenizerSpec(TIKTOKEN, value)
    if "/" in value:
        return _hub_spec(value)
    get_tokenizer(value)  # raises the one line that lists the valid names
    raise AssertionError("unreachable")


def _directory_spec(directory: Path, name: str) -> TokenizerSpec:
    companions = {stored: directory / stored for stored in _HF_COMPANIONS if (directory / stored).is_file()}
    for kind, main in ((HUGGINGFACE, HF_TOKENIZER_FILE), (SENTENCEPIECE, SP_MODEL_FILE)):
        if (directory / main).is_file():
            return TokenizerSpec.with_files(kind, name, {main: directory / main, **companions})
    raise UserError(f"--tokenizer {name}: {directory} holds neither {HF_TOKENIZER_FILE} nor {SP_MODEL_FILE}")


def _hub_spec(repo_id: str) -> TokenizerSpec:
    """A tokenizer from the Hugging Face hub: its tokenizer files, fetched into the hub's cache."""
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(repo_id, allow_patterns=[HF_TOKENIZER_FILE, SP_MODEL_FILE, *_HF_COMPANIONS])
    except Exception as err:  # noqa: BLE001 - network, authentication, unknown repository alike
        raise UserError(f"--tokenizer {repo_id}: not a tiktoken name, a local path, nor a Hugging Face tokenizer "
                        f"that could be downloaded ({one_line(err)}); check the name and the network, or pass a "
                        "local directory") from None
    return _directory_spec(Path(local), repo_id)


# ----------------------------------------------------------------------------- training


def train_bpe(documents: Iterable[str], vocab_size: int, special_tokens: Sequence[str], directory: Path,
              show_progress: bool) -> None:
    """Train a byte-level BPE tokenizer (GPT-2's pre-tokenization, any byte encodable) on
    `documents` and write tokenizer.json and tokenizer_config.json into `directory`.

    special_tokens[0] is the end-of-text token, which tokenizer_config.json declares as BOS and EOS.
    """
    tokenizers = _import_extra("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(documents, trainer)
    atomic_write_text(directory / HF_TOKENIZER_FILE, tok.to_str())
    eot = special_tokens[0]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    atomic_write_text(directory / HF_CONFIG_FILE, json.dumps(config, indent=1) + "\n")


# ----------------------------------------------------------------------------- documents -> tokens


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """Tokens of `texts` as one stream of `dtype` (the shard layout's), the separator before each
    document. Decoding the tokens between two separators gives back exactly that document when
    the tokenizer is lossless (byte-level BPE, tiktoken)."""
    parts: list[np.ndarray] = []
    for text in texts:
        ids = tok.encode(text)
        doc = np.empty(len(ids) + 1, dtype=dtype)
        doc[0] = tok.eot_token
        doc[1:] = ids  # numpy refuses ids that do not fit rather than wrapping them
        parts.append(doc)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


# Worker-pool helpers (module level so that any multiprocessing start method can pickle them).
_worker_tokenizer: tuple[Tokenizer, np.dtype] | None = None


def init_worker(spec: TokenizerSpec, dtype: np.dtype) -> None:
    """Pool initializer: load the tokenizer once per worker."""
    global _worker_tokenizer
    _worker_tokenizer = (spec.load(), dtype)


def encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _worker_tokenizer is not None, "init_worker() was not run in this process"
    return encode_documents(_worker_tokenizer[0], texts, _worker_tokenizer[1])


# ----------------------------------------------------------------------------- helpers


def _import_extra(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"this tokenizer needs the {module} package: {EXTRA_MISSING}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({one_line(err)})") from None
    return value if isinstance(value, dict) else {}


def _config_token(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string or an AddedToken object with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------- a dataset's tokenizer


def store_tokenizer_files(spec: TokenizerSpec, data_dir: Path) -> tuple[TokenizerSpec, list[dict[str, str]]]:
    """Copy a tokenizer's files into the data directory (atomically, under their stored names):
    the spec of the copies, and their meta.json entries `{"file", "sha256"}`."""
    data_dir = Path(data_dir)
    entries = []
    for stored, path in spec.files:
        target = data_dir / stored
        if Path(path).resolve() != target.resolve():
            try:
                atomic_write_bytes(target, Path(path).read_bytes())
            except OSError as err:
                raise UserError(f"cannot copy the tokenizer file {path} into {data_dir} ({err.strerror or err})") \
                    from None
        entries.append({"file": stored, "sha256": sha256_file(target)})
    stored_spec = dataclasses.replace(spec, files=tuple((stored, str(data_dir / stored)) for stored, _ in spec.files))
    return stored_spec, entries


def tokenizer_files(data: Path | str | DatasetIndex) -> list[Path]:
    """The tokenizer files a data directory keeps beside its shards (tokenizer.json and its
    companions, or tokenizer.model), each checked against the sha256 meta.json recorded; [] for
    a tiktoken tokenizer (nothing to copy) and a directory of llm.c shards without meta.json.
    What an export copies next to the weights. Reads meta.json only: the shards may be incomplete."""
    if isinstance(data, DatasetIndex):
        data_dir, meta = data.data_dir, data.meta
    else:
        data_dir = Path(data)
        meta = read_meta(data_dir)
    paths = []
    for entry in (meta or {}).get("tokenizer_files", []):
        path = data_dir / entry["file"]
        _check_sha256(path, entry["sha256"])
        paths.append(path)
    return paths


def dataset_tokenizer_spec(data: Path | str | DatasetIndex) -> TokenizerSpec:
    """How to load the tokenizer a data directory's tokens were made with (its files checked)."""
    index = _open_index(data)
    if index.meta is None:  # llm.c shards: the tokenizer llm.c prepares that layout with
        return resolve_tokenizer(index.tokenizer_name)
    files = tuple((path.name, str(path)) for path in tokenizer_files(index))
    allow_special = tuple(index.meta.get("settings", {}).get("allow_special") or ())
    return TokenizerSpec(index.meta.get("tokenizer_kind", TIKTOKEN), index.meta["tokenizer"], files, allow_special)


def dataset_tokenizer(data: Path | str | DatasetIndex) -> Tokenizer:
    """The tokenizer a data directory's tokens were made with, loaded from the files kept beside
    its shards (or by name for tiktoken). UserError when it cannot be loaded (a missing extra,
    tiktoken offline, a changed file) or does not match meta.json's vocabulary and separator."""
    index = _open_index(data)
    tok = dataset_tokenizer_spec(index).load()
    if (tok.n_vocab, tok.eot_token) != (index.vocab_size, index.eot_token):
        raise UserError(f"tokenizer {tok.name} has {tok.n_vocab} tokens and separator {tok.eot_token}, but "
                        f"{index.data_dir} holds tokens of a vocabulary of {index.vocab_size} with separator "
                        f"{index.eot_token}; use the tokenizer the data was prepared with")
    return tok


def _open_index(data: Path | str | DatasetIndex) -> DatasetIndex:
    return data if isinstance(data, DatasetIndex) else DatasetIndex.open(data)


def _check_sha256(path: Path, expected: str) -> None:
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: the tokenizer file the data was prepared with is missing; restore it "
                        "(or prepare the data again)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    if actual != expected:
        raise UserError(f"{path}: changed since the data was prepared (sha256 {actual[:12]}..., meta.json "
                        f"records {expected[:12]}...); restore the original tokenizer file")
