"""Before any worker starts: what `resume=` names, whether that checkpoint fits this job, and where workers start.

Why on the driver: a bad checkpoint found by the workers costs a cluster start and leaves logs and a config copy in
the run directory; found here it is one line and the run directory is untouched. `resume=RUN_DIR` continues that
run in place; `resume=CHECKPOINT_DIR[:TAG]` names a checkpoint outside any run (ours or one plain DeepSpeed wrote),
which a new run starts from. The launcher only places the run directory (launch/rundir.py) and calls
`prepare_resume`; a checkpoint written at another data-parallel size is converted first (universal.py).
"""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import yaml

from orchestrator.checkpoint.init_from import check_init_from, model_shapes
from orchestrator.checkpoint.inspect import CheckpointInfo, inspect_checkpoint, resolve_tag
from orchestrator.checkpoint.manager import CheckpointRef, latest_complete_tag
from orchestrator.checkpoint.universal import convert_to_universal, needs_universal
from orchestrator.checkpoint.weights import check_shapes
from spec.config import JobConfig
from spec.errors import CheckpointError


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def prepare_resume(job: JobConfig, placement, log=print, warn=_to_stderr):
    """Check what the placed run starts from and return the placement its workers get (a universal copy of the
    checkpoint when the world size changed). A mismatch raises CheckpointError in one line before the run directory
    is created; a failed conversion removes what it wrote."""
    check_same_model(job, placement)
    checked = check_resume(job, placement)
    warning = foreign_checkpoint_warning(placement)
    if warning:
        warn(warning)
    if needs_universal(job, checked):
        placement = convert_to_universal(job, placement, checked, log)
    return placement


def continued_run(spec: str) -> Optional[Path]:
    """The run directory `resume=SPEC` continues in place; None when SPEC is not a run directory."""
    path = Path(spec.partition(":")[0])
    if not (path / "checkpoints").is_dir():
        return None
    if not latest_complete_tag(path / "checkpoints"):
        raise CheckpointError(f"resume={spec}: {path / 'checkpoints'} holds no complete checkpoint; "
                              "start without resume")
    return path.resolve()


def foreign_checkpoint(spec: str) -> CheckpointRef:
    """The checkpoint `resume=DIR[:TAG]` names outside any run (DIR, DIR:TAG or a tag directory)."""
    path_text, _, tag = spec.partition(":")
    checkpoint_dir, tag = resolve_tag(Path(path_text), tag, f"resume={spec}")
    return CheckpointRef(str(checkpoint_dir.resolve()), tag)


def foreign_checkpoint_warning(placement) -> Optional[str]:
    """One line for starting from a checkpoint outside this run: DeepSpeed checkpoints are pickles."""
    if placement.initial is None:
        return None
    return (f"longtrain: warning: loading {placement.initial.dir}/{placement.initial.tag} from outside the run "
            "directory; DeepSpeed checkpoints are Python pickles, which can run code when loaded: load only "
            "checkpoints you trust")


def check_same_model(job: JobConfig, placement) -> None:
    """Refuse to continue a run with another model shape, before anything is written (one line, the first key)."""
    saved = placement.run_dir / "config.yaml"
    if not placement.continuing or not saved.is_file():
        return
    trained = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    for key, value in asdict(job.model).items():
        if key in trained and trained[key] != value and key not in ("preset", "init_std", "init_from"):
            raise CheckpointError(f"resume: {placement.run_dir} was trained with model.{key}={trained[key]}, this "
                                  f"job has {value}; resume with the run's own config ({saved}) or start a new run")


def check_resume(job: JobConfig, placement) -> Optional[CheckpointInfo]:
    """The checkpoint the workers will load, checked (files whole, our names, this model's shapes, ZeRO stage);
    without one, the `model.init_from` weights are checked instead."""
    source = _source(placement)
    if source is None:
        check_init_from(job.model)
        return None
    info = inspect_checkpoint(Path(source.dir), source.tag)
    if info.hf_names:
        raise CheckpointError(f"checkpoint {info.tag_dir} names its parameters as Hugging Face Llama does, so its "
                              "optimizer state cannot be restored into longtrain's model; start from its weights "
                              f"instead: model.init_from={source.dir}:{source.tag} (without resume=)")
    check_shapes(info.shapes, model_shapes(job.model), f"checkpoint {info.tag_dir}", job.model.tie_embeddings)
    _check_zero_stage(info, job.train.zero_stage)
    return info


def _check_zero_stage(info: CheckpointInfo, stage: int) -> None:
    """ZeRO-1 and -2 checkpoints load into each other; any other change of stage does not."""
    if info.zero_stage != stage and {info.zero_stage, stage} != {1, 2}:
        raise CheckpointError(f"checkpoint {info.tag_dir} was written with ZeRO-{info.zero_stage}, this job has "
                              f"train.zero_stage={stage}; set train.zero_stage={info.zero_stage} to resume it")


def _source(placement) -> Optional[CheckpointRef]:
    if placement.continuing:
        tag = latest_complete_tag(placement.run_dir / "checkpoints")
        return CheckpointRef(str(placement.run_dir / "checkpoints"), tag) if tag else None
    return placement.initial
