"""Every rule a training job must pass, checked once on the driver before Ray starts a worker.

Why here and only here: a mistake found in a worker is found once per worker, after Ray and DeepSpeed have
started, and surfaces as a wrapped traceback. The job config validates itself when it is loaded (`spec.config`);
this adds what needs files or the machine: the plan (loaded once; its composition, and its inputs against this
machine's profile when the driver sees the workers' devices), the activation-checkpointing backend, the token
elimination predictors, the token file, the hardware profile, `train.deepspeed_extra` (through DeepSpeed's own
config validation) and that a cluster address answers us (`ray_address_check`). Workers check only what depends
on their own device (the plan's profile hash). Files are checked for local runs only: a cluster's workers may see
other files.
"""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from orchestrator.ds_config import uses_cuda
from spec.config import JobConfig
from spec.config.schema import TEXT_SOURCES
from spec.errors import ConfigError
from launch.host_check import check_whole_job


def check_job(job: JobConfig) -> None:
    """Raise a one-line `LongtrainError` for the first rule the job breaks (its config is already valid)."""
    _check_cluster_address(job)
    _check_local_devices(job)
    _check_attention_kernel(job)  # before the data: preparing documents writes their cache
    _check_memory_snapshot(job)
    _check_allocator(job)
    _check_data(job)
    _check_profile(job)
    _check_plan(job)
    _check_activation_checkpointing(job)
    _check_predictors(job)
    _check_deepspeed_extra(job)
    check_whole_job(job)  # host memory for the plan and the offload, CPU Adam, peft


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


def _check_attention_kernel(job: JobConfig) -> None:
    """FlashAttention-4 (train.attention_kernel=fa4, data.document_attention=varlen) runs on CUDA in bf16/fp16 only;
    whether its package is installed is the workers' to say (a cluster's may differ from the driver's)."""
    uses_fa4 = [key for key, on in (("train.attention_kernel=fa4", job.train.attention_kernel == "fa4"),
                                    ("data.document_attention=varlen", job.data.packs_documents
                                     and job.data.document_attention == "varlen")) if on]
    if not uses_fa4:
        return
    if not uses_cuda(job.cluster):
        raise ConfigError(f"{uses_fa4[0]} runs FlashAttention-4, which needs CUDA workers (Hopper or Blackwell); use "
                          "train.attention_kernel=sdpa and data.document_attention=auto on CPU")
    if job.train.precision == "fp32":
        raise ConfigError(f"{uses_fa4[0]} runs FlashAttention-4, which takes bf16 or fp16, not train.precision=fp32; "
                          "use train.precision=bf16 or train.attention_kernel=sdpa")


def _check_memory_snapshot(job: JobConfig) -> None:
    """metrics.memory_snapshot_steps records CUDA's caching allocator: a CPU run has none to record."""
    if job.metrics.memory_snapshot_steps and not uses_cuda(job.cluster):
        raise ConfigError(f"metrics.memory_snapshot_steps ({job.metrics.memory_snapshot_steps}) records the CUDA "
                          "caching allocator and these workers run on CPU; set metrics.memory_snapshot_steps=0 or "
                          "cluster.use_gpu=true")


def _check_allocator(job: JobConfig) -> None:
    """train.allocator=planned replaces CUDA's allocator in the workers: CUDA workers only, and not with the
    caching allocator's own recorder; a local run builds the allocator here (a missing compiler is one line now,
    not a failed worker later)."""
    if job.train.allocator != "planned":
        return
    if not uses_cuda(job.cluster):
        raise ConfigError("train.allocator=planned replaces the CUDA allocator and these workers run on CPU; set "
                          "train.allocator=caching or cluster.use_gpu=true")
    if job.metrics.memory_snapshot_steps:
        raise ConfigError(f"metrics.memory_snapshot_steps ({job.metrics.memory_snapshot_steps}) records CUDA's "
                          "caching allocator, which train.allocator=planned replaces; set "
                          "metrics.memory_snapshot_steps=0 or train.allocator=caching")
    if job.cluster.address == "local":
        from orchestrator.memory import replay_allocator

        replay_allocator.library_path()


def _check_predictors(job: JobConfig) -> None:
    """A missing or mismatched token_elim.predictors file (local runs: a cluster's workers may see other files)."""
    if job.token_elim.enabled and job.token_elim.predictors and job.cluster.address == "local":
        from orchestrator.memory.token_elim_predictors import load_predictors

        load_predictors(job.token_elim.predictors, job.model, job.token_elim.block_size)


def _check_cluster_address(job: JobConfig) -> None:
    """ray://HOST:PORT (Ray Client), HOST:PORT or auto (the GCS) must answer us, token and all; `ray.init` would
    otherwise retry for 20-30 s and fail with a timeout or a traceback that does not name the cause."""
    if job.cluster.address != "local":
        from launch.ray_address_check import check_cluster_address

        check_cluster_address(job.cluster.address)


def _check_local_devices(job: JobConfig) -> None:
    """A local run's GPUs are this machine's: cluster.use_gpu=true needs one per worker (x gpus_per_worker)."""
    if job.cluster.address != "local" or not job.cluster.use_gpu:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    need = job.cluster.num_workers * job.cluster.gpus_per_worker
    if have < need:
        raise ConfigError(f"cluster.use_gpu=true needs {need} GPU(s) here ({job.cluster.num_workers} worker(s) x "
                          f"cluster.gpus_per_worker={job.cluster.gpus_per_worker}) and this machine has {have}; lower "
                          "cluster.num_workers or set cluster.use_gpu=false")


def _check_data(job: JobConfig) -> None:
    """The token file of data.source=tokens: there, of a whole number of tokens, with a training window. A jsonl,
    parquet or text source is prepared here (tokenized now unless its content hash is cached; for a cluster too:
    the driver reads the documents, the workers the prepared directory, which they must see) and its sequences
    checked the same way."""
    if job.data.source in TEXT_SOURCES:
        _prepare_documents(job)
        return
    if job.data.source != "tokens" or job.cluster.address != "local":
        return
    from orchestrator.data import TokenWindows, open_token_file

    TokenWindows(open_token_file(job.data.path, job.data.token_dtype), job.data.seq_len, job.data.holdout_fraction)


def _prepare_documents(job: JobConfig) -> None:
    from launch.prepare_command import ensure_prepared
    from orchestrator.data import prepared_windows

    if job.data.packs_documents and job.data.document_attention == "flex" and not uses_cuda(job.cluster):
        raise ConfigError("data.document_attention=flex needs CUDA workers (FlexAttention has no CPU backward); use "
                          "data.document_attention=auto or sdpa_mask on CPU")
    if (job.data.packs_documents and job.data.document_attention == "per_document" and uses_cuda(job.cluster)
            and job.train.precision == "fp32"):
        raise ConfigError("data.document_attention=per_document runs cuDNN's attention on CUDA workers, which takes "
                          "bf16 or fp16, not train.precision=fp32; use train.precision=bf16 or "
                          "data.document_attention=flex")
    prepared = ensure_prepared(job)
    print(prepared.report(job) if prepared.created else
          f"data       {prepared.directory} (prepared earlier: {prepared.summary['documents']:,} documents, "
          f"{prepared.summary['tokens']:,} tokens)", flush=True)
    prepared_windows(job.data, job.model.vocab_size)


def _check_profile(job: JobConfig) -> None:
    """metrics.hardware_profile names a profile that loads (auto: the one this machine's device maps to, when the
    driver sees the workers' devices)."""
    if job.metrics.hardware_profile == "auto" and job.cluster.address != "local":
        return  # the driver does not see the workers' devices: each worker checks the profile
    from orchestrator.trainer import profile_name
    from spec.hardware import load_profile

    load_profile(profile_name(job, uses_cuda(job.cluster)))


def _check_deepspeed_extra(job: JobConfig) -> None:
    """The generated DeepSpeed config with train.deepspeed_extra merged in, through DeepSpeed's own validation
    (`DeepSpeedConfig` runs without a process group; the world size is set to the job's)."""
    if not job.train.deepspeed_extra:
        return
    from orchestrator.ds_config import deepspeed_config

    with _stdout_silenced():  # DeepSpeed prints its accelerator choice on import
        from deepspeed.runtime.config import DeepSpeedConfig
    config = deepspeed_config(job, uses_cuda(job.cluster))

    class JobWorldConfig(DeepSpeedConfig):
        def _configure_train_batch_size(self):
            self.world_size = job.cluster.num_workers // int(config.get("sequence_parallel_size", 1))
            super()._configure_train_batch_size()

    try:
        with _stdout_silenced():  # DeepSpeed logs to stdout (e.g. a scheduler read before its first step)
            JobWorldConfig(config)
            _build_scheduler(config)
    except Exception as error:  # pydantic's ValidationError, AssertionError, ValueError, DeepSpeedConfigError, ...
        raise ConfigError(f"train.deepspeed_extra ({job.train.deepspeed_extra}) is refused by DeepSpeed: "
                          f"{_deepspeed_reason(error)}; fix or remove the key") from error


def _build_scheduler(config: dict) -> None:
    """The LR schedule as DeepSpeed's engine builds it (its parameters are checked only then), on a stand-in
    optimizer; and the optimizer type, which DeepSpeed looks up only in `initialize`."""
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    kind = str(config.get("optimizer", {}).get("type", "AdamW"))
    if kind.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, kind):
        raise ValueError(f"optimizer.type {kind!r} is neither a DeepSpeed optimizer nor one of torch.optim")
    scheduler = config.get("scheduler")
    if not scheduler:
        return
    name = scheduler.get("type")
    factory = getattr(lr_schedules, str(name), None) or getattr(torch.optim.lr_scheduler, str(name), None)
    if factory is None:
        raise ValueError(f"scheduler.type {name!r} is neither a DeepSpeed nor a torch LR scheduler")
    factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), **scheduler.get("params", {}))


def _deepspeed_reason(error: Exception) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):  # pydantic: one entry per bad field, with its location
        return "; ".join(f"{getattr(error, 'title', 'config')}.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                         for e in errors())
    text = " ".join(str(error).split())
    return text or type(error).__name__


@contextmanager
def _stdout_silenced():
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
