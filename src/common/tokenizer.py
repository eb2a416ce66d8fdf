"""tiktoken encodings by name, with the offline fallback gpt2 -> r50k_base.

tiktoken's `gpt2` encoding downloads GPT-2's original vocab.bpe/encoder.json, while `r50k_base`
is the same vocabulary (identical token ids, same <|endoftext|> = 50256) stored in tiktoken's
own format. A machine whose tiktoken cache holds only r50k_base can therefore still produce and
read gpt2 data.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import tiktoken
import tiktoken.model

from common.errors import UserError

log = logging.getLogger(__name__)

# Encodings that give the same ids, tried in order when the first cannot be loaded.
_EQUIVALENT = {"gpt2": ("gpt2", "r50k_base")}

_OFFLINE_FIX = (
    "set TIKTOKEN_CACHE_DIR to a directory holding tiktoken's cached vocabulary files, "
    "or run once with network access so tiktoken can download and cache them"
)


def tokenizer_names() -> list[str]:
    """The encoding names tiktoken knows (model names such as `gpt-4o` are accepted too)."""
    return sorted(tiktoken.list_encoding_names())


def _encoding_name(name: str) -> str:
    """Map an encoding or model name to an encoding name, or raise UserError."""
    if name in tiktoken.list_encoding_names():
        return name
    try:
        return tiktoken.model.encoding_name_for_model(name)
    except KeyError:
        raise UserError(
            f"unknown tokenizer {name!r}: use one of {', '.join(tokenizer_names())} "
            "(or an OpenAI model name such as gpt-4o)"
        ) from None


@functools.cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Load a tiktoken encoding by encoding or model name.

    Cached per process, so the network is tried at most once when the vocabulary is absent.
    """
    encoding = _encoding_name(name)
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


def encode_documents(enc: tiktoken.Encoding, texts: list[str]) -> np.ndarray:
    """Tokens of `texts` as one uint16 stream, the end-of-text token before each document.

    Special-token strings inside a document are encoded as ordinary text, so decoding the
    tokens between two end-of-text tokens gives back exactly that document.
    """
    parts: list[np.ndarray] = []
    for text in texts:
        ids = enc.encode_ordinary(text)
        doc = np.empty(len(ids) + 1, dtype=np.uint16)
        doc[0] = enc.eot_token
        doc[1:] = ids  # numpy refuses ids >= 65536 rather than wrapping them
        parts.append(doc)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)


# Worker-pool helpers (module level so that any multiprocessing start method can pickle them).
_worker_encoding: tiktoken.Encoding | None = None


def init_worker(name: str) -> None:
    """Pool initializer: load the encoding once per worker (free under fork: already cached)."""
    global _worker_encoding
    _worker_encoding = get_tokenizer(name)


def encode_in_worker(texts: list[str]) -> np.ndarray:
    assert _worker_encoding is not None, "init_worker() was not run in this process"
    return encode_documents(_worker_encoding, texts)
