"""GPU block scoring for token elimination: LeMo's tile maxima in one Triton kernel (its `flash_block.py` idea).

Why: the chunked torch path writes every q.k logit of a chunk to memory, upcasts, rectifies, sums over heads and
reduces, several memory passes over H x N^2 / 2 values; on an H100 that was 203 ms per Llama-7B layer at 32K
tokens, more than the layer's whole forward and backward. Here each program owns one key block J and a range of
query blocks I >= J; per (I, J) tile it accumulates sum_h ReLU(q_i^h . k_j^h) over heads in registers, takes the
tile's maximum (causal inside the diagonal tile) and adds it to a register sum, so no logit leaves the chip. Each
program writes one partial column sum; the partials are added in a fixed order, so scores are deterministic and a
recomputed forward keeps the same blocks.
"""

import torch
import triton
import triton.language as tl

QUERY_SPLITS = 8
"""Query-block ranges per key block (more programs than key blocks alone at short sequences)."""


@triton.jit
def _column_partials(q_ptr, k_ptr, out_ptr, sqb, sqh, sqs, skb, skh, sks, num_blocks, per_split, scale,
                     HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr, DIM: tl.constexpr):
    key_block, split, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, dims = tl.arange(0, BLOCK), tl.arange(0, DIM)
    first = tl.maximum(key_block, split * per_split)
    last = tl.minimum(num_blocks, (split + 1) * per_split)
    total = 0.0
    for query_block in range(first, last):
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for head in range(HEADS):
            q = tl.load(q_ptr + batch * sqb + head * sqh + (query_block * BLOCK + rows)[:, None] * sqs + dims[None, :])
            k = tl.load(k_ptr + batch * skb + (head // GROUP) * skh + (key_block * BLOCK + rows)[:, None] * sks
                        + dims[None, :])
            acc += tl.maximum(tl.dot(q, tl.trans(k)), 0.0)
        causal = (query_block > key_block) | (rows[:, None] >= rows[None, :])
        total += tl.max(tl.max(tl.where(causal, acc, 0.0), axis=1), axis=0) * scale
    tl.store(out_ptr + (batch * tl.num_programs(1) + split) * num_blocks + key_block, total)


def block_column_sums(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """sum over I >= J of the tile maxima, [B, num_blocks] fp32, from q [B, H, S, D] and k [B, Hkv, S, D] on CUDA
    (the last dimension contiguous; D a power of two)."""
    batch, heads, seq, dim = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    num_blocks = seq // block
    splits = min(QUERY_SPLITS, num_blocks)
    per_split = -(-num_blocks // splits)
    partials = torch.empty(batch, splits, num_blocks, device=q.device, dtype=torch.float32)
    grid = (num_blocks, splits, batch)
    _column_partials[grid](q, k, partials, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                           k.stride(2), num_blocks, per_split, dim ** -0.5, HEADS=heads,
                           GROUP=heads // k.shape[1], BLOCK=block, DIM=dim, num_warps=4)
    return partials.sum(1)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
