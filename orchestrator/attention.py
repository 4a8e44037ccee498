"""Attention over packed documents: each token attends causally to the tokens of its own document only.

Why two kernels: on a GPU the point of packing is to skip the masked work, so the CUDA path is PyTorch's
FlexAttention (compiled) with a block mask built straight from the document boundaries: a 128 x 128 tile is
skipped when its query and key blocks share no document, run without a mask when both lie inside one document
(below the diagonal), and masked element-wise (same document and causal) otherwise; building it costs
O((S/128)^2) per micro-batch (no S x S mask ever exists), once for all layers. FlexAttention has no CPU backward,
so elsewhere (tests, the debug model) SDPA runs with a dense S x S boolean mask: exact, O(S^2) memory and work.

A third kernel, `per_document` (`orchestrator/attention_per_document.py`), runs the causal kernel itself (cuDNN's on a
GPU) once per document: faster than FlexAttention where documents are long, far slower where they are short; it is
chosen by name. A fourth, `varlen`, is FlashAttention-4's variable-length kernel (`orchestrator/attention_fa4.py`):
every document in one call, faster than both on an H200; `auto` picks it where train.attention_kernel=fa4.

All see the whole sequence: without sequence parallelism the rank holds it; with Ulysses each rank's head group
has the whole sequence after the all-to-all, so one layout (built from the whole sequence's document lengths)
masks every head group the same way.
"""

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from orchestrator import attention_fa4
from orchestrator.attention_per_document import per_document_attention
from spec import attention_choice
from spec.errors import ConfigError

log = logging.getLogger("longtrain.model")

KERNELS = ("flex", "sdpa_mask", "per_document", "varlen")
FLEX_BLOCK = 128
"""FlexAttention's tile (its default): the block mask's granularity."""


@dataclass
class DocumentLayout:
    """The documents of one micro-batch: per row, the lengths of its segments in order (the padding at the end, if
    any, is a segment of its own that attends only to itself and is never a target)."""

    lengths: List[List[int]]
    padding: List[int]
    kernel: str = "auto"
    """flex, sdpa_mask, per_document, varlen, or auto: varlen where the causal kernel is fa4, else flex on CUDA,
    sdpa_mask elsewhere."""
    _cache: Dict[Tuple[str, str], object] = field(default_factory=dict, repr=False)
    """Masks built once per device and shared by every layer of the forward (and its backward)."""

    @property
    def seq_len(self) -> int:
        return sum(self.lengths[0])

    def sum_squared_lengths(self) -> int:
        """Sum over the documents (not the padding) of length^2: what their attention FLOPs scale with."""
        total = 0
        for lengths, padding in zip(self.lengths, self.padding):
            total += sum(n * n for n in lengths) - padding * padding
        return total

    def segment_ids(self, device) -> torch.Tensor:
        """[B, S] int32: each token's segment (0, 1, ... along the row)."""
        key = ("ids", str(device))
        if key not in self._cache:
            rows = [torch.repeat_interleave(torch.arange(len(row), dtype=torch.int32), torch.tensor(row))
                    for row in self.lengths]
            self._cache[key] = torch.stack(rows).to(device)
        return self._cache[key]

    def dense_mask(self, device) -> torch.Tensor:
        """[B, 1, S, S] bool: True where query i may attend to key j (same segment, j <= i)."""
        key = ("dense", str(device))
        if key not in self._cache:
            ids = self.segment_ids(device)
            causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=device).tril()
            self._cache[key] = ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
        return self._cache[key]

    def block_mask(self, device):
        """FlexAttention's BlockMask of this layout (see the module docstring)."""
        key = ("block", str(device))
        if key not in self._cache:
            self._cache[key] = document_block_mask(self.segment_ids(device))
        return self._cache[key]

    def cumulative_lengths(self, device) -> torch.Tensor:
        """int32 running sums of every segment over all rows in order (0 first): the varlen kernel's boundaries."""
        key = ("cumulative", str(device))
        if key not in self._cache:
            every = [n for row in self.lengths for n in row]
            self._cache[key] = torch.cumsum(torch.tensor([0] + every), 0).to(device=device, dtype=torch.int32)
        return self._cache[key]

    def kernel_for(self, device: torch.device, causal_kernel: str = "sdpa") -> str:
        if self.kernel != "auto":
            return self.kernel
        if device.type != "cuda":
            return "sdpa_mask"
        return "varlen" if causal_kernel == "fa4" else "flex"


def resolved_kernel(job, profile, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
    """The job with train.attention_kernel=auto replaced by the kernel the profile picks at data.seq_len
    (`spec.attention_choice`, as the planner does), the choice logged; with device and dtype, a picked kernel that
    cannot run here is refused in one line naming the choice."""
    if job.train.attention_kernel != "auto":
        return job
    kernel, why = attention_choice.choose("auto", job.data.seq_len, profile)
    reason = attention_fa4.unavailable(device, dtype) if kernel == "fa4" and device is not None else None
    if reason is not None:
        raise ConfigError(f"train.attention_kernel=auto picked fa4 ({why}) but {reason}; install flash-attn-4 or "
                          "set train.attention_kernel=sdpa")
    log.info("attention kernel: %s (%s)", kernel, why)
    return attention_choice.resolved(job, profile)


def install(model, kernel: str, uses_varlen: bool, device: torch.device, dtype: torch.dtype) -> None:
    """Every layer's causal kernel (train.attention_kernel). FlashAttention-4 where it cannot run (no package, an older
    GPU) is one line before the first step, not an error inside it."""
    if kernel == "fa4" or uses_varlen:
        reason = attention_fa4.unavailable(device, dtype)
        if reason is not None:
            key = "train.attention_kernel=fa4" if kernel == "fa4" else "data.document_attention=varlen"
            raise ConfigError(f"{key}: {reason}; or train.attention_kernel=sdpa and data.document_attention=auto")
    for layer in model.layers:
        layer.attn.kernel = kernel


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """Causal attention over whole sequences (train.attention_kernel): q [B, H, S, D], k and v [B, Hkv, S, D]."""
    if kernel == "fa4":
        return attention_fa4.causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                       causal_kernel: str = "sdpa") -> torch.Tensor:
    """Causal attention within documents: q [B, H, S, D], k and v [B, Hkv, S, D] (whole sequences) -> [B, H, S, D]."""
    grouped = q.shape[1] != k.shape[1]
    kernel = layout.kernel_for(q.device, causal_kernel)
    if kernel == "per_document":
        return per_document_attention(q, k, v, layout.lengths)
    if kernel == "varlen":
        return attention_fa4.document_attention(q, k, v, layout.lengths, layout.cumulative_lengths(q.device))
    if kernel == "flex":
        if not q.is_cuda:
            raise RuntimeError("data.document_attention=flex needs CUDA (FlexAttention has no CPU backward); use "
                               "sdpa_mask or auto")
        return _compiled_flex()(q, k, v, block_mask=layout.block_mask(q.device), enable_gqa=grouped)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask(q.device), enable_gqa=grouped)


_FLEX = None


def _compiled_flex():
    """flex_attention compiled once per process (uncompiled it materialises the scores; compiled, a fused kernel)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def document_block_mask(ids: torch.Tensor, block: int = FLEX_BLOCK):
    """The BlockMask of segment ids [B, S] (non-decreasing along each row), from per-tile segment ranges: a tile
    (query block i, key block j <= i) has an allowed pair iff the two blocks' id ranges overlap; it is full iff
    j < i and both blocks lie inside one and the same segment; the diagonal and the rest are partial."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, seq = ids.shape
    num_blocks = -(-seq // block)
    padded = torch.cat([ids, ids[:, -1:].expand(batch, num_blocks * block - seq)], dim=1)
    blocks = padded.view(batch, num_blocks, block)
    low, high = blocks.amin(-1), blocks.amax(-1)
    causal = torch.ones(num_blocks, num_blocks, dtype=torch.bool, device=ids.device).tril()
    overlap = causal & (high[:, None, :] >= low[:, :, None]) & (low[:, None, :] <= high[:, :, None])
    single = low == high
    full = (causal.tril(-1) & single[:, :, None] & single[:, None, :] & (low[:, :, None] == low[:, None, :]))
    partial = overlap & ~full

    def mask_mod(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] == padded[b, kv_idx]) & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq, seq))


def _ordered(tiles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, Q, K] bool tiles -> (count [B, 1, Q], key-block indices [B, 1, Q, K] with the set ones first), int32."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]
