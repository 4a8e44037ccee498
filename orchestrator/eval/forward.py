"""The forward evaluation runs at length: the model's own modules, one layer at a time, with each layer's per-token
work (norms, q/k/v projections and RoPE, output projection, residual adds, the MLP) done in chunks of positions and
attention run once over the whole sequence through a fused SDPA kernel (flash, cuDNN or memory-efficient on a GPU:
O(S) memory; never the math kernel's S x S scores).

Why not the model's `hidden_states`: written for training, it keeps each layer's per-token intermediates for the
whole sequence at once (RMSNorm's fp32 upcasts, raw and rotated q/k, and four S x intermediate MLP tensors), which
for a Llama-2-7B shape at 1M tokens in bf16 is 110 GiB of activations on top of 12.6 GiB of weights
(`orchestrator.eval.memory`). Here only q, k, v and the attention output exist for the whole sequence, the residual
stream is updated in place, and nothing is saved for backward (inference mode): 40.6 GiB of activations. Every op but attention acts on each position alone, so the
chunks give the same numbers (up to the matmuls' summation order)."""

from typing import Iterator, Tuple

import torch
from torch import nn

from orchestrator.model import merge_heads, rope_tables

POSITION_CHUNK = 16384
"""Positions whose per-token intermediates exist at once: at 7B widths about 1.4 GiB of MLP intermediates in bf16,
small next to the sequence-long q, k, v, while matmuls of 16K rows still run at full speed."""


@torch.inference_mode()
def hidden_states(model: nn.Module, tokens: torch.Tensor, chunk: int = POSITION_CHUNK) -> torch.Tensor:
    """The final-norm hidden states [B, S, hidden] of `model` (a `LlamaModel` without memory techniques or packed
    documents: one causal sequence per row, positions 0..S-1), equal to `model.hidden_states(tokens)`."""
    config = model.config
    x = model.embed(tokens)
    cos, sin = rope_tables(torch.arange(tokens.shape[1], device=tokens.device), config.head_dim, config.rope_theta,
                           x.dtype, config.rope_scaling)
    for layer in model.layers:
        layer_forward(layer, x, cos, sin, chunk)
    for start, end in spans(x.shape[1], chunk):
        x[:, start:end] = model.norm(x[:, start:end])
    return x


def layer_forward(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int) -> None:
    """One `DecoderLayer` on the residual stream x [B, S, hidden], which it overwrites with the layer's output."""
    attn = layer.attn
    batch, seq, _ = x.shape
    # q, k, v laid out [B, S, heads, D] and seen as [B, heads, S, D]: what the projections' views give SDPA
    q = x.new_empty(batch, seq, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = x.new_empty(batch, seq, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = torch.empty_like(k)
    for start, end in spans(seq, chunk):
        q[:, :, start:end], k[:, :, start:end], v[:, :, start:end] = attn.project(
            layer.attn_norm(x[:, start:end]), cos[start:end], sin[start:end])
    with fused_attention(x.device):
        out = attn.attend(q, k, v)
    del q, k, v
    for start, end in spans(seq, chunk):
        residual = x[:, start:end] + attn.o_proj(merge_heads(out[:, :, start:end]))
        x[:, start:end] = residual + layer.mlp(layer.mlp_norm(residual))


def fused_attention(device: torch.device):
    """On a GPU, SDPA limited to its fused kernels (O(S) memory); elsewhere SDPA's own choice (the CPU's flash
    kernel for causal attention without a mask)."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def spans(length: int, chunk: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, length, chunk):
        yield start, min(start + chunk, length)
