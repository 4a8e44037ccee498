"""What a resume in place does to the learning-rate schedule: keep it, refuse, or re-shape it when asked.

Why: DeepSpeed's WarmupCosineLR is built from the job's `optim.*` and its schedule length (`optim.schedule_steps`,
default `train.max_steps`); the checkpoint restores only its position. Resuming with a larger `train.max_steps`
would therefore re-shape the cosine: the learning rate at the resumed step jumps from near its floor back up and
the loss rises. So a resume keeps the run's schedule unless `train.reschedule=true`:
- only `train.max_steps` changed: `optim.schedule_steps` is set to the schedule the run had (the lr stays on its
  old curve, at its floor past the old end), said in one line with what `train.reschedule=true` would do;
- `optim.lr`, `optim.warmup_steps`, `optim.min_lr_ratio` or `optim.schedule_steps` changed: refused in one line,
  since keeping the schedule would ignore what was asked;
- `train.reschedule=true`: the schedule is rebuilt from this job's keys, said with the lr before and after.
The run directory's config.STAMP.yaml of each resume records the schedule it ran with.
"""

import re
from pathlib import Path
from typing import Dict, Optional

from spec.config import JobConfig
from spec.errors import ConfigError

SCHEDULE_KEYS = (("optim", "lr"), ("optim", "warmup_steps"), ("optim", "min_lr_ratio"))
"""The keys besides the schedule's length that shape it (`orchestrator.ds_config`'s scheduler params)."""


def settle_schedule(job: JobConfig, run_dir: Path) -> Optional[str]:
    """For a resume of the run in `run_dir` in place: pin, refuse or accept a schedule change (above); the line
    to say (None when the schedule is unchanged or the run has no checkpoint yet)."""
    from launch.config_command import run_config
    from orchestrator.checkpoint import latest_complete_tag

    latest = latest_complete_tag(run_dir / "checkpoints")
    match = re.fullmatch(r"step_(\d+)", latest) if latest else None
    previous = run_config(run_dir) if match else None
    return schedule_decision(job, previous, int(match.group(1))) if match else None


def schedule_decision(job: JobConfig, previous: Optional[Dict], step: int) -> Optional[str]:
    """The decision for a resume at `step` of a run whose previous resolved config is `previous`; may set
    job.optim.schedule_steps (keeping the schedule)."""
    if not previous or step <= 0:
        return None
    old_length, new_length = _length(previous), job.optim.schedule_steps or job.train.max_steps
    shape = [(f"{section}.{key}", previous.get(section, {}).get(key), getattr(getattr(job, section), key))
             for section, key in SCHEDULE_KEYS]
    shape = [(name, old, new) for name, old, new in shape if old is not None and old != new]
    if old_length is None or (old_length == new_length and not shape):
        return None
    old_job = _with(job, previous, old_length)
    if job.train.reschedule:
        return _rescheduled(job, old_job, step, shape, old_length, new_length)
    if shape or job.optim.schedule_steps is not None:
        length_key = "train.max_steps" if job.optim.schedule_steps is None else "optim.schedule_steps"
        changes = ", ".join(f"{name} {old} -> {new}" for name, old, new in shape
                            + ([(length_key, old_length, new_length)] if old_length != new_length else []))
        raise ConfigError(f"{changes} on a resume at step {step} re-shapes the learning-rate schedule "
                          f"({_lr_change(old_job, job, step)}); pass train.reschedule=true to apply it, or resume "
                          "with the values the run had")
    stretched = _lr_change(old_job, job, step)
    job.optim.schedule_steps = old_length
    if previous["train"]["max_steps"] == job.train.max_steps:  # an earlier resume kept it: keep it again, quietly
        return None
    return (f"note: train.max_steps {previous['train']['max_steps']} -> {job.train.max_steps}: the learning-rate "
            f"schedule is kept (cosine over {old_length} steps; lr after step {step} {_lr(old_job, step)}); "
            f"train.reschedule=true would stretch it over {new_length} steps ({stretched})")


def _rescheduled(job, old_job, step, shape, old_length, new_length) -> str:
    changes = [f"{name} {old} -> {new}" for name, old, new in shape]
    if old_length != new_length:
        changes.append(f"schedule {old_length} -> {new_length} steps")
    return (f"note: train.reschedule=true: {', '.join(changes)} re-shapes the learning-rate schedule from step "
            f"{step} ({_lr_change(old_job, job, step)})")


def _length(previous: Dict) -> Optional[int]:
    """The schedule length of a previous config (its optim.schedule_steps, else its train.max_steps)."""
    return previous.get("optim", {}).get("schedule_steps") or previous.get("train", {}).get("max_steps")


def _lr_change(old_job: JobConfig, job: JobConfig, step: int) -> str:
    return f"lr after step {step} {_lr(old_job, step)} -> {_lr(job, step)}"


def _lr(job: JobConfig, step: int) -> str:
    value = lr_at(job, step)
    return "unknown (train.deepspeed_extra sets another scheduler)" if value is None else f"{value:.3g}"


def lr_at(job: JobConfig, step: int) -> Optional[float]:
    """The learning rate after `step` optimizer steps, by DeepSpeed's own WarmupCosineLR built from the job's
    DeepSpeed config (None when train.deepspeed_extra sets another scheduler)."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    from orchestrator.ds_config import deepspeed_config

    scheduler = deepspeed_config(job, use_cuda=False).get("scheduler", {})
    if scheduler.get("type") != "WarmupCosineLR":
        return None
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=job.optim.lr)
    return float(WarmupCosineLR(optimizer, **scheduler["params"], last_batch_iteration=step).get_lr()[0])


def _with(job: JobConfig, previous: Dict, length: int) -> JobConfig:
    """The job with the previous config's schedule."""
    import copy

    old = copy.deepcopy(job)
    for section, key in SCHEDULE_KEYS:
        value = previous.get(section, {}).get(key)
        if value is not None:
            setattr(getattr(old, section), key, value)
    old.optim.schedule_steps = length
    return old
