"""The layer's elementwise work as fused kernels (`train.elementwise=compiled`): RMSNorm, RoPE and SwiGLU, each an
autograd Function whose two directions torch.compile fuses on CUDA.

Why: run op by op, an RMSNorm passes over its tokens about 7 times forward and 10 backward (fp32 upcast, square,
mean, scale, downcast, weight), RoPE about 8 times for each of q and k, SwiGLU 5 forward and more backward; fused,
each is one pass each way. On an H200 the layer ran ~7% below a bare PyTorch layer and these passes are part of it.

What is saved. The norm saves what it saves op by op (its input and one fp32 scale per token) and RoPE only its cos /
sin tables, as autograd does for the eager rotation. SwiGLU saves its gate and up and recomputes silu(gate) in
backward, so the layer saves one intermediate-wide tensor less per token than op by op: the planner counts that
(`spec.activations.layer_saved_tensors(..., fused_swiglu=True)`, and train.elementwise is a plan input). The
functions are model.py's own (`rms_norm_forward`, `rms_norm_backward`, `apply_rope`) with the backward of RoPE (the
rotation's transpose) and of SwiGLU written out, compiled with dynamic shapes (the token-wise runtime recomputes
token slices of any length).

The same switch runs the compression codecs' encode and decode compiled (`orchestrator.memory.codec_kernels`).

On CPU the same Functions run uncompiled (CI has no GPU, and compiling would cost more than it saves there): the same
tensors are saved as on a GPU, so a plan made for the job holds on both.
"""

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from orchestrator.memory import codec_kernels
from orchestrator.model import MLP, Attention, RMSNorm, apply_rope, rms_norm_backward, rms_norm_forward

log = logging.getLogger("longtrain.model")

def rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of `apply_rope` for its input: y = x cos + R(x) sin with R(x1, x2) = (-x2, x1), so
    dx = g cos + R^T(g sin) with R^T(z1, z2) = (z2, -z1)."""
    scaled = grad * sin
    half = grad.shape[-1] // 2
    return grad * cos + torch.cat((scaled[..., half:], -scaled[..., :half]), dim=-1)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """d/dgate of silu(gate) * up is up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate))), in fp32."""
    gate32, up32, grad32 = gate.float(), up.float(), grad.float()
    sigmoid = torch.sigmoid(gate32)
    silu = gate32 * sigmoid
    grad_gate = grad32 * up32 * sigmoid * (1 + gate32 * (1 - sigmoid))
    return grad_gate.type_as(gate), (grad32 * silu).type_as(up)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up saving gate and up only."""

    @staticmethod
    def forward(ctx, gate, up, kernels):
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        return kernels.swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return (*ctx.kernels.swiglu_backward(grad, gate, up), None)


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
        self.swiglu = compile_fn(swiglu_forward)
        self.swiglu_backward = compile_fn(swiglu_backward)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The `Attention.rope` slot's function."""
        return _Rope.apply(x, cos, sin, self)

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The `MLP.fused_swiglu` slot's function."""
        return _SwiGLU.apply(gate, up, self)


def install(model: torch.nn.Module, mode: str, device: torch.device,
            kernels: Optional[FusedKernels] = None) -> str:
    """Fill the norm, RoPE and SwiGLU slots of every layer for `mode`, and run the compression codecs compiled or
    not with them; returns what the run header says. `kernels`: the fused functions to install (default: compiled on
    CUDA, uncompiled elsewhere)."""
    compiled = mode != "eager" and kernels is None and device.type == "cuda"
    codec_kernels.install(codec_kernels.compile_codec if compiled else None)
    if mode == "eager":
        return "eager"
    fused = kernels or (FusedKernels() if compiled else FusedKernels(lambda fn: fn))
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.kernels = fused
        elif isinstance(module, Attention):
            module.rope = fused.rotate
        elif isinstance(module, MLP):
            module.fused_swiglu = fused.gated
    summary = ("fused (RMSNorm, RoPE, SwiGLU, compression codecs)" + ("; torch.compile" if compiled else
                                                  "; not compiled: torch.compile fuses them on CUDA only"))
    log.info("elementwise kernels: %s", summary)
    return summary

