"""Where a run writes, and what `resume=` points at.

A fresh run gets RUN_ROOT/NAME-YYYYmmdd-HHMMSS. `resume=auto` continues the newest run of the same name that has
a complete checkpoint, `resume=RUN_DIR` continues that run in place, and `resume=CHECKPOINT_DIR[:TAG]` starts a
new run from a DeepSpeed checkpoint directory (ours or one plain DeepSpeed wrote). Which of the last two a path is,
and the checks of the checkpoint itself, are the checkpoint package's (orchestrator/checkpoint/resume.py).
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.checkpoint import CheckpointRef, continued_run, foreign_checkpoint, latest_complete_tag
from spec.config import JobConfig
from spec.errors import CheckpointError, ConfigError


@dataclass
class RunPlacement:
    run_dir: Path
    continuing: bool
    """True when the run dir already holds this run's checkpoints (the worker resumes from them)."""
    initial: Optional[CheckpointRef] = None


def place_run(job: JobConfig) -> RunPlacement:
    if job.resume is None:
        return RunPlacement(_fresh_run_dir(job), continuing=False)
    if job.resume == "auto":
        return RunPlacement(_newest_resumable_run(job), continuing=True)
    return _place_from_path(job, job.resume)


def _fresh_run_dir(job: JobConfig) -> Path:
    if job.run.dir:
        run_dir = Path(job.run.dir).resolve()
        if latest_complete_tag(run_dir / "checkpoints"):
            raise ConfigError(f"run.dir ({job.run.dir}) already holds checkpoints; continue it with resume=auto "
                              "or resume=" + job.run.dir + ", or choose another run.dir")
        return run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(job.run.root).resolve() / f"{job.run.name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        run_dir = run_dir.with_name(f"{job.run.name}-{stamp}-{suffix}")
        suffix += 1
    return run_dir


def _newest_resumable_run(job: JobConfig) -> Path:
    if job.run.dir:
        candidates = [Path(job.run.dir)]
    else:
        candidates = sorted(Path(job.run.root).glob(f"{job.run.name}-*"), key=lambda p: p.name, reverse=True)
    for run_dir in candidates:
        if latest_complete_tag(run_dir / "checkpoints"):
            return run_dir.resolve()
    raise CheckpointError(f"resume=auto found no run with a complete checkpoint under "
                          f"{job.run.dir or Path(job.run.root) / (job.run.name + '-*')}; start without resume "
                          "or pass resume=RUN_DIR")


def _place_from_path(job: JobConfig, spec: str) -> RunPlacement:
    run_dir = continued_run(spec)
    if run_dir is not None:
        return RunPlacement(run_dir, continuing=True)
    initial = foreign_checkpoint(spec)  # checked before the new run directory is chosen
    return RunPlacement(_fresh_run_dir(job), continuing=False, initial=initial)
