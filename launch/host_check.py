"""Driver checks for the whole job on this machine: its host memory holds what the plan and the offload put there,
DeepSpeed's CPU Adam can be built for an offloaded optimizer, and peft is there for LoRA.

Why on the driver: a plan made for another machine (a datasheet's 2 TB of host memory, say) fails on this one only
when pinned allocations run out mid-step, and a CPU Adam that cannot build fails in every worker after DeepSpeed
started; here each is one line before Ray starts. Host memory is checked for local runs (the machine is this one).
"""

import psutil

from spec.config import JobConfig
from spec.errors import ConfigError
from spec.plan import PlanError
from spec.units import GIB


def check_whole_job(job: JobConfig) -> None:
    if job.model.lora.enabled:
        _check_peft()
    if job.train.offload.optimizer:
        _check_cpu_adam()
    if job.cluster.address == "local":
        check_host_memory(job, psutil.virtual_memory().total / GIB)


def check_host_memory(job: JobConfig, machine_gib: float) -> None:
    """The plan's host bytes per GPU (swapped activations and offloaded states; without a plan the offloaded states)
    times this node's workers must fit the machine's memory."""
    per_gpu, what = _host_need_gib(job)
    need = per_gpu * job.cluster.num_workers
    if need > machine_gib:
        fix = (f"re-plan with plan.host_memory_gib={int(machine_gib)}" if job.plan.path else
               "shorten data.seq_len or spread the job over more nodes")
        raise PlanError(f"this machine has {machine_gib:.1f} GiB of host memory and the job needs {need:.1f} GiB "
                        f"({what}, {per_gpu:.1f} GiB per GPU x {job.cluster.num_workers} worker(s)); {fix}, or run "
                        "where the host is larger")


def _host_need_gib(job: JobConfig):
    """(GiB per GPU, what they hold): the plan's predicted host bytes, or the offloaded states, plus the layer inputs
    DeepSpeed's checkpointing keeps in host memory (deepspeed_cpu, alst)."""
    from orchestrator.ds_config import resolve_precision, uses_cuda
    from planner.whole_job import host_static_bytes

    element = 2 if resolve_precision(job.train.precision, uses_cuda(job.cluster)) == "bf16" else 4
    if job.plan.path:
        from pathlib import Path

        from spec.plan import load_plan

        return load_plan(Path(job.plan.path)).predicted.get("host_gib", 0.0), f"the plan {job.plan.path}"
    need = host_static_bytes(job, element) / GIB
    what = ["offloaded optimizer and parameters"] if need else []
    if job.train.activation_checkpointing in ("deepspeed_cpu", "alst"):
        dims = job.parallel_dims()
        need += job.model.num_layers * dims.tokens_per_rank * job.model.hidden_size * element / GIB
        what.append("every layer's input")
    return need, " and ".join(what)


def _check_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"model.lora needs the peft library ({error}); pip install peft, or set "
                          "model.lora.rank=0") from error


def _check_cpu_adam() -> None:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if not CPUAdamBuilder().is_compatible(verbose=False):
        raise ConfigError("train.offload.optimizer needs DeepSpeed's CPU Adam, which cannot be built on this machine "
                          "(DeepSpeed's op builder reports it incompatible: a C++ compiler and ninja are needed); "
                          "install them or set train.offload.optimizer=false")
