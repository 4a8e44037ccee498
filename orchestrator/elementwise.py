"""The layer's elementwise work fused by torch.compile (`train.elementwise=compiled`): RMSNorm and RoPE, on CUDA.

Why: run op by op, an RMSNorm passes over its tokens about 7 times forward and 10 backward (fp32 upcast, square,
mean, scale, downcast, weight) and RoPE about 8 times for each of q and k; compiled, each is one pass each way. On an
H200 the layer ran ~7% below a bare PyTorch layer (issue 19) and these passes are part of it.

What changes is time only. The norm's autograd Function saves what it saves run op by op (its input and one fp32
scale per token) and RoPE saves only its cos / sin tables, as autograd does for the eager rotation, so plans, the
token-wise runtime and checkpoints see the same tensors. The compiled functions are model.py's own
(`rms_norm_forward`, `rms_norm_backward`, `apply_rope`) with RoPE's backward written out (the rotation's
transpose), compiled with dynamic shapes (the token-wise runtime recomputes token slices of any length).

On CPU the layer stays eager: CI has no GPU, and compiling would cost more than it saves there.
"""

import logging
from typing import Optional

import torch

from orchestrator.model import Attention, EagerKernels, RMSNorm, apply_rope, rms_norm_backward, rms_norm_forward

log = logging.getLogger("longtrain.model")

MODES = ("eager", "compiled")


def rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of `apply_rope` for its input: y = x cos + R(x) sin with R(x1, x2) = (-x2, x1), so
    dx = g cos + R^T(g sin) with R^T(z1, z2) = (z2, -z1)."""
    scaled = grad * sin
    half = grad.shape[-1] // 2
    return grad * cos + torch.cat((scaled[..., half:], -scaled[..., :half]), dim=-1)


class _Rope(torch.autograd.Function):
    """RoPE with its backward written out, so both directions run as one kernel each."""

    @staticmethod
    def forward(ctx, x, cos, sin, kernels):
        ctx.save_for_backward(cos, sin)
        ctx.kernels = kernels
        return kernels.rope(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return ctx.kernels.rope_backward(grad, cos, sin), None, None, None


class FusedKernels:
    """The elementwise functions, each compiled on first use (torch.compile, dynamic shapes)."""

    def __init__(self, compile_fn=None):
        compile_fn = compile_fn or (lambda fn: torch.compile(fn, dynamic=True))
        self.rms_norm_forward = compile_fn(rms_norm_forward)
        self.rms_norm_backward = compile_fn(rms_norm_backward)
        self.rope = compile_fn(apply_rope)
        self.rope_backward = compile_fn(rope_backward)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The `Attention.rope` slot's function."""
        return _Rope.apply(x, cos, sin, self)


def install(model: torch.nn.Module, mode: str, device: torch.device,
            kernels: Optional[FusedKernels] = None) -> str:
    """Fill the norm and RoPE slots of every layer for `mode`; returns what the run header says. `kernels`: the
    fused functions to install (default: compiled; a test passes them uncompiled to check the wiring on CPU)."""
    if mode == "eager":
        return "eager"
    if kernels is None and device.type != "cuda":
        log.info("elementwise kernels: eager (train.elementwise=compiled fuses on CUDA only)")
        return "eager (train.elementwise=compiled fuses on CUDA only)"
    fused = kernels or FusedKernels()
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernels = fused
        elif isinstance(module, Attention):
            module.rope = fused.rotate
    log.info("elementwise kernels: RMSNorm and RoPE fused by torch.compile")
    return "compiled (RMSNorm, RoPE; torch.compile)"


def uninstall(model: torch.nn.Module) -> None:
    """Back to eager (tests)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernels = EagerKernels
        elif isinstance(module, Attention):
            module.rope = apply_rope
