"""Token sources and a deterministic, resumable, per-rank batch sampler.

Why this shape: a long-context job packs a token stream into fixed windows of seq_len + 1 tokens (inputs and
shifted targets). Which window a rank reads at a given micro-batch is a pure function of (seed, epoch, counter),
so the only state a checkpoint must keep is one counter, and every rank can recompute its position after a
restart or on a different world size. Documents (jsonl, parquet, text) are read from their prepared directory
(`spec.prepared`): as one stream (data.packing=stream) or packed whole (`orchestrator.documents`), in which case a
batch also carries per-row RoPE positions and the document layout its attention is masked by.
"""

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from orchestrator.attention import DocumentLayout
from orchestrator.documents import packed_documents
from spec.config import DataConfig
from spec.config.schema import TEXT_SOURCES
from spec.errors import ConfigError
from spec.prepared import TOKENS_FILE, read_summary

CORPUS_PATH = Path(__file__).resolve().parent / "corpus" / "kjv_genesis_proverbs.txt.gz"
SYNTHETIC_WINDOWS = 2**31


class TokenWindows:
    """Fixed windows of `seq_len + 1` tokens over a token stream, split into train and holdout parts."""

    def __init__(self, stream: np.ndarray, seq_len: int, holdout_fraction: float):
        self.stream = stream
        self.seq_len = seq_len
        total = (len(stream) - 1) // seq_len
        self.num_holdout = int(total * holdout_fraction)
        self.num_train = total - self.num_holdout
        if self.num_train < 1:
            raise ConfigError(f"data.seq_len ({seq_len}) leaves no training window in a stream of "
                              f"{len(stream)} tokens; use a shorter data.seq_len or more data")

    def window(self, index: int, holdout: bool = False) -> np.ndarray:
        start = (index + (self.num_train if holdout else 0)) * self.seq_len
        return np.asarray(self.stream[start:start + self.seq_len + 1], dtype=np.int64)


class SyntheticWindows:
    """Uniform random tokens; window i is drawn from its own seeded generator, so any window is O(seq_len)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.num_train, self.num_holdout = SYNTHETIC_WINDOWS, 1024

    def window(self, index: int, holdout: bool = False) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(holdout), index])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)


def build_windows(config: DataConfig, vocab_size: int, seed: int):
    """The token windows the job config names."""
    if config.source == "synthetic":
        return SyntheticWindows(vocab_size, config.seq_len, seed)
    if config.source in TEXT_SOURCES:
        return prepared_windows(config, vocab_size)
    stream = corpus_bytes() if config.source == "corpus" else open_token_file(config.path, config.token_dtype)
    if int(stream.max(initial=0)) >= vocab_size:
        raise ConfigError(f"data.path ({config.path}) holds token id {int(stream.max())} >= model.vocab_size "
                          f"({vocab_size}); raise model.vocab_size or check data.token_dtype")
    return TokenWindows(stream, config.seq_len, config.holdout_fraction)


def prepared_windows(config: DataConfig, vocab_size: int):
    """The sequences of a prepared text source (`data.prepared`, set on the driver): packed documents or windows
    over its token stream."""
    if not config.prepared:
        raise ConfigError(f"data.source={config.source} reads its prepared data, and data.prepared is unset; run "
                          "`longtrain prepare-data CONFIG` (`longtrain train` prepares it itself)")
    summary = read_summary(config.prepared)
    if summary["vocab_size"] > vocab_size:
        raise ConfigError(f"the tokenizer of {config.prepared} has {summary['vocab_size']} ids > model.vocab_size "
                          f"({vocab_size}); raise model.vocab_size or use the model's tokenizer")
    stream = open_token_file(str(Path(config.prepared) / TOKENS_FILE), summary["token_dtype"])
    if config.packs_documents:
        return packed_documents(config.prepared, stream, config.seq_len, config.holdout_fraction,
                                config.document_attention)
    return TokenWindows(stream, config.seq_len, config.holdout_fraction)


def corpus_bytes() -> np.ndarray:
    """The bundled public-domain text (KJV Genesis and Proverbs) as byte tokens 0..255."""
    with gzip.open(CORPUS_PATH, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8)


def open_token_file(path: str, dtype: str) -> np.ndarray:
    """Memory-map a .npy file or a flat binary file of token ids without reading it into memory."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data.path ({path}) does not exist; point it at a .bin or .npy token file")
    if file.suffix == ".npy":
        try:
            return np.load(file, mmap_mode="r")
        except (ValueError, OSError) as error:  # not an .npy header, or an object array (which needs pickle)
            raise ConfigError(f"data.path ({path}) is not a readable .npy array ({' '.join(str(error).split())}); "
                              "save the tokens with numpy.save, or write a flat .bin") from error
    itemsize = np.dtype(dtype).itemsize
    if file.stat().st_size % itemsize:
        raise ConfigError(f"data.path ({path}) has {file.stat().st_size} bytes, not a multiple of "
                          f"{itemsize} for data.token_dtype={dtype}; check the dtype")
    return np.memmap(file, dtype=dtype, mode="r")


@lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, total: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(total)


@dataclass
class Batch:
    """One micro-batch: inputs and targets [B, S] (-100: not predicted); for packed documents also per-row RoPE
    positions [B, S] and the document layout (None: one causal sequence per row, positions 0..S-1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: Optional[torch.Tensor] = None
    documents: Optional[DocumentLayout] = None


@dataclass
class RankSampler:
    """Yields this rank's micro-batches; `state()` / `load_state()` carry the position across restarts.

    Global micro-batch g covers windows [g * world * mb, (g + 1) * world * mb) of a seeded permutation of the
    training windows (a fresh permutation per epoch); rank r takes its mb-wide slice.
    """

    windows: object
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int
    consumed_micro_batches: int = 0

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = self.next_micro_batch()
        return batch.inputs, batch.targets

    def next_micro_batch(self) -> Batch:
        per_step = self.micro_batch_size * self.world_size
        first = self.consumed_micro_batches * per_step + self.rank * self.micro_batch_size
        windows = [self.windows.window(self._window_index(first + i)) for i in range(self.micro_batch_size)]
        self.consumed_micro_batches += 1
        if not isinstance(windows[0], np.ndarray):  # packed documents
            stacked = [torch.from_numpy(np.stack([getattr(w, key) for w in windows]))
                       for key in ("tokens", "targets", "positions")]
            return Batch(*stacked, documents=self.windows.layout(windows))
        batch = torch.from_numpy(np.stack(windows))
        return Batch(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())

    def _window_index(self, position: int) -> int:
        total = self.windows.num_train
        if total >= SYNTHETIC_WINDOWS:
            return position
        epoch, offset = divmod(position, total)
        return int(_epoch_permutation(self.seed, epoch, total)[offset])

    def state(self) -> Dict[str, int]:
        return {"consumed_micro_batches": self.consumed_micro_batches, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size}

    def load_state(self, state: Dict[str, int]) -> None:
        """Continue where a checkpoint stopped; the position is in global sequences, so world size may change."""
        sequences = state["consumed_micro_batches"] * state["world_size"] * state["micro_batch_size"]
        per_step = self.micro_batch_size * self.world_size
        self.consumed_micro_batches = sequences // per_step
