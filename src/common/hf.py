"""The bridge to Hugging Face: our GPT <-> `transformers.GPT2LMHeadModel`.

Our GPT is GPT-2's architecture with the same parameter names; three things differ in the
weights: GPT-2's `Conv1D` layers store their weight as (in, out) where nn.Linear has (out, in);
our embedding has padding rows up to a multiple of 64 (dropped on export); and a bias-free model
(`--bias false`) has no bias entries (exported as zeros, which is the same function).

* Export (`write_hf_model`, `write_tokenizer`): config.json and model.safetensors that
  `GPT2LMHeadModel.from_pretrained(DIR)` loads, plus tokenizer files built offline from a tiktoken
  encoding (`AutoTokenizer.from_pretrained(DIR)` gives tiktoken's ids).
* Import (`read_hf_model`, `config_for_init`): a local GPT-2 directory as our GPT, for
  `--init_from` (continued pretraining) and evaluation. A model GPT-2's weights cannot be read as
  ours (another architecture, activation, MLP width, norm epsilon, attention scaling, an untied
  output head) is refused with one line.

`transformers` and `safetensors` are the optional extra `.[hf]`; nothing here contacts the hub
(`local_files_only=True`).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import tiktoken
import torch

from common.errors import UserError
from common.model import GPTConfig, padded_vocab
from common.shards import read_meta
from common.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

HF_EXTRA_HINT = "the Hugging Face bridge needs transformers and safetensors: pip install -e '.[hf]'"
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which our GPT uses
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's GELU, tanh approximation: ours
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_PARTS = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
_EMBEDDINGS = ("transformer.wte.weight", "lm_head.weight")  # tied: one tensor, padded rows in ours
_GPT2_FIELDS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}
# GPT-2's keyword for the shape fields of our config (bias: GPT-2 always has biases).
_SHAPE_FROM_HF = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "vocab_size": "vocab_size",
                  "block_size": "n_positions"}


def transformers_module() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(HF_EXTRA_HINT) from None
    transformers.logging.disable_progress_bar()  # one model per command: its bars say nothing
    return transformers


def hf_names(n_layer: int) -> list[str]:
    """GPT2LMHeadModel's state-dict names; our GPT uses the same ones."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        names += [f"transformer.h.{i}.{part}.{kind}" for part in _BLOCK_PARTS for kind in ("weight", "bias")]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]


def _is_conv1d(name: str) -> bool:
    return name.endswith(_CONV1D_WEIGHTS)


# ----------------------------------------------------------------------------- export

def _check_expressible(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> None:
    """GPT-2 has a place for every weight and every model option (a field GPTConfig gains later,
    e.g. another position encoding, is refused unless it has its default)."""
    odd = [f"{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)
           if f.name not in _GPT2_FIELDS and getattr(cfg, f.name) != f.default]
    extra = sorted(set(state) - set(hf_names(cfg.n_layer)))
    problem = f"the model has {', '.join(odd)}" if odd else \
        f"it has weights GPT-2 has no place for ({', '.join(extra[:3])})" if extra else None
    if problem:
        raise UserError(f"this model cannot be written as a Hugging Face GPT-2: {problem}")


def hf_state_from_gpt(state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our GPT's plain state dict (unwrapped names, checked against its config) as GPT2LMHeadModel's."""
    _check_expressible(state, cfg)
    out: dict[str, torch.Tensor] = {}
    for name in hf_names(cfg.n_layer):
        tensor = state.get(name)
        if tensor is None:  # a bias of a bias-free model: zero is the same function
            tensor = torch.zeros(state[name.rsplit(".", 1)[0] + ".weight"].shape[0])
        elif _is_conv1d(name):
            tensor = tensor.t()
        elif name in _EMBEDDINGS:
            tensor = tensor[: cfg.vocab_size]
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def write_hf_model(dest: Path, state: Mapping[str, torch.Tensor], cfg: GPTConfig, eot_token: int | None) -> None:
    """config.json, generation_config.json and model.safetensors of our GPT into `dest`."""
    transformers = transformers_module()
    hf_state = hf_state_from_gpt(state, cfg)
    config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True,
        bos_token_id=eot_token, eos_token_id=eot_token, architectures=["GPT2LMHeadModel"])
    model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict(hf_state, strict=True)  # every name and shape, or an error
    model.save_pretrained(dest)


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet, as ByteLevel pre-tokenizers expect it: the printable Latin-1
    bytes stand for themselves, the other 68 bytes take the characters from U+0100 on, in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _merge_of(token: bytes, ranks: Mapping[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair a BPE merge joined into `token`: tiktoken's merging replayed on its bytes with the
    merges of lower rank only stops at exactly two parts (None if it does not)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, limit) for a, b in zip(parts, parts[1:])]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= limit:
            return None
        parts[best: best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _tiktoken_as_tokenizers(encoding: Any) -> Any:
    """A `tokenizers` BPE giving the ids of a tiktoken encoding: its vocabulary, one merge per
    multi-byte token in rank order, its split pattern, its special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    special = {encoding.encode_single_token(s): s for s in encoding.special_tokens_set}
    ranks: dict[bytes, int] = {}
    for token_id in range(encoding.n_vocab):
        if token_id not in special:
            ranks[encoding.decode_single_token_bytes(token_id)] = token_id
    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        pair = _merge_of(token, ranks)
        if pair is None:
            raise ValueError(f"token {ranks[token]} is not the merge of two tokens")
        merges.append((text(pair[0]), text(pair[1])))
    vocab = {text(token): token_id for token, token_id in ranks.items()} | {s: i for i, s in special.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(encoding._pat_str), behavior="isolated"),  # tiktoken keeps it private
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special.values()])
    return tokenizer


def write_tokenizer(dest: Path, name: str) -> int:
    """tokenizer.json and tokenizer_config.json for tiktoken encoding `name`, made offline from
    tiktoken's cached vocabulary; returns its end-of-text id."""
    transformers = transformers_module()
    encoding = get_tokenizer(name)
    if not isinstance(encoding, tiktoken.Encoding):
        raise ValueError(f"{name} is not a tiktoken encoding")
    eot = encoding.decode_single_token_bytes(encoding.eot_token).decode()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_tiktoken_as_tokenizers(encoding),
                                                bos_token=eot, eos_token=eot, unk_token=eot)
    fast.save_pretrained(dest)
    return encoding.eot_token


def run_tokenizer_name(config: Mapping[str, Any]) -> str | None:
    """The tokenizer of the dataset a run trained on (its meta.json; llm.c shards without one are
    gpt2), or None when its data directory cannot tell."""
    data_dir = config.get("data_dir")
    if not isinstance(data_dir, str) or not Path(data_dir).is_dir():
        return None
    try:
        meta = read_meta(Path(data_dir))
    except UserError as err:
        log.warning("cannot tell the run's tokenizer: %s", err)
        return None
    return str(meta["tokenizer"]) if meta else "gpt2"


# ----------------------------------------------------------------------------- import

def _hf_config(path: Path) -> Any:
    """The directory's config, if it is a GPT-2 our GPT can be: UserError naming what is not."""
    transformers = transformers_module()
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json there; give a local Hugging Face GPT-2 directory "
                        "(config.json and model.safetensors)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - unknown model type, bad JSON: one line
        raise UserError(f"{path}: config.json cannot be read ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None
    if config.model_type != "gpt2":
        raise UserError(f"{path}: this model is not one this GPT can be: model_type {config.model_type!r} (only "
                        "gpt2 maps onto it)")
    checks = (  # a GPT2Config from here on
        (config.activation_function in TANH_GELUS,
         f"activation_function {config.activation_function!r} (this GPT uses gelu_new)"),
        (config.n_inner in (None, 4 * config.n_embd), f"n_inner {config.n_inner} (this GPT's MLP is 4 x n_embd)"),
        (config.layer_norm_epsilon == LAYER_NORM_EPS,
         f"layer_norm_epsilon {config.layer_norm_epsilon} (this GPT uses {LAYER_NORM_EPS})"),
        (config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx,
         "attention scaled otherwise than by 1/sqrt(head size)"),
        (not config.add_cross_attention, "cross-attention layers"),
        (config.n_embd % config.n_head == 0, f"n_embd {config.n_embd} not divisible by n_head {config.n_head}"),
    )
    problem = next((why for ok, why in checks if not ok), None)
    if problem:
        raise UserError(f"{path}: this model is not one this GPT can be: {problem}")
    return config


def hf_model_shape(path: Path) -> dict[str, Any]:
    """Our config's model fields for the GPT-2 in `path` (block_size: its n_positions)."""
    config = _hf_config(path)
    return {ours: getattr(config, theirs) for ours, theirs in _SHAPE_FROM_HF.items()} | {"bias": True}


def config_for_init(cfg: Any, explicit: set[str]) -> Any:
    """`cfg` with the model shape of its --init_from directory. A shape field set in --config or
    as a flag must agree (block_size may be smaller: the position table is cut)."""
    shape = hf_model_shape(Path(cfg.init_from))
    clash = [k for k, v in shape.items() if k in explicit and getattr(cfg, k) != v
             and not (k == "block_size" and getattr(cfg, k) < v)]
    if clash:
        given = ", ".join(f"{k}={getattr(cfg, k)}" for k in clash)
        theirs = ", ".join(f"{k}={shape[k]}" for k in clash)
        raise UserError(f"--init_from {cfg.init_from} holds a model with {theirs} but {given} was set; leave "
                        f"{', '.join('--' + k for k in clash)} out (the model's shape comes from the directory)")
    keep_block = "block_size" in explicit
    return dataclasses.replace(cfg, **{k: v for k, v in shape.items() if not (k == "block_size" and keep_block)})


def gpt_state_from_hf(hf_state: Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state as our GPT's for `cfg` (bias on, block_size <= n_positions).

    The embedding's padding rows are set to the mean of the real rows: their logit is then the
    mean of the real logits, which the sum of the real probabilities' exponentials bounds (Jensen),
    so the padding ids hold at most P / (V + P) of the probability mass (0.09% for GPT-2's 47) and
    the training loss, taken over the padded vocabulary, starts within log(1 + P/V) of GPT-2's.
    """
    out: dict[str, torch.Tensor] = {}
    for name in hf_names(cfg.n_layer)[:-1]:  # lm_head: the same tensor as wte
        tensor = hf_state[name].detach().to(torch.float32)
        if _is_conv1d(name):
            tensor = tensor.t()
        elif name == "transformer.wpe.weight":
            tensor = tensor[: cfg.block_size]
        elif name == "transformer.wte.weight":
            padding = tensor.mean(dim=0, keepdim=True).expand(padded_vocab(cfg.vocab_size) - tensor.shape[0], -1)
            tensor = torch.cat([tensor, padding])
        out[name] = tensor.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def read_hf_model(path: Path | str, block_size: int | None = None) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The GPT-2 in local directory `path` as our GPTConfig and state dict (float32, CPU)."""
    path = Path(path)
    config = _hf_config(path)
    transformers = transformers_module()
    try:
        model, info = transformers.GPT2LMHeadModel.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                                   output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - no weights file, a truncated one: one line
        raise UserError(f"{path}: the weights cannot be read ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None
    missing = info.get("missing_keys") or info.get("mismatched_keys")
    if missing:
        raise UserError(f"{path}: the weights there lack or misshape {sorted(missing)[0]}")
    hf_state = model.state_dict()
    if not torch.equal(hf_state["lm_head.weight"], hf_state["transformer.wte.weight"]):
        raise UserError(f"{path}: this model is not one this GPT can be: its output head is not tied to the "
                        "token embedding (this GPT ties them)")
    positions = config.n_positions
    if block_size is not None and block_size > positions:
        raise UserError(f"--block_size {block_size} exceeds the {positions} positions of the model in {path}")
    cfg = GPTConfig(block_size=block_size or positions, vocab_size=config.vocab_size, n_layer=config.n_layer,
                    n_head=config.n_head, n_embd=config.n_embd, bias=True)
    return cfg, gpt_state_from_hf(hf_state, cfg)
