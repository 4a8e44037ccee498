"""FlashAttention-4 (the `flash-attn-4` package's CuTe-DSL kernels, Hopper and Blackwell) for causal sequences and for
packed documents (`train.attention_kernel=fa4`).

Why: on an H200 at 128K tokens (Llama-3-8B heads, bf16, forward + backward) FA4's causal kernel runs 1.14x cuDNN's
(PyTorch SDPA's choice there), and its variable-length kernel runs every document of a packed sequence in one call at
1.11x cuDNN's causal rate on the FLOPs the documents need (mean document 16K; 0.90x at mean 2K), where FlexAttention
runs 0.71x / 0.57x (`profiles/runs/h200_2026-12-02_fa4_attention.md`). It takes grouped-query heads without
repeating them and compiles nothing per document length.

Layout: the model's q, k, v are [B, H, S, D] views of [B, S, H, D] storage (the projections' output), which is FA4's
own layout, so the kernel reads them in place and autograd saves the very tensors the token-wise runtime tagged (it
finds saved tensors by storage); the output comes back [B, S, H, D] and is returned as a [B, H, S, D] view, as SDPA's
is. The package is optional: where it cannot run, `unavailable` says why in one line (checked once, by
`orchestrator.attention.install`, not on every call).
"""

from typing import List, Optional

import torch

INSTALL = "pip install flash-attn-4 (with nvidia-cutlass-dsl for CUDA 12 or 13)"
_KERNELS = None


def unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why FA4 cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"FlashAttention-4 runs on CUDA GPUs, not {device.type}"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"FlashAttention-4 needs a Hopper or Blackwell GPU (compute capability 9.0+), not {major}.x"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"FlashAttention-4 takes bf16 or fp16, not {str(dtype).replace('torch.', '')}: train.precision=bf16"
    try:
        kernels()
    except ImportError as error:
        return f"the flash-attn-4 package is not importable ({type(error).__name__}: {error}): {INSTALL}"
    return None


def kernels():
    """flash_attn.cute's (flash_attn_func, flash_attn_varlen_func), imported once."""
    global _KERNELS
    if _KERNELS is None:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        _KERNELS = (flash_attn_func, flash_attn_varlen_func)
    return _KERNELS


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, H, S, D], k and v [B, Hkv, S, D] -> [B, H, S, D], causal."""
    flash_attn_func, _ = kernels()
    out = _first(flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True))
    return out.transpose(1, 2)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: List[List[int]],
                       cumulative: torch.Tensor) -> torch.Tensor:
    """Causal attention within each segment: q [B, H, S, D], k and v [B, Hkv, S, D]; `lengths` per row (summing to
    S) and `cumulative` their running sums over all rows in order, int32 on q's device -> [B, H, S, D]."""
    _, flash_attn_varlen_func = kernels()
    batch, heads, seq, dim = q.shape
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3]) for t in (q, k, v)]
    longest = max(max(row) for row in lengths)
    out = _first(flash_attn_varlen_func(*flat, cu_seqlens_q=cumulative, cu_seqlens_k=cumulative,
                                        max_seqlen_q=longest, max_seqlen_k=longest, causal=True))
    return out.view(batch, seq, heads, v.shape[3]).transpose(1, 2)


def _first(result):
    """FA4's functions return (output, log-sum-exp)."""
    return result[0] if isinstance(result, tuple) else result
