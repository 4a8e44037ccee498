"""What a whole job costs beyond its layers' activations: LoRA's frozen base and adapters, the optimizer and the
parameters offloaded to host memory (DeepSpeed ZeRO-Offload / ZeRO-Infinity), the tiled MLP, and the host
memory of the machine that has to hold them.

Why apart from the layer model: these change the static bytes on the GPU (a frozen base has no gradients and no
optimizer state; an offloaded optimizer leaves only the reduce buckets), add a fixed host footprint that comes
before any swapped activation, and add time outside the layers (the CPU Adam step, not overlapped with the GPU's
next forward in DeepSpeed 0.19.8). Counts, per GPU:
- LoRA (Hu et al., arXiv 2106.09685): base weights in the activation dtype, no gradients, no optimizer state;
  adapters r x (in + out) per targeted projection, with their gradients and Adam states (12 bytes each in mixed
  precision); backward of a frozen projection computes the input gradient only (1x its forward, not 2x).
- Offloaded optimizer and parameters: the host buffers DeepSpeed 0.19.8 allocates for them, buffer by buffer
  (`planner.offload_host`: 18 bytes a trainable parameter in bf16 before a GPU's power-of-two pinned blocks), split
  over the ZeRO ranks; with parameter offload (ZeRO-3) the GPU holds what DeepSpeed gathers at once, at most
  `stage3_max_live_parameters` (1e9 by default).
- Tiled MLP: the MLP saves only its input, runs its forward once more in backward, and holds one tile's
  intermediates (`tile x intermediate_size`, hidden_size tokens a tile) instead of the sequence's.
"""

from dataclasses import dataclass
from typing import Tuple

from planner.offload_host import offload_host_bytes
from spec.activations import ZERO_BUCKET_ELEMENTS, lora_adapter_bytes_per_token, tiled_mlp_saved_tensors
from spec.config import JobConfig, ModelConfig
from spec.flops import layer_matmul_params, parameter_count
from spec.hardware import HardwareProfile
from spec.units import GIB

MAX_LIVE_PARAMETERS = int(1e9)
"""DeepSpeed's default stage3_max_live_parameters: what ZeRO-3 keeps gathered on the GPU at once."""
DEFAULT_CPU_ADAM_PARAMS_PER_SECOND = 1.0e9
"""Without a measurement (`longtrain profile hardware`): DeepSpeed's CPU Adam on a 16-core AVX-512 host, an
estimate (ZeRO-Offload, arXiv 2101.06840, reports 1B parameters in about 1 s on 2 x 16 cores)."""
MLP_TILE_FORWARD_COPIES = 4
"""A tile's forward (no_grad): gate, up, silu(gate) and their product alive at once at most."""
MLP_TILE_BACKWARD_COPIES = 8
"""A tile's backward: the four intermediates recomputed with autograd and their four gradients."""


def lora_parameter_count(model: ModelConfig) -> int:
    """The adapters' parameters: rank x (in + out) for every targeted projection of every layer."""
    lora = model.lora
    if not lora.enabled:
        return 0
    h, kv, inter = model.hidden_size, model.num_kv_heads * model.head_dim, model.intermediate_size
    widths = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h, "gate_proj": h + inter,
              "up_proj": h + inter, "down_proj": inter + h}
    return model.num_layers * lora.rank * sum(widths[name] for name in lora.target_modules)


def _mlp_share(model: ModelConfig) -> float:
    return 3 * model.hidden_size * model.intermediate_size / layer_matmul_params(model)


def layer_cost(cost, tensors, matmul_seconds: float, attention_seconds: float, scoring_seconds: float,
               keep_share: float, exchange_seconds: float = 0.0, elementwise_seconds: float = 0.0):
    """`CostModel.layer` for a LoRA layer and/or a tiled MLP (times and inventory as the module docstring says;
    `exchange_seconds`: Ulysses' all-to-all, once in forward and once in backward, `LayerCost.exchange_seconds`;
    `elementwise_seconds`: the forward's memory-bound extras, `cost_model.LayerOverhead`, twice that in backward
    whatever the weights: they are the activations' passes)."""
    from planner.cost_model import BACKWARD_TO_FORWARD, LayerCost

    model, tokens = cost.model, cost.tokens_per_gpu
    adapters = 2.0 * lora_parameter_count(model) / model.num_layers * tokens / (cost.matmul_tflops() * 1e12)
    weight_grads = 0.0 if model.lora.enabled else 1.0
    forward = matmul_seconds + attention_seconds + scoring_seconds + adapters + exchange_seconds + elementwise_seconds
    backward = ((1.0 + weight_grads) * matmul_seconds + BACKWARD_TO_FORWARD * (attention_seconds + elementwise_seconds)
                + BACKWARD_TO_FORWARD * adapters + exchange_seconds)
    recompute, tile_bytes, mlp = matmul_seconds + adapters + elementwise_seconds, 0.0, 0.0
    if cost.job.train.tiled_mlp:
        tensors = tiled_mlp_saved_tensors(tensors)
        mlp = (matmul_seconds + elementwise_seconds) * _mlp_share(model)  # a checkpointed layer's replay skips it too
        backward += mlp  # each tile's forward again, with gradients
        recompute -= mlp  # recomputation stops at the MLP's input
        tile_bytes = min(tile_tokens(model), tokens) * model.intermediate_size * cost.element_bytes
    return LayerCost(
        forward_seconds=forward, backward_seconds=backward, recompute_seconds=recompute,
        skeletal_bytes=sum(t.bytes_per_token for t in tensors if t.skeletal) * tokens,
        token_wise_bytes=sum(t.bytes_per_token for t in tensors if not t.skeletal) * tokens,
        tensors=tensors, tokens=tokens, element_bytes=cost.element_bytes,
        sequences=cost.job.data.micro_batch_size, keep_share=keep_share, mlp_tile_bytes=tile_bytes,
        replay_seconds=forward - mlp, exchange_seconds=exchange_seconds,
        attention_kernel=cost.job.train.attention_kernel)


def tile_tokens(model: ModelConfig) -> int:
    """ALST's tile length, the runtime's (`orchestrator.memory.tiled_mlp`): hidden_size tokens."""
    return model.hidden_size


def trainable_parameter_count(model: ModelConfig) -> int:
    return lora_parameter_count(model) if model.lora.enabled else parameter_count(model)


def trained_states(cost, zero_stage: int) -> Tuple[float, float, float, float]:
    """(parameters, gradients, optimizer states, ZeRO buckets) on one GPU under LoRA and/or offload."""
    model, n, low = cost.model, cost.world_size, cost.element_bytes
    master = 0 if cost.precision == "fp32" else 4
    every = parameter_count(model) + lora_parameter_count(model)
    trainable = trainable_parameter_count(model)
    offload = cost.job.train.offload
    if offload.params:
        parameters = low * min(MAX_LIVE_PARAMETERS, every)
    else:
        parameters = low * every / (n if zero_stage >= 3 else 1)
    gradients = 0.0 if offload.optimizer else low * trainable / (n if zero_stage >= 2 else 1)
    optimizer = 0.0 if offload.optimizer else (master + 8) * trainable / (n if zero_stage >= 1 else 1)
    buckets = 2 * min(ZERO_BUCKET_ELEMENTS, trainable) * low if zero_stage >= 1 else 0
    return parameters, gradients, optimizer, buckets


def adapter_activation_bytes(cost) -> float:
    """What LoRA's adapters keep whole on the GPU over the step, every layer."""
    per_token = lora_adapter_bytes_per_token(cost.model, cost.element_bytes, cost.job.train.tiled_mlp)
    return per_token * cost.tokens_per_gpu * cost.model.num_layers


def host_static_bytes(job: JobConfig, element_bytes: int, cuda: bool) -> float:
    """Host bytes one GPU's process holds for the offloaded optimizer and parameters (before activations); `cuda`:
    the workers train on GPUs, where DeepSpeed's pinned buffers are power-of-two blocks (`planner.offload_host`)."""
    return float(offload_host_bytes(job, element_bytes, cuda))


def optimizer_step_seconds(cost) -> float:
    """Seconds the offloaded optimizer adds to a step: gradients to the host (fp32), DeepSpeed's CPU Adam, updated
    weights back (activation dtype); not overlapped with the GPU in DeepSpeed 0.19.8. 0 without offload (the GPU
    Adam step is left out of every plan's time, as before)."""
    if not cost.job.train.offload.optimizer:
        return 0.0
    params = trainable_parameter_count(cost.model) / cost.world_size
    rate = cost.profile.measured.cpu_adam_params_per_second or DEFAULT_CPU_ADAM_PARAMS_PER_SECOND
    return params / rate + params * (4 + cost.element_bytes) / cost.pcie_bytes_per_second()


@dataclass
class HostMemory:
    """Host memory of one node and where the figure comes from (said in the plan and in every refusal)."""

    gib: float
    source: str


def host_memory(job: JobConfig, profile: HardwareProfile) -> HostMemory:
    """plan.host_memory_gib, else the profile's: measured by `longtrain profile hardware`, or a datasheet value,
    which is right only when planning for another machine, so the plan says so."""
    if job.plan.host_memory_gib is not None:
        return HostMemory(job.plan.host_memory_gib, "plan.host_memory_gib")
    if profile.source.startswith("measured"):
        return HostMemory(profile.host_memory_gib, f"measured by `longtrain profile hardware` (profile {profile.name})")
    if profile.host_memory_source != "datasheet":
        return HostMemory(profile.host_memory_gib, f"profile {profile.name}: {profile.host_memory_source}")
    return HostMemory(profile.host_memory_gib, f"profile {profile.name}'s datasheet value, for planning another "
                                               "machine; set plan.host_memory_gib or measure this one with "
                                               "`longtrain profile hardware`")


def host_budget_bytes(job: JobConfig, profile: HardwareProfile) -> float:
    """A node's host memory x plan.host_memory_fraction, split over its GPUs (the policy's budget before offload)."""
    gpus_per_node = min(profile.devices_per_node, job.cluster.num_workers)
    return host_memory(job, profile).gib * GIB * job.plan.host_memory_fraction / gpus_per_node

