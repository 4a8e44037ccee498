"""Where a command will write, checked before it does any work.

Why a probe and not `os.access`: root passes every permission check yet cannot write to a read-only mount or
into /proc, and a path with a file in the middle (`run.root=notes.txt/runs`) fails only at `mkdir`. Each check
walks up to the deepest part of the path that exists, requires it to be a directory, and creates and removes a
temporary directory there, so nothing is left behind.
"""

import os
import tempfile
from pathlib import Path

from spec.errors import ConfigError


def check_writable_dir(path, what: str) -> None:
    """`path` is a directory, or can be created as one, and accepts new files; else one ConfigError line naming
    `what` (the key or flag that gave the path)."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{what} ({path}) is a file, not a directory; choose a directory")
    _probe(target, path, what)


def check_writable_file(path, what: str) -> None:
    """`path` can be written as a file (it may exist; its directory may not yet)."""
    target = Path(path).absolute()
    if target.is_dir():
        raise ConfigError(f"{what} ({path}) is a directory; give a file name")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{what} ({path}) is not writable; choose another file")
    _probe(target.parent, path, what)


def _probe(directory: Path, given, what: str) -> None:
    existing = _deepest_existing(directory)
    if not existing.is_dir():
        raise ConfigError(f"{what} ({given}) cannot be created: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".longtrain-probe-", dir=existing))
    except OSError as error:
        raise ConfigError(f"{what} ({given}) cannot be written: {existing}: {error.strerror or error}; choose "
                          "another place") from error


def _deepest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
