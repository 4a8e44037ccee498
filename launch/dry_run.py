"""`longtrain train --dry-run` (`longtrain.dry_run`): every check a real start makes before Ray, and what it would
start; starts nothing.

Why a separate path and not a flag deep in `run_training`: a dry run must not create the run directory, take
its lock, start the guard or Ray, or convert a checkpoint; it runs the same checks (`preflight.check_job`, the
run placement, the resume checks, the workers' fit on this machine) and prints the resolved DeepSpeed config the
workers would get.
"""

import json
import os
from typing import Optional, Sequence

from launch.api import DryRunResult
from launch.placement import check_capacity
from launch.preflight import check_job
from launch.reschedule import settle_schedule
from launch.rundir import place_run
from orchestrator.ds_config import deepspeed_config, uses_cuda
from spec.config import JobConfig, load_job_config


def check_start(config_path: Optional[str], overrides: Sequence[str]) -> DryRunResult:
    """`longtrain.dry_run`: the checks a start makes, and what it would start."""
    from launch.train_command import with_absolute_paths

    job = with_absolute_paths(load_job_config(config_path, list(overrides)))
    check_job(job)
    placement = place_run(job)
    universal = _check_resume(job, placement)
    schedule = settle_schedule(job, placement.run_dir) if placement.continuing else None
    use_cuda = uses_cuda(job.cluster)
    where = _check_placement(job, use_cuda)
    ds_config = deepspeed_config(job, use_cuda, load_universal=universal)
    lines = [f"dry run: {job.run.name}: config, data, profile, plan and DeepSpeed settings check out; nothing started",
             f"  run directory   {placement.run_dir} ({'continued' if placement.continuing else 'new'})"]
    if job.resume:
        lines.append(f"  resumes from    {job.resume}" + (" (converted to a universal checkpoint: other world size)"
                                                          if universal else ""))
    if schedule:
        lines.append(f"  schedule        {schedule.removeprefix('note: ')}")
    lines += [f"  plan            {job.plan.path or 'none'}",
              f"  workers         {job.cluster.num_workers} x {job.cluster.cpus_per_worker} CPU"
              + (f" + {job.cluster.gpus_per_worker} GPU" if use_cuda else "") + f" ({where})",
              "  DeepSpeed config (as each worker gets it):",
              json.dumps(ds_config, indent=2, default=str)]
    return DryRunResult(job, placement.run_dir, placement.continuing, universal, where, ds_config, "\n".join(lines))


def _check_resume(job: JobConfig, placement) -> bool:
    """The resume checks a real start makes (same model, a checkpoint that loads); whether it would convert."""
    from orchestrator.checkpoint.resume import check_resume, check_same_model, needs_universal

    check_same_model(job, placement)
    return bool(needs_universal(job, check_resume(job, placement)))


def _check_placement(job: JobConfig, use_cuda: bool) -> str:
    """A local run's workers against this machine, as the local Ray will see it; a cluster's are checked when
    a real start connects (a dry run connects to nothing)."""
    if job.cluster.address != "local":
        return f"fit on {job.cluster.address} checked when a real start connects"
    import torch

    needed = job.cluster.num_workers * job.cluster.cpus_per_worker
    node = {"CPU": max(os.cpu_count() or 1, needed), "GPU": torch.cuda.device_count() if use_cuda else 0}
    check_capacity(job.cluster, [node], use_cuda, "this machine")
    return "fit on this machine"

