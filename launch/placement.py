"""Can the cluster hold the job's workers? Checked on the driver right after connecting, in one line.

Why: Ray Train waits forever for resources that never come: a GPU job on a cluster without GPUs, or workers
asking for more GPUs than any one node has (a worker cannot span nodes), just hangs with no message.
"""

from typing import Dict, List

from spec.config import ClusterConfig
from spec.errors import LongtrainError

Node = Dict[str, float]
"""One alive node's total resources, as Ray reports them (CPU, GPU, memory, ...)."""


def workers_that_fit(cluster: ClusterConfig, nodes: List[Node], use_gpu: bool) -> int:
    """How many workers of this shape the nodes hold (STRICT_PACK: on the best single node)."""
    per_node = []
    for node in nodes:
        fits = int(node.get("CPU", 0) // cluster.cpus_per_worker)
        if use_gpu:
            fits = min(fits, int(node.get("GPU", 0) // cluster.gpus_per_worker))
        per_node.append(fits)
    if cluster.placement_strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if cluster.placement_strategy == "STRICT_SPREAD":
        return sum(1 for fits in per_node if fits > 0)
    return sum(per_node)


def check_capacity(cluster: ClusterConfig, nodes: List[Node], use_gpu: bool, where: str) -> None:
    """Raise one line naming what the job asks, what the cluster has and the fix, if the workers cannot fit."""
    fits = workers_that_fit(cluster, nodes, use_gpu)
    if fits >= cluster.num_workers:
        return
    gpus = sum(node.get("GPU", 0) for node in nodes)
    cpus = sum(node.get("CPU", 0) for node in nodes)
    shape = f"{cluster.cpus_per_worker} CPU" + (f" + {cluster.gpus_per_worker} GPU" if use_gpu else "")
    has = f"{len(nodes)} node(s) with {cpus:g} CPUs and {gpus:g} GPUs in all"
    if use_gpu and gpus == 0:
        fix = "set cluster.use_gpu=false to train on CPUs, or point cluster.address at a cluster with GPUs"
    elif cluster.placement_strategy.startswith("STRICT"):
        fix = f"use cluster.placement_strategy=PACK, or set cluster.num_workers={max(fits, 1)}"
    else:
        fix = f"set cluster.num_workers={max(fits, 1)} or smaller cluster.cpus_per_worker/gpus_per_worker"
    raise LongtrainError(f"cluster.num_workers={cluster.num_workers} workers of {shape} "
                         f"({cluster.placement_strategy}) do not fit {where}: {has}, room for {fits}; {fix}")
