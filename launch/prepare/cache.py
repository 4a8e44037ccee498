"""Where a prepared source lives: one directory per content hash of its files, its tokenizer and how it is read.

Why content and not names or dates: the same documents tokenized the same way are reused whatever they are called,
and a changed file makes a new directory. Hashing gigabytes at every `longtrain train` would cost seconds, so each
file's digest is remembered beside the cache with the size, modification time and inode it was taken at
(`file-hashes.json`), and taken again only when one of those changes.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List

from spec.config import DataConfig
from spec.prepared import FORMAT_VERSION

DIGEST_FILE = "file-hashes.json"
BLOCK_BYTES = 2**22


def cache_root(data: DataConfig) -> Path:
    """data.cache_dir, else $LONGTRAIN_DATA_CACHE, else ~/.cache/longtrain/data (absolute)."""
    root = data.cache_dir or os.environ.get("LONGTRAIN_DATA_CACHE") or "~/.cache/longtrain/data"
    return Path(root).expanduser().resolve()


def content_key(root: Path, files: List[Path], data: DataConfig, tokenizer) -> str:
    """The hash naming the prepared directory: format, source kind and text field, the tokenizer's files and
    framing, and every source file's digest in order."""
    digests = FileDigests(root)
    parts = {"format": FORMAT_VERSION, "source": data.source, "text_field": data.text_field,
             "tokenizer": digests.of(Path(tokenizer.path)),
             "tokenizer_config": digests.of(Path(tokenizer.config_path)) if tokenizer.config_path else None,
             "framing": [list(tokenizer.prefix), list(tokenizer.suffix)],
             "files": [digests.of(file) for file in files]}
    digests.save()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


class FileDigests:
    """sha256 of files, remembered by (size, mtime_ns, inode) in the cache root."""

    def __init__(self, root: Path):
        self.path = root / DIGEST_FILE
        self.known: Dict[str, list] = {}
        self.changed = False
        if self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text())
            except ValueError:
                self.known = {}  # a damaged memo only costs hashing again

    def of(self, file: Path) -> str:
        stat = file.stat()
        key, mark = str(file.resolve()), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.known.get(key)
        if entry and entry[:3] == mark:
            return entry[3]
        digest = sha256_file(file)
        self.known[key] = mark + [digest]
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.known))
        tmp.replace(self.path)


def sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
