"""Causal attention within documents through the fused kernel every causal layer runs (cuDNN's on a GPU): one call
per document on its document's slice, all written into one output (`data.document_attention=per_document`).

Why: on an H200 at 128K tokens, FlexAttention with a document block mask runs at 0.73x cuDNN's causal rate on the
FLOPs the documents need (mean document 16K); one cuDNN call per document runs at 0.92x there, but each call costs
about 1.7 ms more, so it is 0.19x where documents are short (mean 2K)
(profiles/runs/h200_2026-12-01_document_masking_candidates*.md).

Why an autograd Function over the kernel's own forward and backward ops rather than SDPA per document and a
concatenation: autograd would keep each call's output beside the concatenated one, a second attention output per
layer that the token-wise runtime does not plan. Here the layer saves what SDPA saves: q, k, v, the output and the
log-sum-exps (one per call).

Why windows: cuDNN compiles a graph per sequence length and every micro-batch brings new document lengths, so each
call's window is its document extended to a multiple of `BUCKET` tokens where the row has them. Causal attention
keeps the document's rows blind to the extension; the extension's rows are dropped in the forward and get zero
gradient in the backward, so the result is exact and the calls share at most seq_len / BUCKET shapes.

On CPU the same Function runs over PyTorch's CPU flash kernel, so the slicing, windows and gradients are tested
where there is no GPU.
"""

from typing import Iterator, List, Sequence, Tuple

import torch

BUCKET = 1024
"""Window granularity in tokens (see the module docstring)."""


def windows(lengths: Sequence[int], seq_len: int, bucket: int = BUCKET) -> Iterator[Tuple[int, int, int]]:
    """(start, end, stop) per segment of one row: the segment is [start, end), its call's window [start, stop)."""
    start = 0
    for length in lengths:
        end = start + length
        stop = min(seq_len, start + -(-length // bucket) * bucket) if bucket else end
        yield start, end, stop
        start = end


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Causal attention of one window: (output, log-sum-exp, what the backward op needs besides)."""
    if q.is_cuda:
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError(f"data.document_attention=per_document runs cuDNN's attention, which takes bf16 or "
                               f"fp16, not {str(q.dtype).replace('torch.', '')}: train.precision=bf16, or "
                               "data.document_attention=flex")
        out, lse, _, _, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False)
        return out, lse, (seed, offset, max_q, max_k)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse, None


def _backward(grad, q, k, v, out, lse, extra):
    if extra is not None:
        seed, offset, max_q, max_k = extra
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, None, None, max_q, max_k, 0.0, True)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True)


class _PerDocument(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rows):
        batch, heads, seq, _ = q.shape
        out = torch.empty(batch, seq, heads, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        lses, extras = [], []
        for b, spans in enumerate(rows):
            for start, end, stop in spans:
                part, lse, extra = _forward(*(t[b:b + 1, :, start:stop] for t in (q, k, v)))
                out[b:b + 1, :, start:end].copy_(part[:, :, :end - start])
                lses.append(lse)
                extras.append(extra)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.rows, ctx.extras = rows, extras
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, *lses = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (q, k, v)]
        calls = iter(zip(lses, ctx.extras))
        for b, spans in enumerate(ctx.rows):
            for start, end, stop in spans:
                lse, extra = next(calls)
                grad_part = grad[b:b + 1, :, start:stop]
                if stop > end:  # the extension's rows: dropped in the forward, so no gradient flows from them
                    grad_part = grad_part.clone()
                    grad_part[:, :, end - start:] = 0
                window = [t[b:b + 1, :, start:stop] for t in (q, k, v, out)]
                for whole, part in zip(grads, _backward(grad_part, *window, lse, extra)):
                    whole[b:b + 1, :, start:end] = part[:, :, :end - start]
        return (*grads, None)


def per_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: List[List[int]],
                           bucket: int = BUCKET) -> torch.Tensor:
    """q [B, H, S, D], k and v [B, Hkv, S, D]; lengths: per row, its segments in order (summing to S) ->
    [B, H, S, D], each token attending causally within its segment."""
    seq = q.shape[2]
    for row in lengths:
        if sum(row) != seq:
            raise ValueError(f"document lengths sum to {sum(row)}, not the sequence's {seq} tokens")
    rows = tuple(tuple(windows(row, seq, bucket)) for row in lengths)
    return _PerDocument.apply(q, k, v, rows)
