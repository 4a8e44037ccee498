"""The worker's model before DeepSpeed gets it: where its weights are first made, the base weights, the adapters.

Why one place: a full 8B model is 32 GB in fp32, and a worker that builds it on the host in fp32 before DeepSpeed
casts, moves and partitions it needs that much host memory for nothing. Three cases:
- plain jobs (no LoRA, no offload): built as always, fp32 on the host, then DeepSpeed moves and casts it, so their
  weights (and every test that compares them) stay exactly as they were;
- parameter offload (`train.offload.params`, ZeRO-3): built under `deepspeed.zero.Init`, which partitions each
  parameter into pinned host memory as soon as its module is made (ZeRO-Infinity's way), so no worker ever holds
  the whole model; weights from `model.init_from` are then copied in one gathered parameter at a time;
- LoRA or optimizer offload on a GPU: built on the GPU in the training dtype (bf16): the host never holds the
  model, and the frozen base never exists in fp32.
Then `model.init_from` is loaded (for LoRA also on resume: the checkpoint holds only the adapters) and LoRA's
adapters are added (`orchestrator.lora`).
"""

from contextlib import contextmanager
from typing import Any, Dict

import torch
from torch import nn

from orchestrator import lora
from orchestrator.checkpoint import load_init_from
from orchestrator.model import LlamaModel
from spec.config import JobConfig
from spec.errors import ConfigError


def build_model(job: JobConfig, use_cuda: bool, ds_config: Dict[str, Any], load_base: bool) -> nn.Module:
    """The model with its base weights (from model.init_from when load_base) and LoRA adapters if configured."""
    if job.train.offload.params:
        model = _partitioned_model(job, ds_config, load_base)
    else:
        with _built_on(_device(job, use_cuda), _dtype(ds_config, job, use_cuda)):
            model = LlamaModel(job.model)
        if load_base and job.model.init_from:
            load_init_from(model, job.model.init_from, trust=job.checkpoint.trust_pickles)
    if job.model.lora.enabled:
        model = lora.apply_lora(model, job.model.lora)
        model.lora_base = lora.base_record(job.model, job.train.seed)
    return model


def _device(job: JobConfig, use_cuda: bool) -> torch.device:
    """The GPU for LoRA and offload jobs on GPUs; the host otherwise (plain jobs: as before)."""
    if use_cuda and (job.model.lora.enabled or job.train.offload.any):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype(ds_config: Dict[str, Any], job: JobConfig, use_cuda: bool) -> torch.dtype:
    if use_cuda and (job.model.lora.enabled or job.train.offload.any) and ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    return torch.float32


@contextmanager
def _built_on(device: torch.device, dtype: torch.dtype):
    """Parameters made inside are allocated on `device` in `dtype` (torch's default device and dtype, restored)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _partitioned_model(job: JobConfig, ds_config: Dict[str, Any], load_base: bool) -> nn.Module:
    """ZeRO-3 with parameter offload: each parameter is partitioned to pinned host memory as it is made."""
    import deepspeed

    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="cpu", pin_memory=True, dtype=dtype):
        model = LlamaModel(job.model)
    # the model's own initialisation ran on parameters zero.Init had already emptied: run it again, each whole
    model.reset_parameters(lambda param: deepspeed.zero.GatheredParameters([param], modifier_rank=0))
    if load_base and job.model.init_from:
        _load_partitioned(model, job)
    return model


def _load_partitioned(model: nn.Module, job: JobConfig) -> None:
    """model.init_from into a partitioned model, one parameter gathered at a time (safetensors read tensor by
    tensor; a DeepSpeed source is consolidated on the host first, as `load_init_from` does)."""
    import deepspeed

    params = dict(model.named_parameters())
    for name, tensor in init_from_tensors(job.model.init_from, job.checkpoint.trust_pickles):
        param = params.get(name)
        if param is None:  # a tied lm_head (it is the embedding)
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))


def init_from_tensors(spec: str, trust: bool):
    """(our name, tensor) of model.init_from, one at a time; the driver has checked names and shapes."""
    from pathlib import Path

    from orchestrator.checkpoint import resolve_tag
    from orchestrator.checkpoint.weights import (is_safetensors_source, longtrain_name, read_deepspeed_weights,
                                                 safetensors_files)

    path, _, tag = spec.partition(":")
    if is_safetensors_source(Path(path)):
        from safetensors import safe_open

        for file in safetensors_files(Path(path)):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if longtrain_name(key):
                        yield longtrain_name(key), handle.get_tensor(key)
        return
    checkpoint_dir, tag = resolve_tag(Path(path), tag, f"model.init_from={spec}")
    for key, tensor in read_deepspeed_weights(checkpoint_dir, tag, trust).items():
        if longtrain_name(key):
            yield longtrain_name(key), tensor


def initialize_engine(model: nn.Module, ds_config: Dict[str, Any], offload):
    """deepspeed.initialize with only the trainable parameters in the optimizer (LoRA: the adapters). An offloaded
    optimizer needs DeepSpeed's CPU Adam, a C++ extension DeepSpeed builds on first use: a failed build is one line."""
    import deepspeed

    try:
        return deepspeed.initialize(model=model, model_parameters=lora.trainable_parameters(model), config=ds_config)
    except (RuntimeError, ImportError, OSError) as error:
        if offload.optimizer and "cpu_adam" in str(error).lower():
            gist = " ".join(str(error).split())[:160]
            raise ConfigError(f"train.offload.optimizer needs DeepSpeed's CPU Adam, which could not be built here "
                              f"({gist}); install a C++ compiler and ninja, or DeepSpeed built with "
                              "DS_BUILD_CPU_ADAM=1, or set train.offload.optimizer=false") from error
        raise
