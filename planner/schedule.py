"""The buffers a plan allocates and when they live, for the two layout levels (MEMO's bi-level idea).

Level 1 is one layer's forward then backward (the same for every layer, so solved once): the token-wise
activations it creates, and the gradients its backward creates and frees op by op. Level 2 is the whole step:
forward of layer i at event i, the LM head + loss at event L, backward of layer i at event 2L - i; it places the
level-1 block (one unit, reused by every layer: its forward half before the head, its backward half after, so the
head's buffers may reuse its room), each layer's skeletal tensors (a checkpointed layer's input only) and the kept
token-wise share, the swap staging buffers, and the head's buffers.
"""

from typing import Dict, List, Sequence

from planner.cost_model import LayerCost
from spec.placement import Buffer
from spec.plan import LayerPlan, align
from spec.activations import ATTENTION_GROUP, LAYER_INPUT, TOKEN_WISE, token_ranges

# Level-1 events: forward ops 0..7, then swap-out / drop at 8, backward ops 8..17 (end exclusive).
_FORWARD_END = 8
_LEVEL1 = [  # name, start, end (exclusive): token-wise activations, then backward gradients
    ("attn_norm_out", 0, _FORWARD_END), ("q", 1, _FORWARD_END), ("k", 1, _FORWARD_END), ("v", 1, _FORWARD_END),
    ("attn_residual", 3, _FORWARD_END), ("mlp_norm_out", 4, _FORWARD_END), ("gate", 5, _FORWARD_END),
    ("up", 5, _FORWARD_END), ("silu_gate", 6, _FORWARD_END), ("gated", 6, _FORWARD_END),
    ("o_proj_out", 3, 4), ("down_out", 7, 8),
    # backward: restored activations (prefetched + recomputed) freed after their last use; the runtime restores
    # the MLP group at the first MLP backward op and the attention inputs just before the attention backward
    ("gated@bwd", 8, 10), ("silu_gate@bwd", 8, 11), ("up@bwd", 8, 11), ("gate@bwd", 8, 12),
    ("mlp_norm_out@bwd", 8, 13), ("attn_residual@bwd", 8, 14), ("q@bwd", 14, 16), ("k@bwd", 14, 16),
    ("v@bwd", 14, 16), ("attn_norm_out@bwd", 14, 17),
    ("grad_out", 8, 10), ("grad_gated", 9, 11), ("grad_silu_gate", 10, 12), ("grad_up", 10, 13),
    ("grad_gate", 11, 13), ("grad_mlp_norm_out", 12, 14), ("grad_attn_residual", 13, 15),
    ("grad_attn_out", 14, 16), ("grad_q", 15, 17), ("grad_k", 15, 17), ("grad_v", 15, 17),
    ("grad_q_accum_fp32", 15, 16),  # the flash backward accumulates dq in fp32
    ("grad_kv_expanded", 15, 16),  # and with grouped-query attention computes dk, dv for every query head first
    ("grad_attn_norm_out", 16, 18), ("grad_layer_input", 17, 18),
]
_BACKWARD_LIFETIMES = {"grad_out": (8, 13), "grad_attn_residual": (13, 17)}
_FUSED_SWIGLU_BACKWARD_LIFETIMES = {**_BACKWARD_LIFETIMES, "grad_gate": (10, 13)}
"""(start, end) in a layer's block, as a lent H200's memory trace of its backward shows them (256K tokens,
`docs/probes/bench_peak_snapshot.py`) and a CPU profile of the same layers confirms: the residual stream's gradient
is one buffer through the whole backward (autograd adds each branch's gradient into it in place: the layer
output's, then the attention residual's, then the layer input's), and a fused SwiGLU writes the gradients of gate
and up at once, beside the gradient of its output."""
_HIDDEN_SIZED = {"o_proj_out", "down_out", "grad_out", "grad_attn_residual", "grad_attn_out",
                 "grad_layer_input"}
_LEVEL1_TILED = [  # the MLP through DeepSpeed's TiledMLP: it saves its input only; tiles are tile-sized
    ("attn_norm_out", 0, _FORWARD_END), ("q", 1, _FORWARD_END), ("k", 1, _FORWARD_END), ("v", 1, _FORWARD_END),
    ("attn_residual", 3, _FORWARD_END), ("mlp_norm_out", 4, _FORWARD_END), ("o_proj_out", 3, 4),
    ("mlp_tile", 5, 6), ("mlp_out_tiles", 5, 7), ("down_out", 6, 8),  # TiledMLP concatenates its tiles' outputs
    ("mlp_norm_out@bwd", 8, 13), ("attn_residual@bwd", 8, 14), ("grad_out", 8, 11),
    ("grad_mlp_norm_out", 9, 14),  # TiledMLP's x_grad, filled tile by tile
    ("mlp_tile@bwd", 9, 11), ("grad_attn_residual", 13, 15),
    ("q@bwd", 14, 16), ("k@bwd", 14, 16), ("v@bwd", 14, 16), ("attn_norm_out@bwd", 14, 17),
    ("grad_attn_out", 14, 16), ("grad_q", 15, 17), ("grad_k", 15, 17), ("grad_v", 15, 17),
    ("grad_q_accum_fp32", 15, 16), ("grad_kv_expanded", 15, 16), ("grad_attn_norm_out", 16, 18),
    ("grad_layer_input", 17, 18),
]
_REPLAYED = [("attn_out@bwd", _FORWARD_END, 16), ("attn_lse@bwd", _FORWARD_END, 16)]
"""A checkpointed layer (`checkpoint_layer`): its replayed forward makes every saved tensor again at the start of
its backward, the attention output and log-sum-exp too; the replay's passing outputs live while it runs."""
_REPLAY_TRANSIENTS = ("down_out",)
"""The replay's passing output alive once all its saved tensors are: the layer's output (the attention's output
projection is freed before the MLP's tensors exist; a tiled MLP's work is skipped, `tiled_mlp.InputOnly`)."""
_TILE_COPIES = {"mlp_tile": 4, "mlp_tile@bwd": 8}
"""A tile's intermediates alive at once: forward (no_grad) gate, up, silu and product; backward those four
recomputed with autograd and their gradients (`planner.whole_job`)."""


def layer_block_buffers(layer: LayerCost, plain: bool = False, compact: LayerCost = None,
                        checkpoint: bool = False, part: str = "both") -> List[Buffer]:
    """Level 1: one layer's transient buffers, sized for all of its tokens.

    `plain`: the layer keeps everything (no hooks), so its forward's token-wise activations are the kept ones
    (level 2 counts them until its backward starts; counting them in the forward half too over-predicted the 32K
    and 64K keep-all peaks on an H100 by one layer's activations, +22% and +18%,
    profiles/runs/h100_sxm_2026-11-26_calibration.md). Its backward reads them in place and autograd frees each
    after its last use: the `@bwd` buffers, op by op as a split layer's restored tensors.
    `compact`: a compressed layer's costs; its activations (forward and restored) are the compact forms, the
    gradients stay full-size. `checkpoint`: the layer is checkpointed whole (`_REPLAYED`). `part`: both, or only
    the forward's or the backward's buffers (a checkpointed layer's two halves are placed apart at level 2)."""
    per_token = {t.name: t.bytes_per_token for t in layer.tensors}
    activation = {t.name: t.bytes_per_token for t in (compact or layer).tensors}
    attn_out = next(t for t in layer.tensors if t.name == "attn_out")
    hidden_bytes = attn_out.bytes_per_token / attn_out.share  # every token (a sparse layer scatters its rows back)
    buffers = []
    fused = "silu_gate" not in per_token  # a fused SwiGLU (train.elementwise=compiled) saves gate and up only
    lifetimes = _FUSED_SWIGLU_BACKWARD_LIFETIMES if fused else _BACKWARD_LIFETIMES
    for name, start, end in _level1(layer, checkpoint):
        if (part == "forward" and start >= _FORWARD_END) or (part == "backward" and start < _FORWARD_END):
            continue
        if plain and name in TOKEN_WISE:
            continue
        base = name.split("@")[0].removeprefix("grad_")
        if base == "silu_gate" and fused:
            continue  # one backward pass makes both their gradients, with no silu(gate) or its gradient in memory
        start, end = lifetimes.get(name, (start, end))  # as a memory trace of the backward shows them
        if name in _TILE_COPIES:
            buffers.append(Buffer(name=name, layer=-1, size_bytes=align(_TILE_COPIES[name] * layer.mlp_tile_bytes),
                                  start=start, end=end))
            continue
        if name.split("@")[0] in ("attn_out", "attn_lse"):
            size = per_token[name.split("@")[0]]
        elif name.split("@")[0] == "mlp_out_tiles":
            size = hidden_bytes
        elif name == "grad_q_accum_fp32":
            size = per_token["q"] * 4 / layer.element_bytes
        elif name == "grad_kv_expanded":
            size = gqa_expanded_bytes_per_token(layer, per_token)
            if not size:
                continue
        else:
            size = hidden_bytes if name.split("@")[0] in _HIDDEN_SIZED else (
                activation[base] if name in TOKEN_WISE or name.endswith("@bwd") else per_token[base])
        buffers.append(Buffer(name=name, layer=-1, size_bytes=align(size * layer.tokens), start=start, end=end))
    return buffers


_RESTORED = {f"{name}@bwd" for name in TOKEN_WISE}


def gqa_expanded_bytes_per_token(layer: LayerCost, per_token: Dict[str, float]) -> float:
    """With fewer key/value heads than query heads, what the attention backward allocates beyond dq, its fp32
    accumulator and the kv-sized dk, dv (level-1 events of their own): SDPA's kernels in half precision (cuDNN's on
    an H200, measured by `docs/probes/gqa_attention_backward_memory.py`; FlashAttention's `mha_bwd`) write dk and dv
    for every query head (two q-sized buffers) and sum them over each group after; FlashAttention-4 accumulates dk
    and dv over the group in fp32 buffers of kv size (`flash_attn.cute.interface._flash_attn_bwd`'s dk_accum,
    dv_accum). 0 without grouped queries, and in fp32 (a CPU plan: no flash kernel)."""
    grouped = per_token["k"] < per_token["q"] and layer.element_bytes == 2
    if not grouped:
        return 0.0
    if layer.attention_kernel == "fa4":
        return 2 * per_token["k"] * 4 / layer.element_bytes
    return 2 * per_token["q"]


def _level1(layer: LayerCost, checkpoint: bool) -> List[tuple]:
    """The level-1 events of a layer: plain or tiled MLP; checkpointed, every restored tensor from the start of
    backward (the replay makes them all at once) and the replay's passing outputs during it."""
    events = _LEVEL1_TILED if layer.mlp_tile_bytes else _LEVEL1
    if not checkpoint:
        return events
    replay = [(f"{name}@replay", _FORWARD_END, _FORWARD_END + 1) for name, _, _ in events
              if name in _REPLAY_TRANSIENTS]
    restored = [(name, _FORWARD_END if name.endswith("@bwd") and name in _RESTORED else start, end)
                for name, start, end in events]
    return restored + _REPLAYED + [("attn_out", 2, _FORWARD_END)] + replay


def layer_input_bytes(layer: LayerCost) -> float:
    """The layer's input: all a checkpointed layer keeps."""
    return sum(t.bytes_per_token for t in layer.tensors if t.name == LAYER_INPUT) * layer.tokens


def plain_sparse_skeletal_bytes(layer: LayerCost) -> float:
    """A layer's skeletal bytes when it keeps everything (no hooks): a token-eliminated one then saves its gathered
    input rows, not the whole input (nothing else holds it: the gather saves its indices only), so its input counts
    at the kept share. A CPU count of a sparse layer's saved storages (2,048 tokens, 12 of 32 blocks kept): 123,129
    bytes a token against 128,243 with the whole input, 123,123 with its kept rows."""
    return layer.skeletal_bytes - (1 - layer.keep_share) * layer_input_bytes(layer)


def keeps_everything(decisions: Sequence[LayerPlan]) -> bool:
    """Every layer plain (all tokens kept on the device): the level-1 block is `layer_block_buffers(plain=True)`."""
    return all(d.is_plain for d in decisions)


def kept_token_wise_bytes(layer: LayerCost, swap_fraction: float, recompute_fraction: float) -> int:
    """The kept share of a layer's token-wise tensors, each role aligned: the runtime packs them in this order, and
    splits each role's own rows (a sparse layer's attention roles: its kept tokens)."""
    seq = layer.tokens // layer.sequences
    if swap_fraction == 0 and recompute_fraction == 0:
        return align(layer.token_wise_bytes)
    total = 0
    for t in layer.tensors:
        if not t.skeletal:
            rows = round(t.share * seq)
            kept, _, _ = token_ranges(swap_fraction, recompute_fraction, rows)
            total += align(layer.sequences * kept * t.bytes_per_token / t.share)
    return total


def step_buffers(layers: Sequence[LayerCost], decisions: Sequence[LayerPlan], block_bytes: int, head_bytes: float,
                 compression_factor: Sequence[float], head_reuses_block: bool = False,
                 backward_block_bytes: int = 0, looked_up: Sequence[bool] = ()) -> List[Buffer]:
    """Level 2: buffers across the whole step, given each layer's cost (a compressed layer has smaller token-wise
    tensors, a token-eliminated one smaller attention tensors) and decision (keep, swap, offload_skeletal,
    checkpoint_layer). `head_reuses_block`: the layer block is two buffers, forward (`block_bytes`) and backward
    (`backward_block_bytes`, or the same), so the head's buffers may take its room (the planner's; a bench of
    layers alone, which has no head, keeps one). A checkpointed layer's input in host memory comes back when its
    own backward starts, not one layer ahead (`orchestrator.memory.tokenwise`). `looked_up`: per layer, a
    checkpointed layer's input is looked up again in its replay (`spec.activations.input_looked_up_again`): it
    exists only during that layer's backward."""
    num_layers = len(decisions)
    last = 2 * num_layers + 1
    block = ([Buffer("layer_block", -1, align(block_bytes), 0, num_layers),
              Buffer("layer_block@bwd", -1, align(backward_block_bytes or block_bytes), num_layers + 1, last)]
             if head_reuses_block else [Buffer("layer_block", -1, align(block_bytes), 0, last)])
    buffers = block + [Buffer("head_and_loss", -1, align(head_bytes), num_layers, num_layers + 1)]
    for i, (layer, decision) in enumerate(zip(layers, decisions)):
        forward, backward = i, 2 * num_layers - i
        _, swapped_tokens, _ = token_ranges(decision.swap_fraction, decision.recompute_fraction,
                                            layer.tokens // layer.sequences)
        swapped = align(swapped_tokens / (layer.tokens // layer.sequences) * layer.token_wise_bytes
                        * compression_factor[i])
        kept = kept_token_wise_bytes(layer, decision.swap_fraction, decision.recompute_fraction)
        if decision.checkpoint_layer:
            skeletal = align(layer_input_bytes(layer))
        else:
            skeletal = align(plain_sparse_skeletal_bytes(layer) if decision.is_plain else layer.skeletal_bytes)
        if decision.checkpoint_layer and i < len(looked_up) and looked_up[i]:
            buffers.append(Buffer("input_again", i, skeletal, backward, backward + 1))
        elif decision.offload_skeletal:
            buffers += [Buffer("skeletal_out", i, skeletal, forward, forward + 2),
                        Buffer("skeletal_in", i, skeletal, backward - (not decision.checkpoint_layer), backward + 1)]
        else:
            buffers.append(Buffer("skeletal", i, skeletal, forward, backward + 1))
        if kept:  # a split layer's kept share is in the runtime's arena, allocated once for the whole run; a plain
            # layer's lives until its backward, where the block's `@bwd` buffers free it op by op
            buffers.append(Buffer("kept_token_wise", i, kept, *((0, last) if not decision.is_plain
                                                               else (forward, backward))))
        if swapped:
            buffers += swap_buffers(layer, decision, i, num_layers, swapped)
    return [b for b in buffers if b.size_bytes > 0]


def swap_buffers(layer: LayerCost, decision: LayerPlan, i: int, num_layers: int, swapped: int) -> List[Buffer]:
    """A swapping layer's device copies of its swapped bytes: the sources held while they are copied out (through
    the next layer's forward), and the prefetched slices from the backward above until they are restored.

    The last layer of the forward is fetched when its own backward starts and reads the sources still held
    (`SwapStream.take_held`): one set of bytes from its forward on, not a copy out and a prefetch at once. A layer
    swapped whole copies out the forward's own tensors (in that forward, the layer block's) and reads its fetched
    bytes in place (`tokenwise._fetch_whole`): in its backward they are the restored tensors the layer block
    counts, but the attention group's, restored only when the attention backward is reached
    (`spec.activations.ATTENTION_GROUP`)."""
    forward, backward = i, 2 * num_layers - i
    last = i == num_layers - 1
    out_end, fetch_start = (backward, backward) if last else (forward + 2, backward - 1)
    if not _read_in_place(decision):  # a slice is copied to a block of its own: both exist at the forward's end
        return [Buffer("swap_out_staging", i, swapped, forward, out_end),
                Buffer("prefetch_staging", i, swapped, fetch_start, backward + 1)]
    staging = [Buffer("swap_out_staging", i, swapped, forward + 1, out_end)]  # in its forward: the block's tensors
    token_wise = {t.name: t.bytes_per_token for t in layer.tensors if not t.skeletal}
    attention = sum(token_wise.get(name, 0.0) for name in ATTENTION_GROUP) / sum(token_wise.values())
    return staging + [Buffer("prefetch_staging", i, swapped, fetch_start, backward),
                      Buffer("prefetch_staging@attention", i, align(swapped * attention), backward, backward + 1)]


def _read_in_place(decision: LayerPlan) -> bool:
    """Every token swapped, as they are (`tokenwise._swapped_whole`)."""
    return decision.swap_fraction >= 1.0 and decision.swap_codec != "int8"
