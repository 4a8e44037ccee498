"""The tokenizer of a text source: a Hugging Face `tokenizer.json` through the `tokenizers` library, and the special
tokens each document gets.

BOS/EOS as the tokenizer says: what its post-processor adds around a text (Llama's template adds BOS, GPT-2's
nothing, RoBERTa's both) is found by encoding a probe with and without special tokens; `tokenizer_config.json`
beside it, when it says `add_bos_token` / `add_eos_token`, wins (as `transformers` rebuilds the template from
them). Texts are then encoded without special tokens and each document framed by that prefix and suffix, so a
text file read in pieces gets them once.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from spec.config import DataConfig, ModelConfig
from spec.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
PROBE = "a"


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a tokenizing process needs: the file, the ids framing each document and the vocabulary size."""

    path: str
    config_path: Optional[str]
    vocab_size: int
    prefix: tuple
    suffix: tuple
    prefix_tokens: tuple
    suffix_tokens: tuple
    encoder: str = "tokenizers"
    """What encodes the texts: "tokenizers", or "tiktoken" where the driver found it exact
    (`launch/prepare/encoders.py`)."""

    @property
    def token_dtype(self) -> str:
        return "uint16" if self.vocab_size <= 2**16 else "uint32"


def tokenizer_path(data: DataConfig, model: ModelConfig) -> Path:
    """data.tokenizer (a tokenizer.json or its directory), else model.init_from's directory's tokenizer.json."""
    if data.tokenizer:
        given, key = Path(data.tokenizer).expanduser(), f"data.tokenizer ({data.tokenizer})"
    else:
        given, key = _init_from_dir(model.init_from), f"model.init_from ({model.init_from})"
    path = given / TOKENIZER_FILE if given.is_dir() else given
    if not path.is_file():
        raise ConfigError(f"{key}: no tokenizer at {path}; set data.tokenizer to a Hugging Face tokenizer.json or "
                          "the directory holding it")
    return path


def _init_from_dir(init_from: str) -> Path:
    """The directory of model.init_from (a Hugging Face directory, a .safetensors file, or DeepSpeed's DIR:TAG)."""
    path = Path(init_from).expanduser()
    if not path.exists() and ":" in init_from:
        path = Path(init_from.rpartition(":")[0]).expanduser()
    return path if path.is_dir() else path.parent


def load_spec(data: DataConfig, model: ModelConfig) -> TokenizerSpec:
    """The tokenizer's spec, refused in one line if it cannot load or has more ids than the model's vocabulary."""
    path = tokenizer_path(data, model)
    tokenizer = load_tokenizer(str(path))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size > model.vocab_size:
        raise ConfigError(f"the tokenizer {path} has {vocab_size} ids, more than model.vocab_size "
                          f"({model.vocab_size}); use the model's own tokenizer or raise model.vocab_size")
    config_path = path.parent / CONFIG_FILE
    settings = _read_config(config_path) if config_path.is_file() else {}
    prefix, suffix = _framing(tokenizer, settings)
    return TokenizerSpec(str(path), str(config_path) if config_path.is_file() else None, vocab_size, tuple(prefix),
                         tuple(suffix), tuple(tokenizer.id_to_token(i) for i in prefix),
                         tuple(tokenizer.id_to_token(i) for i in suffix))


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # the Rust side raises plain Exceptions
        raise ConfigError(f"{path} cannot be read by the tokenizers library ({str(error).splitlines()[0]}); pass a "
                          "Hugging Face tokenizer.json") from None


def _read_config(path: Path) -> dict:
    try:
        settings = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); fix or remove it") from None
    return settings if isinstance(settings, dict) else {}


def _framing(tokenizer, settings: dict):
    """(prefix, suffix) ids around each document: the post-processor's, overridden by the config's add_bos_token
    and add_eos_token."""
    plain = tokenizer.encode(PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(PROBE, add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    prefix, suffix = (full[:at], full[at + len(plain):]) if at is not None else ([], [])
    prefix = _override(prefix, _token_id(tokenizer, settings.get("bos_token")), settings.get("add_bos_token"), True)
    suffix = _override(suffix, _token_id(tokenizer, settings.get("eos_token")), settings.get("add_eos_token"), False)
    return prefix, suffix


def _override(ids: List[int], token: Optional[int], wanted, at_start: bool) -> List[int]:
    if token is None or wanted is None:
        return ids
    if not wanted:
        return [i for i in ids if i != token]
    if token in ids:
        return ids
    return [token] + ids if at_start else ids + [token]


def _token_id(tokenizer, token) -> Optional[int]:
    """The id of a tokenizer_config.json token entry (a string or {"content": ...})."""
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None
