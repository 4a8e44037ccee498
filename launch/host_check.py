"""Driver checks for the whole job on this machine: its host memory holds what the plan and the offload put there,
DeepSpeed's CPU Adam can be built for an offloaded optimizer, and peft is there for LoRA.

Why on the driver: a plan made for another machine (a datasheet's 2 TB of host memory, say) fails on this one only
when pinned allocations run out mid-step, and a CPU Adam that cannot build fails in every worker after DeepSpeed
started; here each is one line before the workers start. A local run's host memory is this machine's (checked
before Ray starts); a cluster run's (`submit`, `cluster.address`) is that of each Ray node the workers may land on,
from the node resources Ray reports once the driver is connected (`check_cluster_host_memory`).
"""

from typing import Dict, List

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


def node_host_memory_gib(resources: Dict[str, float]) -> float:
    """A Ray node's host memory as Ray reports it (`ray.nodes()`' Resources): Ray splits the memory free when the
    node started into its `memory` resource (70% by default) and the object store (30%); their sum."""
    return (resources.get("memory", 0.0) + resources.get("object_store_memory", 0.0)) / GIB


def check_cluster_host_memory(job: JobConfig, nodes: List[dict], use_gpu: bool) -> None:
    """Every alive Ray node the workers may land on (`ray.nodes()` entries) must hold their host bytes: the plan's
    (or the offload's) bytes per GPU times the workers that fit on that node, at most cluster.num_workers (one
    under STRICT_SPREAD)."""
    from launch.placement import workers_that_fit

    per_gpu, what = _host_need_gib(job)
    if not per_gpu:
        return
    cluster = job.cluster
    for node in nodes:
        resources = node.get("Resources", {})
        fits = workers_that_fit(cluster, [resources], use_gpu)
        workers = min(fits, 1 if cluster.placement_strategy == "STRICT_SPREAD" else cluster.num_workers)
        have = node_host_memory_gib(resources)
        if workers and per_gpu * workers > have:
            where = node.get("NodeManagerAddress") or node.get("NodeID", "?")
            fix = (f"re-plan with plan.host_memory_gib={int(round(have, 6))}" if job.plan.path else  # Ray's floats
                   "shorten data.seq_len or spread the job over more nodes")
            raise PlanError(f"Ray node {where} has {have:.1f} GiB of host memory (its memory + object_store_memory "
                            f"resources) and {workers} worker(s) may land on it, which need {per_gpu * workers:.1f} "
                            f"GiB ({what}, {per_gpu:.1f} GiB per GPU); {fix}, or use nodes with more memory")


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
    need = host_static_bytes(job, element, uses_cuda(job.cluster)) / GIB
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
