"""What a resume in place changes in the learning-rate schedule, said in one line before the workers start.

Why: DeepSpeed's WarmupCosineLR is built from this run's `train.max_steps` and `optim.*`; the checkpoint restores
only its position. Resuming with a larger `train.max_steps` (the README's `resume=auto train.max_steps=600`)
therefore re-shapes the cosine: the learning rate at the resumed step jumps (from near its floor back up), which
shows as a rising loss. That is often what a user wants (training longer), so it is not refused; it is said,
with the learning rate before and after, and the run directory records each resume's command in its config.
"""

from typing import Dict, Optional

from spec.config import JobConfig

SCHEDULE_KEYS = (("train", "max_steps"), ("optim", "lr"), ("optim", "warmup_steps"), ("optim", "min_lr_ratio"))
"""The keys that shape the schedule (`orchestrator.ds_config`'s scheduler params)."""


def schedule_note(job: JobConfig, previous: Optional[Dict], step: int) -> Optional[str]:
    """One line when a resume at `step` changes a schedule key of the run's previous config (None otherwise)."""
    if not previous or step <= 0:
        return None
    changed = [(f"{section}.{key}", previous.get(section, {}).get(key), getattr(getattr(job, section), key))
               for section, key in SCHEDULE_KEYS]
    changed = [(name, old, new) for name, old, new in changed if old is not None and old != new]
    if not changed:
        return None
    keys = ", ".join(f"{name} {old} -> {new}" for name, old, new in changed)
    old_lr, new_lr = lr_at(_with(job, previous), step), lr_at(job, step)
    if old_lr is None or new_lr is None:
        return f"note: {keys} re-shapes the learning-rate schedule from step {step}"
    return (f"note: {keys} re-shapes the learning-rate schedule (WarmupCosineLR over train.max_steps): lr after "
            f"step {step} {old_lr:.3g} -> {new_lr:.3g}")


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


def _with(job: JobConfig, previous: Dict) -> JobConfig:
    """The job with the previous config's schedule keys."""
    import copy

    old = copy.deepcopy(job)
    for section, key in SCHEDULE_KEYS:
        value = previous.get(section, {}).get(key)
        if value is not None:
            setattr(getattr(old, section), key, value)
    return old
