"""Before any worker starts: what `resume=` names, whether that checkpoint fits this job, and where workers start.

Why on the driver: a bad checkpoint found by the workers costs a cluster start and leaves logs and a config copy in
the run directory; found here it is one line and the run directory is untouched. `resume=RUN_DIR` continues that
run in place from its latest complete tag; `resume=RUN_DIR:TAG` and `resume=CHECKPOINT_DIR[:TAG]` name one
checkpoint (of a run, or one plain DeepSpeed wrote), which a new run starts from, so the run's later tags stay as
they are. A checkpoint of ours is verified against the checksums in its `COMPLETE` marker first. The launcher only places the run directory (launch/rundir.py) and calls
`prepare_resume`; a checkpoint written at another data-parallel size is converted first (universal.py).
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import yaml

from orchestrator.checkpoint.init_from import check_init_from, model_shapes
from orchestrator.checkpoint.inspect import CheckpointInfo, inspect_checkpoint, resolve_tag
from orchestrator.checkpoint import manifest
from orchestrator.checkpoint.manager import COMPLETE_MARKER, CheckpointRef, complete_tags, latest_complete_tag
from orchestrator.checkpoint.pickles import TRUST_FLAG
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
    warning = foreign_checkpoint_warning(placement, job.checkpoint.trust_pickles)
    if warning:
        warn(warning)
    if needs_universal(job, checked):
        placement = convert_to_universal(job, placement, checked, log)
    return placement


def continued_run(spec: str) -> Optional[Path]:
    """The run directory `resume=SPEC` continues in place; None when SPEC is not a run directory, or names a tag
    (RUN_DIR:TAG starts a new run from that tag)."""
    path_text, _, tag = spec.partition(":")
    path = Path(path_text)
    if tag or not (path / "checkpoints").is_dir():
        return None
    if not latest_complete_tag(path / "checkpoints"):
        raise CheckpointError(f"resume={spec}: {path / 'checkpoints'} holds no complete checkpoint; "
                              "start without resume")
    return path.resolve()


def foreign_checkpoint(spec: str) -> CheckpointRef:
    """The checkpoint a new run starts from: `resume=RUN_DIR:TAG` (a tag of a run), or DIR, DIR:TAG or a tag
    directory of a checkpoint directory. A tag of ours must be complete."""
    path_text, _, tag = spec.partition(":")
    path = Path(path_text)
    if (path / "checkpoints").is_dir():  # a run directory: its tags are in checkpoints/
        path = path / "checkpoints"
    checkpoint_dir, tag = resolve_tag(path, tag, f"resume={spec}")
    _check_complete(checkpoint_dir, tag, spec)
    return CheckpointRef(str(checkpoint_dir.resolve()), tag)


def _check_complete(checkpoint_dir: Path, tag: str, spec: str) -> None:
    """A tag longtrain wrote (it holds rank files) without its COMPLETE marker stopped mid-save."""
    tag_dir = checkpoint_dir / tag
    if any(tag_dir.glob("longtrain_rank*.pt")) and not (tag_dir / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"resume={spec}: {tag_dir} is incomplete (no {COMPLETE_MARKER} marker: its writer "
                              f"stopped mid-save); complete tags there: "
                              f"{', '.join(complete_tags(checkpoint_dir, warn=False)) or 'none'}")


def foreign_checkpoint_warning(placement, trust: bool) -> Optional[str]:
    """One line for starting, with checkpoint.trust_pickles on, from a checkpoint outside this run: its files may
    be unpickled in full, which can run code. Without the flag nothing that could run code is loaded."""
    if placement.initial is None or not trust:
        return None
    return (f"longtrain: warning: loading {placement.initial.dir}/{placement.initial.tag} from outside the run "
            f"directory with {TRUST_FLAG}: files that hold Python objects are unpickled in full, which can run "
            "code: load only checkpoints you trust")


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
    trust = job.checkpoint.trust_pickles
    if source is None:
        check_init_from(job.model, trust)
        return None
    info = inspect_checkpoint(Path(source.dir), source.tag, trust)  # files whole and safe to read: named first
    verify_checksums(info.tag_dir)
    if info.hf_names:
        raise CheckpointError(f"checkpoint {info.tag_dir} names its parameters as Hugging Face Llama does, so its "
                              "optimizer state cannot be restored into longtrain's model; start from its weights "
                              f"instead: model.init_from={source.dir}:{source.tag} (without resume=)")
    expected = model_shapes(job.model)
    if job.model.lora.enabled:  # a LoRA checkpoint holds the adapters; the base comes from model.init_from again
        from orchestrator.lora import adapter_shapes

        check_init_from(job.model, trust)
        expected = adapter_shapes(job.model)
    check_shapes(info.shapes, expected, f"checkpoint {info.tag_dir}", job.model.tie_embeddings)
    _check_zero_stage(info, job.train.zero_stage)
    return info


def verify_checksums(tag_dir: Path) -> None:
    """The files of a tag of ours against the checksums its COMPLETE marker holds (older markers hold none)."""
    marker = tag_dir / COMPLETE_MARKER
    if not marker.is_file():
        return
    try:
        sums = json.loads(marker.read_text() or "{}").get(manifest.SUMS_KEY)
    except (ValueError, AttributeError) as error:
        raise CheckpointError(f"checkpoint marker {marker} is not the JSON longtrain writes ({error}); "
                              f"{_other_tags(tag_dir)}") from error
    if sums:
        manifest.verify(tag_dir, sums, _other_tags(tag_dir))


def _other_tags(tag_dir: Path) -> str:
    """What to do instead of loading a broken tag: another complete tag of the same run, as a new run."""
    checkpoint_dir = tag_dir.parent
    run = checkpoint_dir.parent if checkpoint_dir.name == "checkpoints" else checkpoint_dir
    others = [t for t in complete_tags(checkpoint_dir, warn=False) if t != tag_dir.name]
    if not others:
        return "restore the file from a copy; no other complete tag is there to resume from"
    earlier = [t for t in others if t < tag_dir.name] or others
    return (f"resume from another tag with resume={run}:{earlier[-1]} (a new run from it; complete tags: "
            f"{', '.join(others)}), or restore the file from a copy")


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
