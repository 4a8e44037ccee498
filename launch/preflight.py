"""Every rule a training job must pass, checked once on the driver before Ray starts a worker.

Why here and only here: a mistake found in a worker is found once per worker, after Ray and DeepSpeed have
started, and surfaces as a wrapped traceback. The job config validates itself when it is loaded (`spec.config`);
this adds what needs files or the machine: the plan (loaded once; its composition, and its inputs against this
machine's profile when the driver sees the workers' devices), the activation-checkpointing backend, the token
elimination predictors. Workers check only what depends on their own device (the plan's profile hash).
"""

from pathlib import Path

from orchestrator.ds_config import uses_cuda
from spec.config import JobConfig


def check_job(job: JobConfig) -> None:
    """Raise a one-line `LongtrainError` for the first rule the job breaks (its config is already valid)."""
    _check_plan(job)
    _check_activation_checkpointing(job)
    _check_predictors(job)


def _check_plan(job: JobConfig) -> None:
    if not job.plan.path:
        return
    import torch

    from orchestrator.ds_config import resolve_precision
    from orchestrator.trainer import profile_name
    from spec.hardware import load_profile
    from spec.plan import check_plan_composes, check_plan_matches, load_plan, plan_inputs

    path = Path(job.plan.path)
    plan = load_plan(path)
    check_plan_composes(plan, job, path)
    use_cuda = uses_cuda(job.cluster)
    if job.metrics.hardware_profile == "auto" and (job.cluster.address != "local" or
                                                   (use_cuda and not torch.cuda.is_available())):
        return  # the driver does not see the workers' devices: each worker checks the profile
    profile = load_profile(profile_name(job, use_cuda))
    check_plan_matches(plan, plan_inputs(job, profile, resolve_precision(job.train.precision, use_cuda)), path)


def _check_activation_checkpointing(job: JobConfig) -> None:
    from orchestrator.memory.ds_checkpointing import check_supported

    check_supported(job.train.activation_checkpointing, uses_cuda(job.cluster))


def _check_predictors(job: JobConfig) -> None:
    """A missing or mismatched token_elim.predictors file (local runs: a cluster's workers may see other files)."""
    if job.token_elim.enabled and job.token_elim.predictors and job.cluster.address == "local":
        from orchestrator.memory.token_elim_predictors import load_predictors

        load_predictors(job.token_elim.predictors, job.model, job.token_elim.block_size)
