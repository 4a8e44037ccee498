"""DeepSpeed checkpoints made atomic, plus the state DeepSpeed does not keep (RNG and data position per rank).

Why: DeepSpeed writes `latest` as soon as its own files are written, from one rank, and returns (None, None)
from `load_checkpoint` when it finds nothing. We write every tag with `save_latest=False`, add one
`longtrain_rank{R}.pt` per rank, and only after a barrier does rank 0 drop a `COMPLETE` marker (with the sha256 of
every file of the tag, manifest.py) and replace `latest` atomically. A crash mid-write leaves an incomplete tag that
is skipped with a warning, and the previous checkpoint stays the one `resume` finds. `latest` keeps DeepSpeed's
format, so plain DeepSpeed can load ours. Pruning keeps the last `keep_last` complete tags of this run's directory
and the tag this run resumed from (the last one verified against its checksums), whatever came after it.

The rank file needs no pickle to load (format 2: tensors, numbers and strings; RNG states as tensors), and every
file is loaded through the restricted unpickler of pickles.py; the step is DeepSpeed's own count
(`engine.global_steps`), not a `step` another program may keep in its client state.

A worker resumes from `resume_source`: this run's latest complete tag, or the `CheckpointRef` the driver handed it
(a checkpoint outside the run, or a universal copy of the run's own).
"""

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from orchestrator.checkpoint import manifest
from orchestrator.checkpoint.pickles import load_file, safe_loads
from spec.errors import CheckpointError

COMPLETE_MARKER = "COMPLETE"
TAG_PREFIX = "step_"
RANK_FILE_FORMAT = 2
"""Rank files: 2 holds tensors, numbers and strings only (1, before: numpy and Python RNG states as objects)."""


_TAG = re.compile(re.escape(TAG_PREFIX) + r"\d{8}")


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_tags(checkpoint_dir: Path, warn: bool = True) -> List[str]:
    """Complete tags (step_XXXXXXXX, nothing else), oldest first; incomplete ones are reported and skipped."""
    if not checkpoint_dir.is_dir():
        return []
    tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and _TAG.fullmatch(p.name))
    incomplete = [t for t in tags if not (checkpoint_dir / t / COMPLETE_MARKER).is_file()]
    for tag in incomplete if warn else []:
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
    """Every RNG's state as tensors and numbers (loads with weights_only=True, no allowlist)."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Either format: 2 (capture_rng_state) or 1 (numpy's and Python's own state tuples)."""
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(int(x) for x in python_state["internal"].tolist()),
                        python_state["gauss"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointManager:
    """Saves and loads one run's checkpoints from inside a worker (every rank calls save and load).

    trust_pickles: files that need a full unpickle are loaded (checkpoint.trust_pickles), not refused.
    trainable_only: save only the parameters that train (LoRA's adapters; DeepSpeed's exclude_frozen_parameters)
    and load them into a model whose frozen base was built from its source (not strict)."""

    def __init__(self, checkpoint_dir: Path, keep_last: int, rank: int, barrier, trust_pickles: bool = False,
                 trainable_only: bool = False):
        self.dir = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier
        self.trust_pickles = trust_pickles
        self.trainable_only = trainable_only
        self.resumed_tag: Optional[str] = None
        """The tag of this directory the run resumed from: verified on the driver, never pruned by this run."""

    def save(self, engine, step: int, client_state: Dict[str, Any], rank_state: Dict[str, Any]) -> Path:
        tag = tag_for_step(step)
        self._forget_complete(tag)
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=self.trainable_only)
        rank_state = dict(rank_state, format=RANK_FILE_FORMAT, rng=capture_rng_state())
        _atomic_torch_save(rank_state, self.dir / tag / f"longtrain_rank{self.rank}.pt")
        self.barrier()
        manifest.write_partial(self.dir / tag, self.rank, engine.world_size)
        self.barrier()
        if self.rank == 0:
            marker = {"step": step, "time": time.time(), "world_size": engine.world_size,
                      manifest.SUMS_KEY: manifest.collect(self.dir / tag)}
            _atomic_write_text(self.dir / tag / COMPLETE_MARKER, json.dumps(marker))
            _atomic_write_text(self.dir / "latest", tag)
            self._prune()
        self.barrier()
        return self.dir / tag

    def _forget_complete(self, tag: str) -> None:
        """A tag written again (a restarted worker group redoing steps) is incomplete until its new marker."""
        if self.rank == 0 and (self.dir / tag / COMPLETE_MARKER).is_file():
            (self.dir / tag / COMPLETE_MARKER).unlink()
        self.barrier()

    def load(self, engine, tag: str, checkpoint_dir: Optional[Path] = None,
             data_ranks: Optional[int] = None) -> Dict[str, Any]:
        """Restore engine, optimizer and scheduler; return client state merged with this rank's own state, with
        `step` = DeepSpeed's count of optimizer steps.

        data_ranks: how many ranks read different data (the sampler's world: DeepSpeed's ranks over the Ulysses
        degree). Written by another number, this rank's state does not apply (its RNG cannot map rank to rank);
        the data position then comes from rank 0's file (positions count global sequences), or for a checkpoint
        without our files (plain DeepSpeed) from DeepSpeed's sample count."""
        source = Path(checkpoint_dir or self.dir)
        if not (source / tag).is_dir():
            raise CheckpointError(f"checkpoint {source / tag} does not exist; list the tags in {source} "
                                  "and pass resume=DIR:TAG")
        with safe_loads(engine, self.trust_pickles):
            path, client_state = engine.load_checkpoint(str(source), tag=tag,
                                                        load_module_strict=not self.trainable_only)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no loadable checkpoint at {source / tag}; "
                                  "check the files or resume from an earlier tag")
        if source.resolve() == self.dir.resolve():
            self.resumed_tag = tag
        rank_state = self._rank_state(source / tag, self.rank)
        if rank_state.get("data", {}).get("world_size") != (data_ranks or engine.dp_world_size):
            first = self._rank_state(source / tag, 0).get("data")
            rank_state = {"data": first or global_position(engine.global_samples)}
        if "rng" in rank_state:
            restore_rng_state(rank_state["rng"])
        return {**(client_state or {}), **rank_state, "step": int(engine.global_steps)}

    def _rank_state(self, tag_dir: Path, rank: int) -> Dict[str, Any]:
        rank_file = tag_dir / f"longtrain_rank{rank}.pt"
        return load_file(rank_file, self.trust_pickles) if rank_file.is_file() else {}

    def _prune(self) -> None:
        """Older complete tags beyond keep_last, except the one this run resumed from; only this run's own tags
        (step_XXXXXXXX in its directory) are ever considered."""
        for tag in complete_tags(self.dir)[:-self.keep_last]:
            if tag != self.resumed_tag:
                shutil.rmtree(self.dir / tag, ignore_errors=True)


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
