"""What turns a batch of texts into ids in a tokenizing process: `tokenizers` (the reference), or tiktoken built from
the same tokenizer.json where that is exact (`launch/prepare/tiktoken_bpe.py`), several times faster.

Why a second check at run time: the two libraries split with different regex engines (Oniguruma, fancy-regex), and
the tests cannot try every text; so the driver encodes the run's first documents both ways and keeps
`tokenizers` for the whole run, with one printed note, if a single id differs.
"""

from dataclasses import replace
from typing import Iterable, List

import numpy as np

from launch.prepare import tiktoken_bpe
from launch.prepare.sources import Task, documents
from launch.prepare.tokenizer import TokenizerSpec, load_tokenizer

TOKENIZERS, TIKTOKEN = "tokenizers", "tiktoken"
CHECK_BYTES = 2**20
"""Text of the run's first documents encoded both ways before tiktoken is used."""


class TokenizersEncoder:
    def __init__(self, path: str):
        self.tokenizer = load_tokenizer(path)

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        return [np.asarray(e.ids) for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


class TiktokenEncoder:
    """tiktoken's Encoding, added tokens matched anywhere in the text as `tokenizers` matches them; a text that is
    not valid UTF-8 (a lone surrogate from JSON) goes to `tokenizers`, which refuses it as before."""

    def __init__(self, path: str):
        self.encoding = tiktoken_bpe.encoding(path)
        self.path = path

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        try:
            return [self.encoding.encode_to_numpy(text, allowed_special="all") for text in texts]
        except UnicodeEncodeError:
            return TokenizersEncoder(self.path).encode_batch(texts)


def make_encoder(spec: TokenizerSpec):
    return TiktokenEncoder(spec.path) if spec.encoder == TIKTOKEN else TokenizersEncoder(spec.path)


def likely_encoder(path: str) -> str:
    """tiktoken when the tokenizer has its shape (the merges and the first documents not yet checked), else
    `tokenizers`: what a tokenizing process builds while the driver checks."""
    return TIKTOKEN if not tiktoken_bpe.shape_problem(tiktoken_bpe.read_json(path)) else TOKENIZERS


def choose_encoder(spec: TokenizerSpec, tasks: List[Task], source: str, text_field: str) -> TokenizerSpec:
    """The spec with tiktoken when it is exact for this tokenizer and gives the same ids on the first documents
    (up to CHECK_BYTES of text); else with `tokenizers`, printing one note when the first documents differ."""
    if tiktoken_bpe.exactness_problem(spec.path):
        return replace(spec, encoder=TOKENIZERS)
    texts = _first_texts(tasks, source, text_field)
    fast = TiktokenEncoder(spec.path).encode_batch(texts)
    reference = TokenizersEncoder(spec.path).encode_batch(texts)
    for index, (ours, theirs) in enumerate(zip(fast, reference)):
        if not np.array_equal(ours, theirs):
            print(f"note: tiktoken and tokenizers differ on document {index + 1} of the first {len(texts)} "
                  f"({spec.path}); tokenizing with tokenizers (slower, the reference)", flush=True)
            return replace(spec, encoder=TOKENIZERS)
    return replace(spec, encoder=TIKTOKEN)


def _first_texts(tasks: Iterable[Task], source: str, text_field: str) -> List[str]:
    texts: List[str] = []
    size = 0
    for task in tasks:
        for text, _ in documents(task, source, text_field):
            texts.append(text[:CHECK_BYTES - size])  # a text file's piece is 8 MiB
            size += len(texts[-1])
            if size >= CHECK_BYTES:
                return texts
    return texts
