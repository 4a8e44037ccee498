"""Packing documents into sequences: which pieces of which documents fill each sequence, and one sequence's tokens,
targets, RoPE positions and document layout.

Why first-fit over a window, in document order: a sequence takes the first of the next `WINDOW` documents that
fits the room it has left, again and again; when none fits, the room left is padding (never a target, attending
only to itself) and the next sequence starts with the oldest waiting document. A document longer than a sequence
is cut into sequence-length pieces (each fills a sequence alone) and a last, shorter piece packed like a document.
So no document that fits a sequence is ever cut (cutting at every boundary, as the token stream does, leaves about
one document per sequence without its beginning), no document waits for long (each sequence opens with the oldest
one not yet placed; one that never fits the room left goes there), and padding stays
small: on log-normal lengths (mean 1/4 to 1/30 of the sequence) about 1% where plain next-fit (only the next
document) pads 13-21% (docs/log.md); `longtrain prepare-data` reports it. The table is made once per sequence
length on the driver (a Python loop, a few microseconds a document) and read by every rank memory-mapped. A piece
continuing a cut document restarts its positions (it never sees the earlier piece) but its last token still
predicts the next piece's first: the same document.

Targets: inside a piece, token i predicts token i + 1; a document's last token predicts nothing (-100), so no
document's first token is ever predicted from the previous document.
"""

import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Tuple

import numpy as np

from spec.errors import ConfigError
from spec.prepared import OFFSETS_FILE, packing_file, packing_sequences_file

IGNORE_INDEX = -100
PAD_TOKEN = 0
START, LENGTH, CONTINUES = 0, 1, 2
"""Columns of the packing table."""
WINDOW = 64
"""Documents (pieces) a sequence may choose from."""

if TYPE_CHECKING:  # torch: `prepare-data` packs on the driver without importing it (2.4 CPU-s)
    from orchestrator.attention import DocumentLayout


def pack(offsets: np.ndarray, seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """The packing table of documents tokens[offsets[i]:offsets[i + 1]]: (pieces [N, 3] int64 of first token,
    length and 1 if the document continues after the piece; sequence starts [M + 1] int64 into the pieces)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    lengths_kept = lengths > 0
    starts, lengths = offsets[:-1][lengths_kept], lengths[lengths_kept]
    per_document = -(-lengths // seq_len)
    document = np.repeat(np.arange(len(lengths)), per_document)
    index = np.arange(len(document)) - np.repeat(np.cumsum(per_document) - per_document, per_document)
    pieces = np.empty((len(document), 3), dtype=np.int64)
    pieces[:, START] = starts[document] + index * seq_len
    pieces[:, LENGTH] = np.minimum(seq_len, lengths[document] - index * seq_len)
    pieces[:, CONTINUES] = index < per_document[document] - 1
    order, firsts = _first_fit_window(pieces[:, LENGTH].tolist(), seq_len)
    return pieces[order], firsts


def _first_fit_window(lengths: List[int], seq_len: int, window: int = WINDOW) -> Tuple[np.ndarray, np.ndarray]:
    """(the pieces in packed order, where each sequence starts in it): see the module docstring."""
    waiting: deque = deque()
    order: List[int] = []
    firsts, room, upcoming = [0], 0, 0
    while upcoming < len(lengths) or waiting:
        while len(waiting) < window and upcoming < len(lengths):
            waiting.append(upcoming)
            upcoming += 1
        for place, piece in enumerate(waiting):
            if lengths[piece] <= room:
                room -= lengths[piece]
                order.append(piece)
                del waiting[place]
                break
        else:  # nothing fits: the sequence is closed, a new one opens
            if order:
                firsts.append(len(order))
            room = seq_len
    if order:
        firsts.append(len(order))
    return np.asarray(order, dtype=np.int64), np.asarray(firsts, dtype=np.int64)


def packing_stats(pieces: np.ndarray, firsts: np.ndarray, seq_len: int) -> dict:
    """Sequences, padding share, and the attention the packed documents need: the share of causal attention's
    FLOPs (sum of piece length^2 over sequences x seq_len^2) and its FLOP-weighted mean length."""
    lengths = pieces[:, LENGTH].astype(np.float64)
    sequences = len(firsts) - 1
    squares = float((lengths ** 2).sum())
    return {"seq_len": seq_len, "sequences": sequences, "pieces": int(len(pieces)),
            "padding_fraction": 1.0 - float(lengths.sum()) / max(sequences * seq_len, 1),
            "attention_share": squares / max(sequences * float(seq_len) ** 2, 1.0),
            "effective_length": squares / max(float(lengths.sum()), 1.0)}


def save_packing(directory: Path, pieces: np.ndarray, firsts: np.ndarray, seq_len: int) -> None:
    """Both arrays of a packing table, each written to a temporary name and renamed (atomic)."""
    for name, array in ((packing_file(seq_len), pieces), (packing_sequences_file(seq_len), firsts)):
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        tmp.replace(directory / name)


def load_packing(directory: Path, seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """The packing table of `seq_len` (memory-mapped), computed and saved first if it is not there."""
    paths = directory / packing_file(seq_len), directory / packing_sequences_file(seq_len)
    if not all(p.is_file() for p in paths):
        offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
        save_packing(directory, *pack(offsets, seq_len), seq_len)
    return np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r")


@dataclass
class PackedSequence:
    """One packed sequence: tokens, targets (-100: not predicted), RoPE positions, its segments' lengths (the
    padding last) and the padding."""

    tokens: np.ndarray
    targets: np.ndarray
    positions: np.ndarray
    lengths: List[int]
    padding: int


class PackedDocuments:
    """Sequences packed from documents (see the module docstring), split into train and holdout sequences like
    `orchestrator.data.TokenWindows` (the holdout is the last sequences)."""

    def __init__(self, stream: np.ndarray, pieces: np.ndarray, firsts: np.ndarray, seq_len: int,
                 holdout_fraction: float, kernel: str = "auto"):
        self.stream, self.pieces, self.firsts = stream, pieces, firsts
        self.seq_len, self.kernel = seq_len, kernel
        total = len(firsts) - 1
        self.num_holdout = int(total * holdout_fraction)
        self.num_train = total - self.num_holdout
        if self.num_train < 1:
            raise ConfigError(f"the documents pack into {total} sequences of data.seq_len ({seq_len}), leaving no "
                              "training sequence after the holdout; use more documents, a shorter data.seq_len or a "
                              "smaller data.holdout_fraction")

    def window(self, index: int, holdout: bool = False) -> PackedSequence:
        sequence = index + (self.num_train if holdout else 0)
        rows = self.pieces[self.firsts[sequence]:self.firsts[sequence + 1]]
        tokens = np.full(self.seq_len, PAD_TOKEN, dtype=np.int64)
        targets = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.empty(self.seq_len, dtype=np.int64)
        lengths, at = [], 0
        for start, length, continues in rows.tolist():
            piece = self.stream[start:start + length + continues]
            tokens[at:at + length] = piece[:length]
            targets[at:at + length - 1 + continues] = piece[1:]
            positions[at:at + length] = np.arange(length)
            lengths.append(length)
            at += length
        padding = self.seq_len - at
        positions[at:] = np.arange(padding)
        return PackedSequence(tokens, targets, positions, lengths + ([padding] if padding else []), padding)

    def layout(self, rows: List[PackedSequence]) -> "DocumentLayout":
        from orchestrator.attention import DocumentLayout

        return DocumentLayout([row.lengths for row in rows], [row.padding for row in rows], self.kernel)


def packed_documents(directory: str, stream: np.ndarray, seq_len: int, holdout_fraction: float,
                     kernel: str) -> PackedDocuments:
    """The packed sequences of a prepared directory (its packing table for `seq_len`)."""
    pieces, firsts = load_packing(Path(directory), seq_len)
    return PackedDocuments(stream, pieces, firsts, seq_len, holdout_fraction, kernel)
