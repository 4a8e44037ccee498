"""DeepSpeed checkpoints made atomic, plus the state DeepSpeed does not keep (RNG and data position per rank).

Why: DeepSpeed writes `latest` as soon as its own files are written, from one rank, and returns (None, None)
from `load_checkpoint` when it finds nothing. We write every tag with `save_latest=False`, add one
`longtrain_rank{R}.pt` per rank, and only after a barrier does rank 0 drop a `COMPLETE` marker and replace
`latest` atomically. A crash mid-write leaves an incomplete tag that is skipped with a warning, and the previous
checkpoint stays the one `resume` finds. `latest` keeps DeepSpeed's format, so plain DeepSpeed can load ours.

A worker resumes from `resume_source`: this run's latest complete tag, or the `CheckpointRef` the driver handed it
(a checkpoint outside the run, or a universal copy of the run's own).
"""

import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from spec.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
TAG_PREFIX = "step_"


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_tags(checkpoint_dir: Path) -> List[str]:
    """Complete tags, oldest first; incomplete ones are reported and skipped."""
    if not checkpoint_dir.is_dir():
        return []
    tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    incomplete = [t for t in tags if not (checkpoint_dir / t / COMPLETE_MARKER).is_file()]
    for tag in incomplete:
        warnings.warn(f"checkpoint {checkpoint_dir / tag} is incomplete (no {COMPLETE_MARKER} marker: the "
                      "writer stopped mid-save); skipping it", stacklevel=2)
    return [t for t in tags if t not in incomplete]


def latest_complete_tag(checkpoint_dir: Path) -> Optional[str]:
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


@dataclass
class CheckpointRef:
    """A checkpoint to start from: DIR holding TAG (outside this run, or a universal copy of this run's own)."""

    dir: str
    tag: str
    universal: bool = False
    """A DeepSpeed universal checkpoint (converted because the data-parallel size changed)."""


def resume_source(checkpoint_dir: Path, initial: Optional[CheckpointRef]) -> Optional[CheckpointRef]:
    """This run's latest complete checkpoint, unless `initial` is a universal copy of it (world size changed)."""
    own = latest_complete_tag(checkpoint_dir)
    if own and (initial is None or own != initial.tag):
        return CheckpointRef(str(checkpoint_dir), own)
    return initial


def capture_rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and loads one run's checkpoints from inside a worker (every rank calls save and load)."""

    def __init__(self, checkpoint_dir: Path, keep_last: int, rank: int, barrier):
        self.dir = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    def save(self, engine, step: int, client_state: Dict[str, Any], rank_state: Dict[str, Any]) -> Path:
        tag = tag_for_step(step)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        rank_state = dict(rank_state, rng=capture_rng_state())
        _atomic_torch_save(rank_state, self.dir / tag / f"longtrain_rank{self.rank}.pt")
        self.barrier()
        if self.rank == 0:
            marker = {"step": step, "time": time.time(), "world_size": engine.world_size}
            _atomic_write_text(self.dir / tag / COMPLETE_MARKER, json.dumps(marker))
            _atomic_write_text(self.dir / "latest", tag)
            self._prune()
        self.barrier()
        return self.dir / tag

    def load(self, engine, tag: str, checkpoint_dir: Optional[Path] = None,
             data_ranks: Optional[int] = None) -> Dict[str, Any]:
        """Restore engine, optimizer and scheduler; return client state merged with this rank's own state.

        data_ranks: how many ranks read different data (the sampler's world: DeepSpeed's ranks over the Ulysses
        degree). Written by another number, this rank's state does not apply (its RNG cannot map rank to rank);
        the data position then comes from rank 0's file (positions count global sequences), or for a checkpoint
        without our files (plain DeepSpeed) from DeepSpeed's sample count."""
        source = Path(checkpoint_dir or self.dir)
        if not (source / tag).is_dir():
            raise CheckpointError(f"checkpoint {source / tag} does not exist; list the tags in {source} "
                                  "and pass resume=DIR:TAG")
        path, client_state = engine.load_checkpoint(str(source), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no loadable checkpoint at {source / tag}; "
                                  "check the files or resume from an earlier tag")
        rank_state = _rank_state(source / tag, self.rank)
        if rank_state.get("data", {}).get("world_size") != (data_ranks or engine.dp_world_size):
            first = _rank_state(source / tag, 0).get("data")
            rank_state = {"data": first or global_position(engine.global_samples)}
        if "rng" in rank_state:
            restore_rng_state(rank_state["rng"])
        return {**(client_state or {}), **rank_state}

    def _prune(self) -> None:
        for tag in complete_tags(self.dir)[:-self.keep_last]:
            shutil.rmtree(self.dir / tag, ignore_errors=True)


def _rank_state(tag_dir: Path, rank: int) -> Dict[str, Any]:
    rank_file = tag_dir / f"longtrain_rank{rank}.pt"
    return torch.load(rank_file, weights_only=False) if rank_file.is_file() else {}


def global_position(global_samples: int) -> Dict[str, int]:
    """A data position from DeepSpeed's global sample count, for checkpoints without our per-rank files (foreign):
    every rank continues after the sequences all ranks consumed; the loop reseeds its RNG from seed, rank and step."""
    return {"consumed_micro_batches": int(global_samples), "world_size": 1, "micro_batch_size": 1}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
