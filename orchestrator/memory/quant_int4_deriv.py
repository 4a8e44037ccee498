"""S2A: 4-bit codes for the SiLU of a SwiGLU MLP, from which the backward recovers the value AND the derivative
(arXiv 2503.08154, "Structure-Activation Synergy"; its method text was not available to us, see
../shared/research/techniques.md (c): this is a reconstruction).

The backward of gated = silu(gate) * up needs silu'(gate) (d gate = g * up * silu'(gate)) and silu(gate)
(d up = g * silu(gate)); a derivative-only code is not enough. We keep a 4-bit code of gate, two per byte, on the
16 levels of a per-group running range (Mesa's ranges, see `quant_int8`, clamped, stochastic rounding), and the
backward reads both functions at the level: per group the levels are a 16-entry table of (silu, silu') values.
Error bounds inside the range, alpha the group's width: |gate_hat - gate| < alpha / 15, so
|silu'_hat - silu'| <= 0.5 * alpha / 15 (|silu''| <= 0.5) and |silu_hat - silu| <= 1.0998 * alpha / 15
(|silu'| <= 1.0998); stochastic rounding makes gate_hat unbiased. Negative result kept in docs: fixed analytic
bins (15 borders on [-0.75, 6] placed by a dynamic program where silu' varies, Few-Bit-Backward style) put the
debug model's gates (|gate| ~ 0.2 early in training) into 3 bins and cost 11% of loss after 100 steps.
`up` is kept exact or as int8 codes, with the linear inputs' setting.
"""

from dataclasses import dataclass

import torch

from orchestrator.memory import quant_int8
from orchestrator.memory.codec_kernels import fused, kernel

LEVELS = 15


@dataclass
class Config:
    """The gate codes' running ranges (as Mesa's, `quant_int8`) and the run's seed."""

    range_decay: float = 0.5
    num_groups: int = 8
    seed: int = 0
    """Each layer's rounding noise is seeded from it and the layer index."""


def silu_derivative(x: torch.Tensor) -> torch.Tensor:
    sig = torch.sigmoid(x)
    return sig * (1 + x * (1 - sig))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15] -> uint8, two per byte (low nibble first): ceil(numel / 2) bytes."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat((flat, flat.new_zeros(1)))
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=1).reshape(-1)[:numel]


def seeded_nibbles(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, key_low: int, key_high: int,
                   first_index: int) -> torch.Tensor:
    """`quant_int8.seeded_codes` on the 16 levels, packed two a byte (compiled: one kernel, the codes never
    written)."""
    return pack_nibbles(quant_int8.seeded_codes(x3, scale, offset, key_low, key_high, first_index, LEVELS))


def encode_packed(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, seed: int,
                  first_row: int = 0) -> torch.Tensor:
    """Packed 4-bit codes of rows first_row .. first_row + P of a tensor (`quant_int8.encode_seeded`'s codes)."""
    if fused(x3.device):
        row = x3[0].numel() if x3.shape[0] else 1
        return kernel(seeded_nibbles, x3.device)(x3, scale, offset, *quant_int8.noise_keys(seed), first_row * row)
    return pack_nibbles(quant_int8.encode_seeded(x3, scale, offset, LEVELS, seed, first_row))
