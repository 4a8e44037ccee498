"""Host bytes of DeepSpeed's offloaded optimizer (ZeRO-Offload) and offloaded parameters (ZeRO-Infinity), for one
rank, buffer by buffer as DeepSpeed 0.19.8 allocates them (`deepspeed/runtime/zero/stage_1_and_2.py`, `stage3.py`,
`ops/adam/cpu_adam.py`).

Why buffer by buffer, not 16 bytes a parameter: DeepSpeed keeps a model-dtype copy next to the fp32 master weights
and gradients (18 bytes a parameter in bf16, 20 in fp32), and on a GPU every buffer it pins is one block of
PyTorch's pinned-memory caching allocator (`accelerator.pin_memory` -> `Tensor.pin_memory()` ->
`CachingHostAllocator`), which rounds each block up to a power of two (`c10::llvm::PowerOf2Ceil` in
`ATen/core/CachingHostAllocator.h`). The Llama-3.2-3B shape fully fine-tuned on one H200 (ZeRO-2) held 64.3 GiB
for its optimizer against the 47.9 GiB that 16 bytes a parameter gave; these buffers give 64.9 GiB. On CPU workers
`pin_memory` is a no-op (DeepSpeed's CPU accelerator), so nothing is rounded there.

Checked on CPU against a real engine (`tests/test_offload_host.py`: the walked storages match to the byte); the
rounding and ZeRO-2's total on a GPU against the 3B run; ZeRO-3's GPU-only terms (the per-sub-group rounding, the
trainable parameters' zero.Init blocks left in PyTorch's pinned cache) are read from the source, not measured.
Left out: buffers of a few elements (overflow flags, norms) and ZeRO-3's largest-sub-group fp32 gradient scratch
(`stage3.py:1306`, freed when `initialize_optimizer_states` returns).
"""

from dataclasses import dataclass
from typing import List, Tuple

from spec.config import JobConfig, ModelConfig

MODEL_DTYPE = 0
"""`HostBuffer.bytes_per_element` of a buffer in the model's dtype (2 in bf16, 4 in fp32)."""
DEFAULT_SUB_GROUP_SIZE = int(1e9)
"""DeepSpeed's `zero_optimization.sub_group_size` default (`runtime/zero/config.py`): ZeRO-3 cuts a rank's
parameter partitions into sub-groups of at least this many elements, one fp32 gradient buffer each."""


@dataclass(frozen=True)
class HostBuffer:
    """One host buffer: its bytes per element, whether DeepSpeed pins it (a power-of-two block on a GPU), and its
    extent: `partition` (one flat buffer over the rank's partition), `sub_group` (one per ZeRO-3 sub-group),
    `largest` (the largest trainable parameter), `each_parameter` (one per trainable parameter the rank's partition
    touches, whole), `each_frozen_parameter` / `each_trainable_parameter_cached` (one per parameter partition)."""

    name: str
    bytes_per_element: int
    pinned: bool
    extent: str


ZERO_1_2_OPTIMIZER_OFFLOAD: Tuple[HostBuffer, ...] = (
    HostBuffer("fp32 master weights (single_partition_of_fp32_groups)", 4, True, "partition"),
    HostBuffer("model-dtype copy for the upload (param_buffer_of_bit16_for_cpu_offload_groups)", MODEL_DTYPE, True,
               "partition"),
    HostBuffer("fp32 gradients (single_partition_of_fp32_groups[i].grad)", 4, True, "partition"),
    HostBuffer("Adam exp_avg and exp_avg_sq (DeepSpeedCPUAdam state, fp32)", 8, False, "partition"),
    HostBuffer("gradient staging of the largest parameter (temp_grad_buffer_for_cpu_offload)", MODEL_DTYPE, True,
               "largest"),
)
"""ZeRO stage 1 and 2 with `offload_optimizer` (device cpu, pin_memory true), DeepSpeed 0.19.8: master weights
cloned in fp32 and pinned (stage_1_and_2.py:560-565); a model-dtype buffer of the partition, pinned, that CPU Adam
writes the updated weights into before they go back to the GPU (:566-575); the fp32 gradient partition, pinned
(`initialize_optimizer_states`, :937-941); CPU Adam's two moments in fp32, unpinned (`torch.zeros_like`,
ops/adam/cpu_adam.py:161-164); one pinned buffer of the largest trainable parameter's size in the model dtype
(:653-658). 18 bytes a parameter in bf16 before rounding, 20 in fp32."""
ZERO_1_2_ACCUMULATION = HostBuffer("each parameter's accumulated gradient (accumulated_grads_in_cpu)", MODEL_DTYPE,
                                   True, "each_parameter")
"""With train.grad_accum_steps > 1, stage 1-2 offload keeps each of its parameters' gradients between micro-batches
in a pinned model-dtype buffer of the whole parameter (stage_1_and_2.py:1822-1825, 1852-1853, 2161-2167)."""
ZERO_3_OPTIMIZER_OFFLOAD: Tuple[HostBuffer, ...] = (
    HostBuffer("fp32 master weights (fp32_partitioned_groups_flat)", 4, False, "sub_group"),
    HostBuffer("fp32 gradients (fp32_partitioned_groups_flat[i].grad)", 4, True, "sub_group"),
    HostBuffer("gradient partitions in the accumulation dtype (grad_partitions_flat_buffer)", MODEL_DTYPE, True,
               "partition"),
    HostBuffer("Adam exp_avg and exp_avg_sq (DeepSpeedCPUAdam state, fp32)", 8, False, "sub_group"),
)
"""ZeRO stage 3 with `offload_optimizer` (device cpu, pin_memory true), DeepSpeed 0.19.8: each sub-group's master
weights converted to fp32 on the host, unpinned (stage3.py:1157-1160); each sub-group's fp32 gradient, pinned
(`initialize_optimizer_states`, :1337-1342); the reduced gradient partitions in the gradient-accumulation dtype (the
model dtype unless `data_types.grad_accum_dtype` is set), one pinned buffer (:791-795); CPU Adam's moments in fp32.
18 bytes a parameter in bf16 before rounding, 20 in fp32."""
ZERO_3_PARAMETER_OFFLOAD: Tuple[HostBuffer, ...] = (
    HostBuffer("model-dtype partitions of the trainable parameters (param_groups_fp16_flat_cpu_memory)", MODEL_DTYPE,
               True, "partition"),
    HostBuffer("zero.Init's partition of each frozen parameter", MODEL_DTYPE, True, "each_frozen_parameter"),
    HostBuffer("zero.Init's partition of each trainable parameter, freed into PyTorch's pinned cache", MODEL_DTYPE,
               True, "each_trainable_parameter_cached"),
)
"""ZeRO stage 3 with `offload_param` (device cpu, pin_memory true), the model built under `deepspeed.zero.Init`
(`orchestrator.build`): zero.Init pins each parameter's partition on its own (partition_parameters.py:1842-1843);
ZeRO-3 then copies the trainable ones into one pinned flat buffer per parameter group (stage3.py:899-907, 972-981,
`_move_to_flat_buffer`) and frees their first blocks, which on a GPU stay in PyTorch's pinned cache (its `free`
keeps a block in its free list until the cache is emptied: read from the source, not yet measured on a GPU); a
frozen parameter (a LoRA base) keeps its zero.Init block."""


def base_numels(model: ModelConfig) -> List[int]:
    """Elements of each parameter of the model in the order `orchestrator.model.LlamaModel` registers them: the
    order ZeRO cuts its partitions and sub-groups in."""
    h, kv, inter = model.hidden_size, model.num_kv_heads * model.head_dim, model.intermediate_size
    bias = {"q_proj": h, "k_proj": kv, "v_proj": kv} if model.qkv_bias else {}
    layer = [h]  # attn_norm
    for name, (i, o) in _projections(h, kv, inter).items():
        layer += [i * o] + ([bias[name]] if name in bias else [])
        if name == "o_proj":
            layer.append(h)  # mlp_norm
    head = [] if model.tie_embeddings else [h * model.vocab_size]
    return [model.vocab_size * h] + layer * model.num_layers + [h] + head


def adapter_numels(model: ModelConfig) -> List[int]:
    """Elements of each LoRA adapter matrix (peft's lora_A then lora_B of each targeted projection, in order)."""
    if not model.lora.enabled:
        return []
    h, kv, inter = model.hidden_size, model.num_kv_heads * model.head_dim, model.intermediate_size
    rank, targets = model.lora.rank, set(model.lora.target_modules)
    layer = [n for name, (i, o) in _projections(h, kv, inter).items() if name in targets for n in (rank * i, o * rank)]
    return layer * model.num_layers


def trainable_numels(model: ModelConfig) -> List[int]:
    """The optimizer's parameters: the adapters under LoRA, else every parameter."""
    return adapter_numels(model) if model.lora.enabled else base_numels(model)


def _projections(h: int, kv: int, inter: int) -> dict:
    """(in, out) features of each projection of a layer, in the order the layer registers them."""
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def pinned_block_bytes(nbytes: int, rounded: bool) -> int:
    """A pinned buffer's host bytes: PyTorch's pinned caching allocator's power-of-two block on a GPU."""
    if not rounded or nbytes <= 0:
        return max(nbytes, 0)
    return 1 << (nbytes - 1).bit_length()


def _partition(total: int, ranks: int) -> int:
    """One rank's elements of a flat group padded to 2 x ranks elements (stage_1_and_2.py:440-446)."""
    alignment = 2 * ranks
    return -(-total // alignment) * alignment // ranks


def _sub_groups(numels: List[int], ranks: int, sub_group_size: int) -> List[int]:
    """ZeRO-3's sub-groups of one rank: parameter partitions (ceil(numel / ranks), partition_parameters.py:1690-1696)
    added in order until a sub-group reaches sub_group_size (stage3.py:1213-1231)."""
    groups, current = [], 0
    for numel in numels:
        current += -(-numel // ranks)
        if current >= sub_group_size:
            groups.append(current)
            current = 0
    return groups + ([current] if current else [])


def _in_partition(numels: List[int], ranks: int) -> List[int]:
    """Stage 1-2: the parameters a rank's partition touches (each whole: `accumulated_grads_in_cpu` holds the whole
    parameter), for the rank whose parameters sum the most."""
    part, best, offset = _partition(sum(numels), ranks), [], 0
    for rank in range(ranks):
        start, end = rank * part, (rank + 1) * part
        touched, offset = [], 0
        for numel in numels:
            if offset < end and offset + numel > start:
                touched.append(numel)
            offset += numel
        best = max(best, touched, key=sum)
    return best


def _buffer_bytes(buffer: HostBuffer, element_bytes: int, extents: dict, rounded: bool) -> int:
    per_element = buffer.bytes_per_element or element_bytes
    rounded = rounded and buffer.pinned
    return sum(pinned_block_bytes(per_element * n, rounded) for n in extents[buffer.extent])


def offload_host_buffers(job: JobConfig, element_bytes: int, cuda: bool) -> List[Tuple[str, int]]:
    """(name, bytes) of each host buffer one rank's offloaded optimizer and parameters hold. `cuda`: the workers
    train on GPUs (DeepSpeed's pin_memory page-locks, in power-of-two blocks); on CPU workers it does nothing."""
    offload, ranks, model = job.train.offload, job.cluster.num_workers, job.model
    trainable, frozen = trainable_numels(model), (base_numels(model) if model.lora.enabled else [])
    zero = job.train.deepspeed_extra.get("zero_optimization", {})
    split = [-(-n // ranks) for n in trainable]  # ZeRO-3 partitions each parameter
    extents = {"largest": [max(trainable)],
               "sub_group": _sub_groups(trainable, ranks, int(zero.get("sub_group_size", DEFAULT_SUB_GROUP_SIZE))),
               "each_parameter": _in_partition(trainable, ranks) if job.train.grad_accum_steps > 1 else [],
               "each_frozen_parameter": [-(-n // ranks) for n in frozen],
               "each_trainable_parameter_cached": split if cuda else []}
    buffers: Tuple[HostBuffer, ...] = ()
    if offload.optimizer and job.train.zero_stage < 3:
        extents["partition"] = [_partition(sum(trainable), ranks)]
        buffers = ZERO_1_2_OPTIMIZER_OFFLOAD + (ZERO_1_2_ACCUMULATION,)
    elif offload.optimizer:
        extents["partition"] = [sum(split)]
        buffers = ZERO_3_OPTIMIZER_OFFLOAD
    if offload.params:
        extents["partition"] = [sum(split)]
        buffers += ZERO_3_PARAMETER_OFFLOAD
    return [(b.name, _buffer_bytes(b, element_bytes, extents, cuda)) for b in buffers]


def offload_host_bytes(job: JobConfig, element_bytes: int, cuda: bool) -> int:
    """Host bytes one rank's offloaded optimizer and parameters hold (`offload_host_buffers`, summed)."""
    return sum(nbytes for _, nbytes in offload_host_buffers(job, element_bytes, cuda))
