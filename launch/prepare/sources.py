"""Documents from JSONL, Parquet and plain-text files, cut into tasks that tokenizing processes take in parallel.

Why tasks by byte range (JSONL) and row group (Parquet): a process reads only its own part of a file, so any number
of processes share one large file and none holds more than one batch of documents. A JSONL line belongs to the task
its first byte lies in. A plain-text file is one document, read in pieces cut at line starts (`TEXT_PIECE_BYTES`),
so even a huge one needs constant memory (a byte-level BPE tokenizes the pieces as it would the whole; a
SentencePiece-style one may differ by a token at each cut, every 8 MiB). Every bad input is one `ConfigError`
line naming the file (and the line of a JSONL file).
"""

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

from spec.errors import ConfigError

SUFFIXES = {"jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",), "text": None}
"""Files a directory contributes per source (text: every file that is not hidden)."""
CHUNK_BYTES = 32 * 2**20
"""JSONL bytes per task."""
TEXT_PIECE_BYTES = 8 * 2**20
"""A plain-text file is read and tokenized in pieces of about this size, cut where a line starts."""
PARQUET_BATCH_ROWS = 512
WHITESPACE = b" \t\r\n\x0b\x0c"


@dataclass(frozen=True)
class Task:
    """Documents of one file: bytes [start, stop) of a JSONL file, row group `start` of a Parquet file, or a whole
    text file; `size`: its bytes, for the progress bar."""

    index: int
    path: str
    start: int
    stop: int
    size: int


def source_files(source: str, path: str) -> List[Path]:
    """The files data.path names (a file, a glob or a directory), sorted; none, or an empty one, is one line."""
    given = Path(path).expanduser()
    if glob.has_magic(str(given)):
        files = [Path(p) for p in sorted(glob.glob(str(given), recursive=True)) if Path(p).is_file()]
    elif given.is_dir():
        files = sorted(p for p in given.rglob("*") if p.is_file() and _wanted(p, source, given))
    elif given.is_file():
        files = [given]
    else:
        raise ConfigError(f"data.path ({path}) does not exist; point it at a {source} file, a quoted glob or a "
                          "directory")
    if not files:
        kinds = ", ".join(f"*{s}" for s in SUFFIXES[source] or ("",))
        raise ConfigError(f"data.path ({path}) holds no {source} files ({kinds}); check the path or data.source")
    for file in files:
        if file.stat().st_size == 0:
            raise ConfigError(f"{file} is empty (0 bytes); remove it or point data.path at files with documents")
    return files


def _wanted(path: Path, source: str, root: Path) -> bool:
    if any(part.startswith(".") for part in path.relative_to(root).parts):
        return False
    return SUFFIXES[source] is None or path.name.endswith(SUFFIXES[source])


def make_tasks(source: str, files: List[Path]) -> List[Task]:
    tasks: List[Task] = []
    for file in files:
        size = file.stat().st_size
        if source == "jsonl":
            cuts = list(range(0, size, CHUNK_BYTES)) + [size]
            spans = list(zip(cuts, cuts[1:]))
        elif source == "parquet":
            groups = _parquet_file(file).num_row_groups
            spans = [(g, g + 1) for g in range(groups)]
        else:
            spans = [(0, size)]
        for start, stop in spans:
            share = stop - start if source != "parquet" else size // max(len(spans), 1)
            tasks.append(Task(len(tasks), str(file), start, stop, share))
    return tasks


def documents(task: Task, source: str, text_field: str) -> Iterator[Tuple[str, bool]]:
    """(text, ends_document) of the task's documents in order; a text file's pieces end its document only at the
    last one. Empty texts are yielded too (the caller counts and skips them)."""
    if source == "jsonl":
        return ((text, True) for text in _jsonl_texts(task, text_field))
    if source == "parquet":
        return ((text, True) for text in _parquet_texts(task, text_field))
    return _text_pieces(task)


def _jsonl_texts(task: Task, field: str) -> Iterator[str]:
    with open(task.path, "rb") as handle:
        if task.start:
            handle.seek(task.start - 1)
            handle.readline()  # the line that began before this task is the previous task's
        position = handle.tell()
        while position < task.stop:
            line = handle.readline()
            if not line:
                break
            if line.strip():
                yield _text_of(line, field, task.path, position)
            position += len(line)


def _text_of(line: bytes, field: str, path: str, position: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ConfigError(f"{path}:{line_number(path, position)}: malformed JSON ({_first_line(error)}); fix or "
                          "remove the line") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}:{line_number(path, position)}: a JSON {type(record).__name__}, not an object with "
                          f"a {field!r} field; write one JSON object per line")
    if field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise ConfigError(f"{path}:{line_number(path, position)}: no {field!r} field (its fields: {keys}); set "
                          "data.text_field to the field that holds the text")
    text = record[field]
    if not isinstance(text, str):
        raise ConfigError(f"{path}:{line_number(path, position)}: field {field!r} is a {type(text).__name__}, not "
                          "text")
    if b"\\u" in line:  # only a \uXXXX escape can make a lone surrogate (the file's bytes are strict UTF-8)
        _check_no_lone_surrogate(text, field, path, position)
    return text


def _check_no_lone_surrogate(text: str, field: str, path: str, position: int) -> None:
    """A lone \\ud800-\\udfff escape decodes to half of a UTF-16 pair, which is no character: no tokenizer can
    encode it (`tokenizers` raises a TypeError deep inside a batch)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        half = f"\\u{ord(text[error.start]):04x}"
        raise ConfigError(f"{path}:{line_number(path, position)}: field {field!r} holds a lone surrogate ({half}, half "
                          "of a UTF-16 pair: no character); fix the escape or remove the line") from None


def line_number(path: str, position: int) -> int:
    """The 1-based line number of the line starting at byte `position` (counted only when reporting an error)."""
    count, done = 1, 0
    with open(path, "rb") as handle:
        while done < position:
            block = handle.read(min(2**24, position - done))
            if not block:
                break
            count += block.count(b"\n")
            done += len(block)
    return count


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow.ArrowInvalid and friends
        raise ConfigError(f"{path} is not a readable Parquet file ({_first_line(error)})") from None


def _parquet_texts(task: Task, field: str) -> Iterator[str]:
    import pyarrow as pa

    parquet = _parquet_file(Path(task.path))
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise ConfigError(f"{task.path}: no {field!r} column (its columns: {', '.join(schema.names[:8])}); set "
                          "data.text_field to the column that holds the text")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError(f"{task.path}: column {field!r} holds {kind}, not text (string)")
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[task.start], columns=[field]):
        for text in batch.column(0).to_pylist():
            yield text or ""


def _text_pieces(task: Task) -> Iterator[Tuple[str, bool]]:
    with open(task.path, "rb") as handle:
        carry = b""
        while True:
            block = handle.read(TEXT_PIECE_BYTES)
            data = carry + block
            if not block:
                yield _decoded(data, task.path), True
                return
            cut = _line_start_before_end(data)
            carry = data[cut:]
            if cut:
                yield _decoded(data[:cut], task.path), False


def _line_start_before_end(data: bytes) -> int:
    """The last position after a single newline between two non-space bytes ("x\nW": where byte-level
    pre-tokenizers split anyway, so the pieces tokenize as the whole would); 0 if none."""
    at = len(data)
    while True:
        at = data.rfind(b"\n", 0, at)
        if at < 0:
            return 0
        if 0 < at < len(data) - 1 and data[at - 1] not in WHITESPACE and data[at + 1] not in WHITESPACE:
            return at + 1


def _decoded(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start} of a piece: {error.reason}); convert it "
                          "to UTF-8") from None
