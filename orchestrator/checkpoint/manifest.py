"""Checksums of every file of a checkpoint tag: written into its `COMPLETE` marker, verified before a resume.

Why: nothing DeepSpeed loads is verified. Sixteen flipped bytes in an optimizer shard loaded silently, the loss went
NaN and the run wrote NaN checkpoints over the good ones. So when a tag is saved each rank hashes (sha256) the files
it wrote (its ZeRO shards and rank file; rank 0 also the shared ones), in parallel, into a partial list beside them;
after a barrier rank 0 merges the lists into `COMPLETE`, which is written last. Before any worker starts, the driver
hashes the files again (several at once) and refuses a missing or changed file in one line that names it and says
what to resume from instead. Tags written before manifests existed carry none and are not verified.
"""

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

from spec.errors import CheckpointError

SUMS_KEY = "sha256"
"""The key of the {file name: sha256} map in a COMPLETE marker."""
PARTIAL_PREFIX = ".sha256.rank"
_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|longtrain_rank)(\d+)")
_CHUNK_BYTES = 8 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def owner(name: str, world_size: int) -> int:
    """The rank that hashes a file: the rank in its name (ZeRO shards, rank files), else rank 0."""
    found = _RANK_IN_NAME.search(name)
    rank = int(found.group(1)) if found else 0
    return rank if rank < world_size else 0


def _checked_files(tag_dir: Path):
    """The files a manifest covers: everything in the tag but the marker, partial lists and temporaries."""
    return sorted(p for p in tag_dir.iterdir() if p.is_file() and p.name != "COMPLETE"
                  and not p.name.startswith(PARTIAL_PREFIX) and not p.name.endswith(".tmp"))


def write_partial(tag_dir: Path, rank: int, world_size: int) -> None:
    """This rank's share of the manifest (after every rank has written its files)."""
    sums = {p.name: file_sha256(p) for p in _checked_files(tag_dir) if owner(p.name, world_size) == rank}
    target = tag_dir / f"{PARTIAL_PREFIX}{rank}.json"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(sums))
    os.replace(tmp, target)


def collect(tag_dir: Path) -> Dict[str, str]:
    """Rank 0, after every rank wrote its partial list: the whole manifest (a file no rank covered is hashed here);
    the partial lists are removed."""
    sums: Dict[str, str] = {}
    partials = sorted(tag_dir.glob(f"{PARTIAL_PREFIX}*.json"))
    for partial in partials:
        sums.update(json.loads(partial.read_text()))
    for path in _checked_files(tag_dir):
        if path.name not in sums:
            sums[path.name] = file_sha256(path)
    for partial in partials:
        partial.unlink()
    return dict(sorted(sums.items()))


def verify(tag_dir: Path, sums: Dict[str, str], fix: str) -> None:
    """Every file of the manifest is there with its checksum; else one line naming the file, then `fix`."""
    for name in sums:
        if not (tag_dir / name).is_file():
            raise CheckpointError(f"checkpoint file {tag_dir / name} is missing (its COMPLETE marker lists it); "
                                  f"{fix}")
    names = list(sums)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = dict(zip(names, pool.map(lambda n: file_sha256(tag_dir / n), names)))
    for name in names:
        if found[name] != sums[name]:
            raise CheckpointError(f"checkpoint file {tag_dir / name} does not match the checksum written with it "
                                  f"(in {tag_dir / 'COMPLETE'}): it was changed or corrupted after the save; {fix}")
