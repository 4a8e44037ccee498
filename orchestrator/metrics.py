"""Analytic FLOPs, MFU and memory readings for one training step of one rank.

Why analytic FLOPs: MFU must not depend on what a technique recomputes (recompute raises hardware FLOPs, not
model FLOPs), so it is computed from the model shape (`spec.flops`, which states the convention). We report
both MFUs, causal-halved and full-attention, labelled, because papers differ. With packed documents
(data.packing=documents) the attention FLOPs are the ones the document mask leaves: summed over the step's
documents (length^2 each, halved or not), not seq_len^2 per sequence; the matmul FLOPs count every token.
"""

import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch

from spec.config import ModelConfig
from spec.flops import attention_training_flops, matmul_training_flops_per_token, training_flops_per_token
from spec.units import GIB


@dataclass
class StepReading:
    """What one rank measured in one optimizer step (the row every rank contributes)."""

    step: int
    rank: int
    node: str
    loss: float
    lr: float
    step_seconds: float
    tokens: int
    tokens_per_second: float
    tflops: float
    mfu: float
    mfu_full_attention: float
    peak_allocated_gib: float
    peak_reserved_gib: float
    host_rss_gib: float
    swap_host_gib: float = 0.0
    grad_norm: Optional[float] = None
    """The global gradient norm DeepSpeed measured before clipping (None when the optimizer does not report it)."""
    attention: str = "sequence"
    """What the attention FLOPs counted: `sequence` (seq_len^2 per sequence) or `documents` (summed over packed
    documents)."""
    arena_gib: float = 0.0
    """The plan's static arena on this rank (0: none)."""
    arena_fallbacks: int = 0
    """Slice sets of this step that did not fit their planned region and went to the caching allocator."""
    arena_fallback_gib: float = 0.0
    replay_gib: float = 0.0
    """The traced step's layout under train.allocator=planned (0: none yet, or the caching allocator)."""
    replay_fallbacks: int = 0
    """Requests of this step the layout covers that missed their offsets and went to the exact-size cache."""
    replay_fallback_gib: float = 0.0

    def as_dict(self) -> Dict:
        return asdict(self)


class StepMeter:
    """Times steps on one rank and turns token counts into TFLOP/s and MFU against the profile's peak."""

    def __init__(self, model: ModelConfig, seq_len: int, peak_tflops: float, rank: int, node: str):
        self.flops_per_token = training_flops_per_token(model, seq_len, causal_halved=True)
        self.flops_per_token_full = training_flops_per_token(model, seq_len, causal_halved=False)
        self.peak_tflops = peak_tflops
        self.rank, self.node = rank, node
        self.model = model
        self._started = 0.0
        self._document_squares = None

    def start(self) -> None:
        _synchronize()
        self._started = time.perf_counter()
        self._document_squares = None

    def count_documents(self, layout, sp_degree: int = 1) -> None:
        """A micro-batch of packed documents in this step: its attention FLOPs are summed over its documents (this
        rank's share: 1 / sp_degree of the heads)."""
        self._document_squares = (self._document_squares or 0) + layout.sum_squared_lengths() / sp_degree

    def stop(self, step: int, loss: float, lr: float, tokens: int, swap_host_bytes: int = 0,
             grad_norm: Optional[float] = None, arena_bytes: int = 0,
             arena_fallbacks: Tuple[int, int] = (0, 0), replay_bytes: int = 0,
             replay_fallbacks: Tuple[int, int] = (0, 0)) -> StepReading:
        _synchronize()
        seconds = max(time.perf_counter() - self._started, 1e-9)
        flops, flops_full = self._flops(tokens)
        tflops = flops / seconds / 1e12
        tflops_full = flops_full / seconds / 1e12
        allocated, reserved = device_peak_memory_gib()
        return StepReading(step=step, rank=self.rank, node=self.node, loss=loss, lr=lr, step_seconds=seconds,
                           tokens=tokens, tokens_per_second=tokens / seconds, tflops=tflops,
                           mfu=tflops / self.peak_tflops, mfu_full_attention=tflops_full / self.peak_tflops,
                           peak_allocated_gib=allocated, peak_reserved_gib=reserved,
                           host_rss_gib=host_peak_rss_gib(), swap_host_gib=swap_host_bytes / GIB,
                           grad_norm=grad_norm,
                           attention="sequence" if self._document_squares is None else "documents",
                           arena_gib=arena_bytes / GIB, arena_fallbacks=arena_fallbacks[0],
                           arena_fallback_gib=arena_fallbacks[1] / GIB, replay_gib=replay_bytes / GIB,
                           replay_fallbacks=replay_fallbacks[0], replay_fallback_gib=replay_fallbacks[1] / GIB)


    def _flops(self, tokens: int) -> tuple:
        """Model FLOPs of the step (causal-halved, full-attention): per token of seq_len, or with packed documents
        the matmuls per token plus attention summed over the documents."""
        if self._document_squares is None:
            return self.flops_per_token * tokens, self.flops_per_token_full * tokens
        matmuls = matmul_training_flops_per_token(self.model) * tokens
        return (matmuls + attention_training_flops(self.model, self._document_squares, causal_halved=True),
                matmuls + attention_training_flops(self.model, self._document_squares, causal_halved=False))


def device_peak_memory_gib() -> tuple:
    """Peak (allocated, reserved) GiB on the current CUDA device; (0, 0) on CPU."""
    if not torch.cuda.is_available():
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB


def host_peak_rss_gib() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (GIB if sys.platform == "darwin" else 1024**2)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()

