"""Where a run writes, and what `resume=` points at.

A fresh run gets RUN_ROOT/NAME-YYYYmmdd-HHMMSS. `resume=auto` continues the newest run of the same name that has
a complete checkpoint, `resume=RUN_DIR` continues that run in place, and `resume=CHECKPOINT_DIR[:TAG]` starts a
new run from a DeepSpeed checkpoint directory (ours or one plain DeepSpeed wrote).
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import yaml

from orchestrator.checkpoint import latest_complete_tag
from orchestrator.checkpoint_check import resolve_tag
from spec.config import JobConfig
from spec.errors import CheckpointError, ConfigError
from orchestrator.trainer import CheckpointRef


@dataclass
class RunPlacement:
    run_dir: Path
    continuing: bool
    """True when the run dir already holds this run's checkpoints (the worker resumes from them)."""
    initial: Optional[CheckpointRef] = None


def foreign_checkpoint_warning(placement: RunPlacement) -> Optional[str]:
    """One line for starting from a checkpoint outside this run: DeepSpeed checkpoints are pickles."""
    if placement.initial is None:
        return None
    return (f"longtrain: warning: loading {placement.initial.dir}/{placement.initial.tag} from outside the run "
            "directory; DeepSpeed checkpoints are Python pickles, which can run code when loaded: load only "
            "checkpoints you trust")


def check_same_model(job: JobConfig, placement: RunPlacement) -> None:
    """Refuse to continue a run with another model shape, before anything is written (one line, the first key)."""
    saved = placement.run_dir / "config.yaml"
    if not placement.continuing or not saved.is_file():
        return
    trained = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    for key, value in asdict(job.model).items():
        if key in trained and trained[key] != value and key not in ("preset", "init_std", "init_from"):
            raise CheckpointError(f"resume: {placement.run_dir} was trained with model.{key}={trained[key]}, this "
                                  f"job has {value}; resume with the run's own config ({saved}) or start a new run")


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
    path_text, _, tag = spec.partition(":")
    path = Path(path_text)
    if (path / "checkpoints").is_dir():
        if not latest_complete_tag(path / "checkpoints"):
            raise CheckpointError(f"resume={spec}: {path / 'checkpoints'} holds no complete checkpoint; "
                                  "start without resume")
        return RunPlacement(path.resolve(), continuing=True)
    checkpoint_dir, tag = resolve_tag(path, tag, f"resume={spec}")
    return RunPlacement(_fresh_run_dir(job), continuing=False,
                        initial=CheckpointRef(str(checkpoint_dir.resolve()), tag))
