"""A CUDA memory snapshot of a run's first steps (`metrics.memory_snapshot_steps`): every allocation and free of
the caching allocator with its stream, size and time (no stacks: see `Recorder`), written to the run directory for
PyTorch's viewer (https://pytorch.org/memory_viz).

Why: a step's peak allocated memory is what the plan predicts; what the allocator reserves beyond it (blocks of
another stream's pool, frees deferred by a copy stream, split segments) only a trace of the allocator can name."""

import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("longtrain.memory")

MAX_ENTRIES = 200_000
"""Allocator events kept (the oldest dropped first): several steps of a 32-layer model at 256K tokens."""


def snapshot_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"memory_snapshot_rank{rank}.pickle"


class Recorder:
    """Records from construction until `steps` steps after `start_step`, then writes the snapshot once."""

    def __init__(self, steps: int, start_step: int, run_dir: Path, rank: int):
        self.first_step = start_step + 1
        self.last_step: Optional[int] = start_step + steps if steps > 0 and torch.cuda.is_available() else None
        self.path = snapshot_path(run_dir, rank)
        if self.last_step is not None:
            # No stacks (context=None): gathering them killed a worker in the tiled loss's recompute on torch 2.11
            # ("apply ... returned NULL without setting an exception"); streams, sizes and times are what tell.
            torch.cuda.memory._record_memory_history(context=None, max_entries=MAX_ENTRIES)

    def after_step(self, step: int) -> Optional[Path]:
        """The snapshot's path once written (at the last recorded step), else None."""
        if self.last_step is None or step < self.last_step:
            return None
        self.last_step = None
        partial = self.path.with_name(self.path.name + ".partial")
        torch.cuda.memory._dump_snapshot(str(partial))
        torch.cuda.memory._record_memory_history(enabled=None)
        os.replace(partial, self.path)  # never a half-written snapshot under the final name
        log.info("memory snapshot of steps %d-%d: %s (open it in https://pytorch.org/memory_viz)", self.first_step,
                 step, self.path)
        return self.path
