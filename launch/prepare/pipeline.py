"""Tokenizing tasks in parallel processes into one token file and its document offsets, in constant memory.

Why processes writing part files: JSON parsing and tokenizing both hold the GIL or a core, so each process takes
whole tasks (`sources.Task`), tokenizes a batch of documents at a time (`BATCH_BYTES`) and appends the ids to its
own part file; the driver takes the results in task order, appends each part to `tokens.bin` and deletes it. No
process holds more than a batch of text and its ids, whatever the size of the source; the document lengths (8
bytes a document) are the only thing that grows.
"""

import multiprocessing
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from launch.prepare.encoders import likely_encoder, make_encoder
from launch.prepare.sources import Task, documents
from launch.prepare.tokenizer import TokenizerSpec
from spec.prepared import OFFSETS_FILE, TOKENS_FILE

BATCH_BYTES = 2**20
"""Text encoded per call of the encoder (`encoders.py`) in one process."""
BATCH_DOCUMENTS = 1024


@dataclass
class TaskResult:
    index: int
    part: str
    lengths: np.ndarray
    size: int
    empty: int


@dataclass
class Tokenized:
    documents: int
    tokens: int
    empty: int
    lengths: np.ndarray
    encoder: str


def default_workers() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tokenize(directory: Path, tasks: List[Task], spec: TokenizerSpec, source: str, text_field: str, workers: int,
             progress, choose: Callable[[TokenizerSpec], TokenizerSpec] = lambda spec: spec) -> Tokenized:
    """Write directory/tokens.bin and directory/offsets.npy from the tasks' documents, in task order. `choose`
    (the driver's choice of encoder, `encoders.choose_encoder`) runs while the tokenizing processes start."""
    parts = directory / "parts"
    parts.mkdir()
    lengths_path = directory / "lengths.tmp"
    empty = 0
    chosen: List[TokenizerSpec] = []
    with open(directory / TOKENS_FILE, "wb") as out, open(lengths_path, "wb") as lengths_out:
        for result in _results(tasks, spec, choose, chosen, (source, text_field, str(parts)), workers):
            with open(result.part, "rb") as part:
                shutil.copyfileobj(part, out, 2**22)
            os.unlink(result.part)
            lengths_out.write(result.lengths.astype(np.int64).tobytes())
            empty += result.empty
            progress(result.size, len(result.lengths))
    parts.rmdir()
    lengths = np.fromfile(lengths_path, dtype=np.int64)
    lengths_path.unlink()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(directory / OFFSETS_FILE, offsets)
    return Tokenized(len(lengths), int(offsets[-1]), empty, lengths, chosen[0].encoder)


def _results(tasks: List[Task], spec: TokenizerSpec, choose, chosen: list, setup: tuple,
             workers: int) -> Iterator[TaskResult]:
    """The tasks' results in order; the chosen spec appended to `chosen` before the first."""
    if workers <= 1 or len(tasks) <= 1:
        chosen.append(choose(spec))
        _start_worker(chosen[0], *setup)
        yield from map(tokenize_task, tasks)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process whose tokenizer threads may be running
    likely = replace(spec, encoder=likely_encoder(spec.path))  # built by each process while the driver checks
    with context.Pool(min(workers, len(tasks)), initializer=_start_guessing, initargs=(likely, *setup)) as pool:
        chosen.append(choose(spec))
        yield from pool.imap(_tokenize_with, [(task, chosen[0].encoder) for task in tasks])


_WORKER: dict = {}


def _start_worker(spec: TokenizerSpec, source: str, text_field: str, parts: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(encoders={}, spec=spec, source=source, field=text_field, parts=parts)


def _start_guessing(likely: TokenizerSpec, source: str, text_field: str, parts: str) -> None:
    """A pool process's start: the likely encoder built while the driver checks; a guess, so a failure only
    leaves the building to the first task (an initializer that raises would make the pool start it again)."""
    _start_worker(likely, source, text_field, parts)
    try:
        _WORKER["encoders"][likely.encoder] = make_encoder(likely)
    except Exception:  # noqa: BLE001 - the task builds what the driver chose, and reports its error
        pass


def _tokenize_with(task_and_encoder: Tuple[Task, str]) -> TaskResult:
    task, encoder = task_and_encoder
    return tokenize_task(task, encoder)


def tokenize_task(task: Task, encoder_name: Optional[str] = None) -> TaskResult:
    """Tokenize one task's documents into its part file with the named encoder (default: the spec's); returns
    their lengths in tokens."""
    spec, encoders = _WORKER["spec"], _WORKER["encoders"]
    name = encoder_name or spec.encoder
    if name not in encoders:
        encoders[name] = make_encoder(replace(spec, encoder=name))
    encoder = encoders[name]
    part = Path(_WORKER["parts"]) / f"{task.index:08d}.bin"
    with open(part, "wb") as handle:
        writer = _PartWriter(handle, spec)
        batch: list = []
        size = 0
        for text, ends in documents(task, _WORKER["source"], _WORKER["field"]):
            batch.append((text, ends))
            size += len(text)
            if size >= BATCH_BYTES or len(batch) >= BATCH_DOCUMENTS:
                writer.add_batch(encoder, batch)
                batch, size = [], 0
        writer.add_batch(encoder, batch)
    return TaskResult(task.index, str(part), np.asarray(writer.lengths, dtype=np.int64), task.size, writer.empty)


class _PartWriter:
    """Frames each document with the tokenizer's prefix and suffix ids and writes them to a part file."""

    def __init__(self, handle, spec: TokenizerSpec):
        self.handle, self.dtype = handle, np.dtype(spec.token_dtype)
        self.prefix = np.asarray(spec.prefix, dtype=self.dtype)
        self.suffix = np.asarray(spec.suffix, dtype=self.dtype)
        self.lengths: List[int] = []
        self.open: Optional[int] = None
        """Tokens so far of a document not yet ended (a text file's pieces); None between documents."""
        self.empty = 0

    def add_batch(self, encoder, batch: list) -> None:
        if not batch:
            return
        encodings = encoder.encode_batch([text for text, _ in batch])
        chunks = []
        for (text, ends), encoded in zip(batch, encodings):
            if self.open is None:
                if not text and ends:
                    self.empty += 1
                    continue
                chunks.append(self.prefix)
                self.open = len(self.prefix)
            ids = encoded.astype(self.dtype, copy=False)
            chunks.append(ids)
            self.open += len(ids)
            if ends:
                chunks.append(self.suffix)
                self.lengths.append(self.open + len(self.suffix))
                self.open = None
        if chunks:
            self.handle.write(np.concatenate(chunks).tobytes())
