"""A run's `metrics.jsonl`: written a whole line at a time, read past a cut-off last line.

Why: the driver appends one JSON record per logged step while the run may die at any byte (SIGKILL, a full disk).
Each record is one `os.write` of one whole line on an unbuffered append descriptor; a write that fails or comes
up short is cut back off the file, and a file left with a partial last line (by a kill mid-write) has it cut off
when a resumed run opens it again, so its new lines never glue onto a fragment. Readers (`longtrain profile mfu`,
`read_records` in general) skip a partial last line, and name the line of any other damage.
"""

import errno
import json
import os
from pathlib import Path
from typing import Dict, List

from spec.errors import LongtrainError

TAIL_CHUNK_BYTES = 65536


class MetricsFile:
    """metrics.jsonl opened for appending records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        _cut_partial_tail(self.fd)

    def append(self, record: Dict) -> None:
        """One whole line, or nothing: raises OSError naming the file when the line cannot be written whole."""
        line = (json.dumps(record) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            os.ftruncate(self.fd, size)
            raise OSError(error.errno, error.strerror, str(self.path)) from error

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_records(path: Path) -> List[Dict]:
    """The records of a metrics.jsonl; a cut-off last line is skipped, any other bad line is one LongtrainError."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as error:
        raise LongtrainError(f"{path} cannot be read ({error.strerror or error})") from error
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines):  # no newline after it: a line cut off mid-write
                continue
            raise LongtrainError(f"{path} line {number} is not a JSON record ({error}); the file is damaged: delete "
                                 "that line") from error
        if not isinstance(record, dict):
            raise LongtrainError(f"{path} line {number} is a {type(record).__name__}, not a record; delete that line")
        records.append(record)
    return records


def _cut_partial_tail(fd: int) -> None:
    """Truncate the file after its last newline (a kill mid-write can leave a fragment)."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - TAIL_CHUNK_BYTES)
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
