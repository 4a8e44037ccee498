"""The one function that turns our typed config into DeepSpeed's config dict.

Why one function: users never edit DeepSpeed JSON; everything DeepSpeed sees is derived here from the job, so a
run is reproducible from its YAML. `train.deepspeed_extra` is the documented escape hatch, merged last.
"""

import copy
from typing import Any, Dict

from spec.config import ClusterConfig, JobConfig
from spec.activations import ZERO_BUCKET_ELEMENTS


def uses_cuda(cluster: ClusterConfig) -> bool:
    """cluster.use_gpu, or (unset) whether this process sees CUDA."""
    import torch

    return torch.cuda.is_available() if cluster.use_gpu is None else cluster.use_gpu


def resolve_precision(requested: str, use_cuda: bool) -> str:
    """auto: bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and the demo measures the real thing)."""
    if requested == "auto":
        return "bf16" if use_cuda else "fp32"
    return requested


def deepspeed_config(job: JobConfig, use_cuda: bool, load_universal: bool = False) -> Dict[str, Any]:
    """load_universal: the checkpoint to resume is a universal one (converted for another data-parallel size)."""
    optim, train = job.optim, job.train
    config = {
        "train_micro_batch_size_per_gpu": job.data.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": resolve_precision(train.precision, use_cuda) == "bf16"},
        "zero_optimization": {
            "stage": train.zero_stage,
            "overlap_comm": use_cuda,
            "contiguous_gradients": True,
            "reduce_bucket_size": ZERO_BUCKET_ELEMENTS,
            "allgather_bucket_size": ZERO_BUCKET_ELEMENTS,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": optim.schedule_steps or train.max_steps, "warmup_num_steps": optim.warmup_steps,
                       "warmup_min_ratio": 0.0, "cos_min_ratio": optim.min_lr_ratio, "warmup_type": "linear"},
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    _add_offload(config, train)
    return deep_merge(config, train.deepspeed_extra)


def _add_offload(config: Dict[str, Any], train) -> None:
    """ZeRO-Offload / ZeRO-Infinity as DeepSpeed documents them (`zero_optimization.offload_optimizer` and
    `offload_param`, device cpu, pinned). An offloaded optimizer is stepped by DeepSpeed's CPU Adam, which
    DeepSpeed picks for an Adam-type optimizer only when `torch_adam` is off; the ALST recipe offloads the
    optimizer unless a frozen LoRA base leaves almost nothing to optimize."""
    zero = config["zero_optimization"]
    if train.offload.optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        config["optimizer"]["params"]["torch_adam"] = False
    if train.offload.params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}


def deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    """base with extra's keys written over it, recursing into nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
