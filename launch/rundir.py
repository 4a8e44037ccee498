"""Where a run writes, and what `resume=` points at.

A fresh run gets RUN_ROOT/NAME-YYYYmmdd-HHMMSS. `resume=auto` continues the newest run of exactly this name (the
directory name is NAME-YYYYmmdd-HHMMSS[-N]: `exp` never picks up `exp-big-...`) that has a complete checkpoint,
`resume=RUN_DIR` continues that run in place, and `resume=RUN_DIR:TAG` or `resume=CHECKPOINT_DIR[:TAG]` starts a new
run from one checkpoint (a run's tag, or one plain DeepSpeed wrote). Which of these a path is, and the checks of
the checkpoint itself, are the checkpoint package's (orchestrator/checkpoint/resume.py); the run directory's lock is
launch/runlock.py's.
"""

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

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


def runs_named(root: Path, name: str) -> List[Path]:
    """The run directories of exactly this run name under root, newest first."""
    pattern = re.compile(re.escape(name) + r"-(\d{8}-\d{6})(?:-(\d+))?")
    found = [(m.group(1), int(m.group(2) or 0), p) for p in (root.iterdir() if root.is_dir() else [])
             if p.is_dir() and (m := pattern.fullmatch(p.name))]
    return [p for *_, p in sorted(found, key=lambda f: f[:2], reverse=True)]


def _newest_resumable_run(job: JobConfig) -> Path:
    candidates = [Path(job.run.dir)] if job.run.dir else runs_named(Path(job.run.root), job.run.name)
    for run_dir in candidates:
        if latest_complete_tag(run_dir / "checkpoints"):
            return run_dir.resolve()
    raise CheckpointError(f"resume=auto found no run named {job.run.name} with a complete checkpoint under "
                          f"{job.run.dir or Path(job.run.root) / (job.run.name + '-YYYYmmdd-HHMMSS')}; start "
                          "without resume or pass resume=RUN_DIR")


def _place_from_path(job: JobConfig, spec: str) -> RunPlacement:
    run_dir = continued_run(spec)
    if run_dir is not None:
        return RunPlacement(run_dir, continuing=True)
    initial = foreign_checkpoint(spec)  # checked before the new run directory is chosen
    return RunPlacement(_fresh_run_dir(job), continuing=False, initial=initial)
