"""The saved-tensor inventory: what a decoder layer keeps for backward, by role, and how a layer's tokens are split.

Why one definition: the planner sizes every saved tensor (bytes per token, skeletal or token-wise) and the runtime
tags the same tensors by role to keep, swap or recompute their token ranges. A role renamed on one side only
would silently break a plan; both sides import the names and the byte counts from here. Torch-free.

Classes (MEMO): *skeletal* tensors are kept for every token because recomputing them would repeat the quadratic
attention (the layer input, the attention output and its log-sum-exp); *token-wise* tensors are split per layer
into kept / swapped / recomputed token ranges.
"""

from dataclasses import dataclass
from typing import List, Tuple

from spec.config.schema import ModelConfig

LAYER_INPUT, ATTN_OUT = "layer_input", "attn_out"
ATTN_NORM_OUT, Q, K, V = "attn_norm_out", "q", "k", "v"
ATTN_RESIDUAL, MLP_NORM_OUT, GATE, UP, SILU_GATE, GATED = ("attn_residual", "mlp_norm_out", "gate", "up", "silu_gate",
                                                           "gated")
"""The roles: the names the model tags its intermediates with (`orchestrator.model`), the token-wise runtime splits
and the planner sizes. Spelled here only."""
SKELETAL = (LAYER_INPUT, ATTN_OUT)
"""Skeletal roles the runtime tags (the attention's log-sum-exp, also skeletal, is saved by the kernel itself)."""
TOKEN_WISE = (ATTN_NORM_OUT, Q, K, V, ATTN_RESIDUAL, MLP_NORM_OUT, GATE, UP, SILU_GATE, GATED)
"""Token-wise roles in forward order."""
ATTENTION_GROUP = (ATTN_NORM_OUT, Q, K, V)
"""Restored (and recomputed) only when the attention backward is reached: backward runs the MLP part first, so
the two groups are never restored at the same time, which bounds a layer's backward working set."""
HEAD_MAJOR = frozenset({Q, K, V, ATTN_OUT})
"""Roles laid out [B, H, S, D] (tokens on dim 2); the others are [B, S, F] (tokens on dim 1)."""
COMPACT = ".compact"
"""Suffix of a role holding a compressed layer's compact form of a tensor (int8 or packed 4-bit codes, or sampled
rows); split by token like the tensor itself, so a swap moves 2x / 4x / 1 / keep_ratio fewer bytes."""
ATTENTION_BLOCK = ("attn_out", "attn_lse", "attn_norm_out", "q", "k", "v")
"""The saved tensors a token-eliminated layer makes for its kept rows only (`orchestrator.memory.token_elim`)."""

LOSS_CHUNK_TOKENS = 8192
"""Tokens per LM-head + cross-entropy segment (the full tokens x vocab logits never exist); the planner budgets
one chunk's logits."""
ZERO_BUCKET_ELEMENTS = int(2e8)
"""DeepSpeed reduce / all-gather bucket size (elements): the DeepSpeed config sets it, the planner counts it."""

FRACTION_DECIMALS = 4
"""Plan files carry fractions rounded to this many decimals; layouts are computed from the rounded values."""


def input_looked_up_again(layer_index: int, zero_stage: int) -> bool:
    """A layer replayed whole whose input is the embedding's output (layer 0) keeps nothing of it: the replay looks
    the token ids up again (`orchestrator.memory.tokenwise.EmbeddingSource`; exact, the embedding does not change
    within a step). Not under ZeRO-3, whose partitioned embedding weight is whole only inside its module's call."""
    return layer_index == 0 and zero_stage < 3


def token_ranges(swap_fraction: float, recompute_fraction: float, seq_len: int) -> Tuple[int, int, int]:
    """(kept, swapped, recomputed) tokens of a sequence; swap and recompute rounded to whole tokens, the rest kept."""
    swapped = int(round(swap_fraction * seq_len))
    recomputed = min(seq_len - swapped, int(round(recompute_fraction * seq_len)))
    return seq_len - swapped - recomputed, swapped, recomputed


def kept_blocks(keep_ratio: float, num_blocks: int) -> int:
    """Blocks a token-eliminated layer keeps of a sequence's `num_blocks` (at least one): the runtime's rule and the
    planner's, so a sparse layer's planned bytes are the ones it stores."""
    return min(num_blocks, max(1, int(keep_ratio * num_blocks + 1e-6)))


@dataclass(frozen=True)
class SavedTensor:
    name: str
    bytes_per_token: float
    """Per token of the layer's sequence (a sparse layer's attention tensors: averaged over all its tokens)."""
    skeletal: bool
    share: float = 1.0
    """Share of the layer's tokens the tensor has rows for (a sparse layer's attention tensors: the kept ones);
    the runtime splits each tensor's own rows into kept / swapped / recomputed ranges."""


def layer_saved_tensors(model: ModelConfig, bytes_per_element: int, fused_swiglu: bool = False) -> List[SavedTensor]:
    """What one decoder layer saves for backward, per token on this GPU (Ulysses keeps per-GPU bytes equal).
    fused_swiglu (train.elementwise=compiled): SwiGLU saves its gate and up only and recomputes silu(gate) in
    backward, so silu_gate is not saved."""
    h, kv, inter = model.hidden_size, model.num_kv_heads * model.head_dim, model.intermediate_size
    e = bytes_per_element
    width = {"layer_input": h, "attn_out": h, "attn_norm_out": h, "q": h, "k": kv, "v": kv, "attn_residual": h,
             "mlp_norm_out": h, "gate": inter, "up": inter, "silu_gate": inter, "gated": inter}
    # The output projection's input is a view of attn_out (SDPA writes B,S,H,D), so it costs nothing extra.
    skeletal = [SavedTensor(name, width[name] * e, True) for name in SKELETAL]
    lse = SavedTensor("attn_lse", model.num_heads * 4, True)  # saved by the attention kernel, fp32 per head
    return skeletal + [lse] + [SavedTensor(name, width[name] * e, False) for name in TOKEN_WISE
                               if not (fused_swiglu and name == SILU_GATE)]


MLP_INTERMEDIATES = (GATE, UP, SILU_GATE, GATED)
"""What a tiled MLP (`orchestrator.memory.tiled_mlp`) never saves: it keeps only its input."""


def tiled_mlp_saved_tensors(tensors: List[SavedTensor]) -> List[SavedTensor]:
    """A layer's inventory when its MLP runs tiled (DeepSpeed's TiledMLP): the MLP's intermediates are gone."""
    return [t for t in tensors if t.name not in MLP_INTERMEDIATES]


def lora_adapter_bytes_per_token(model: ModelConfig, bytes_per_element: int, tiled_mlp: bool) -> float:
    """Per token and layer, what LoRA adds that the token-wise runtime does not split: each adapter's lora_B saves
    its rank-wide input (lora_A's output) whole on the GPU; a tiled MLP's adapters save nothing outside a tile.
    (lora_A saves the projection's input, the very tensor the layer tags.)"""
    lora = model.lora
    if not lora.enabled:
        return 0.0
    mlp = ("gate_proj", "up_proj", "down_proj")
    counted = [name for name in lora.target_modules if not (tiled_mlp and name in mlp)]
    return len(counted) * lora.rank * bytes_per_element


SAMPLED_ROW_BYTES = 12
"""Per token row a WTA-CRS sample keeps: its int64 index and fp32 importance weight."""


def compressed_saved_tensors(model: ModelConfig, bytes_per_element: int, compression) -> List[SavedTensor]:
    """`layer_saved_tensors` for a layer under the job's `compression` section, as orchestrator/memory/compressed.py
    stores them (tests/test_compression.py checks the sums against saved-tensor hooks); per-group scales (64 B a
    tensor) are left out. The int8/int4 forms are also what a swap of these roles would move over PCIe."""
    h, inter, e = model.hidden_size, model.intermediate_size, bytes_per_element
    linear = 1 if compression.linear_inputs == "int8" else e
    keep = compression.wta_crs_keep_ratio
    row_extra = SAMPLED_ROW_BYTES if keep < 1 else 0
    norm = 1 if compression.norm_inputs == "int8" else e
    silu = compression.silu
    changed = {"layer_input": h * norm, "attn_residual": h * norm,
               "attn_norm_out": keep * (h * linear + row_extra), "mlp_norm_out": keep * (h * linear + row_extra),
               "gated": keep * (inter * linear + row_extra),
               "gate": inter * {"none": e, "int8": 1, "int4": 0.5}[silu],
               "up": inter * (e if silu == "none" else linear), "silu_gate": inter * e if silu == "none" else 0}
    return [SavedTensor(t.name, changed.get(t.name, t.bytes_per_token), t.skeletal)
            for t in layer_saved_tensors(model, bytes_per_element)]


def sparse_saved_tensors(tensors: List[SavedTensor], model: ModelConfig, bytes_per_element: int,
                         keep_share: float) -> List[SavedTensor]:
    """A token-eliminated layer's inventory under the token-wise runtime: the attention block's tensors cover the
    kept share of the tokens, the layer input (which recomputation needs) and the MLP half every token; the kept
    rows' int64 index and their gathered cos/sin rows are kept whole (skeletal). Without a split the layer saves
    its gathered input rows instead of the full input (less by (1 - share) x the input): counted as the split's."""
    scaled = [SavedTensor(t.name, t.bytes_per_token * keep_share, t.skeletal, keep_share)
              if t.name in ATTENTION_BLOCK else t for t in tensors]
    index_and_rope = keep_share * (8 + 2 * model.head_dim * bytes_per_element)
    return scaled + [SavedTensor("kept_index_rope", index_and_rope, True, keep_share)]
