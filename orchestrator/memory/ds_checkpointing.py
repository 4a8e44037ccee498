"""DeepSpeed's activation checkpointing of whole layers: the baseline a memory plan is measured against.

Each layer saves only its input (on the GPU, or in host memory with `in_cpu`, DeepSpeed's `checkpoint_in_cpu`) and
runs its forward again in backward, attention included.
"""

import os
from dataclasses import dataclass
from typing import Iterable

import torch

from orchestrator.process_group import init_process_group
from spec.errors import ConfigError


@dataclass
class Config:
    """`train.activation_checkpointing`: deepspeed (inputs kept on the GPU), deepspeed_cpu or alst (in host
    memory; alst also tiles the MLP and the loss, `tiled_mlp` and `tiled_loss`)."""

    in_cpu: bool = False

    @classmethod
    def of(cls, mode: str) -> "Config":
        return cls(in_cpu=mode in ("deepspeed_cpu", "alst"))


def check_supported(mode: str, use_cuda: bool) -> None:
    """deepspeed_cpu needs GPUs: deepspeed 0.19.8 copies a CPU input to the host with a no-op `.to("cpu")` and then
    empties it, so the input is lost. Called by the driver before Ray starts and by each worker."""
    if mode in ("deepspeed_cpu", "alst") and not use_cuda:
        raise ConfigError(f"train.activation_checkpointing={mode} needs GPUs (DeepSpeed loses the host copies "
                          "of CPU tensors); use train.activation_checkpointing=deepspeed on CPU")


def deepspeed_layer_runner(num_layers: int, in_cpu: bool):
    """A `runner(layer, x, cos, sin)` that checkpoints the layer with DeepSpeed. DeepSpeed's checkpointing needs
    its process group, even in one process (a benchmark): a one-rank group on loopback is made if none exists.
    The reentrant `checkpoint`, not `non_reentrant_checkpoint`: its first forward runs without autograd, so a
    compressed layer packs its saved inputs (and moves their running ranges) once a step, in the replay."""
    import deepspeed

    check_supported("deepspeed_cpu" if in_cpu else "deepspeed", torch.cuda.is_available())
    if not torch.distributed.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", "29517")):
            os.environ.setdefault(key, value)
        init_process_group(torch.cuda.is_available())
    deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=in_cpu,
                                      contiguous_checkpointing=False, num_checkpoints=num_layers)
    # cos and sin go in by closure: DeepSpeed's blocking host-copy path (CPU) empties every floating-point argument
    # after copying it, and the position tables are shared by all layers
    return lambda layer, x, cos, sin: deepspeed.checkpointing.checkpoint(lambda hidden: layer(hidden, cos, sin),
                                                                         _grad_carrier(x))


def _grad_carrier(x: torch.Tensor) -> torch.Tensor:
    """x, made to require a gradient if it does not: DeepSpeed's (reentrant) checkpoint backpropagates into a layer
    only when an input requires a gradient, and with LoRA's frozen embedding none does (Hugging Face's
    enable_input_require_grads, for the same reason); the gradient reaching it is dropped."""
    if torch.is_grad_enabled() and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


def apply(model, config: Config, layers: Iterable[int]) -> None:
    """Checkpoint these layers with DeepSpeed (the model's `layer_runner`); the others run as they are."""
    chosen = {id(model.layers[index]) for index in layers}
    checkpointed = deepspeed_layer_runner(len(chosen), in_cpu=config.in_cpu)
    model.layer_runner = lambda layer, x, cos, sin: (checkpointed(layer, x, cos, sin) if id(layer) in chosen
                                                     else layer(x, cos, sin))
