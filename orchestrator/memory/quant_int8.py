"""Mesa: 8-bit activations saved for backward (Pan et al., "Mesa: A Memory-saving Training Framework for
Transformers", arXiv 2111.11124; github.com/ziplab/Mesa).

The forward runs on the exact activations; only the copy autograd keeps for backward is 8-bit. Each tensor is
split into groups (contiguous channel groups of a [..., C] tensor, or heads of a [B, H, S, D] one) and each group
has a range (alpha = width, beta = minimum) kept as a running estimate: the first training forward sets it from the
batch, later ones decay towards the batch's (alpha <- d*alpha + (1-d)*range), before quantising that batch. Codes
are q = floor((x - beta) * 255 / alpha + u), u ~ U[0, 1) (stochastic rounding: unbiased inside the range), CLAMPED
to [0, 255]; Mesa's public code wraps values above the range around the byte, we do not. The ranges are frozen in
eval, without autograd, and while a forward is replayed for recomputation (`compressed.replaying()`), so a
recomputed layer stores the same codes. Error inside the range: |x_hat - x| < alpha / 255.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

LEVELS = 255
MIN_RANGE = 1e-8
"""A constant group still gets a positive width, so its scale stays finite."""


@dataclass
class Config:
    """Mesa's knobs: the running-range decay and how many channel groups share one range."""

    range_decay: float = 0.5
    num_groups: int = 8
    """Channel groups per tensor (fewer if they do not divide the channels); heads for head-major tensors."""
    linears: bool = True
    """Inputs of q/k/v (stored once), gate/up (once) and down; o's input is kept by attention anyway."""
    norms: bool = False
    """Inputs of both RMSNorms."""
    silu: bool = False
    """The gate of silu(gate) * up (S2A's int4 codes are the smaller alternative)."""


def apply(model, config: Config, layers, seed: int = 0) -> None:
    """Store the chosen saved inputs of these layers as int8 (see `compressed.install`)."""
    from orchestrator.memory import compressed
    compressed.install(model, layers, seed, int8=config)


@dataclass
class Int8Codes:
    """The compact form of one tensor: uint8 codes laid out [P, G, Q] (G groups) and the per-group scale and
    offset (fp32, [G]) that dequantise them. `codes`, `scale` and `offset` are what autograd (or a swap) holds."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    shape: tuple
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        values = self.codes.float() / self.scale.view(1, -1, 1) + self.offset.view(1, -1, 1)
        return values.reshape(self.shape).to(self.dtype)

    @property
    def tensors(self) -> tuple:
        return self.codes, self.scale, self.offset


def grouped(x: torch.Tensor, num_groups: int, head_major: bool = False) -> torch.Tensor:
    """x as [P, G, Q]: G contiguous channel groups of the last dim, or (head_major, [B, H, S, D]) G head groups."""
    if head_major:
        groups = math.gcd(x.shape[1], num_groups)
        return x.reshape(x.shape[0], groups, -1)
    groups = math.gcd(x.shape[-1], num_groups)
    return x.reshape(-1, groups, x.shape[-1] // groups)


class RunningRange:
    """Per-group (alpha, beta) running estimates; tensors live on the device of the first input."""

    def __init__(self, decay: float):
        self.decay = decay
        self.alpha: Optional[torch.Tensor] = None
        self.beta: Optional[torch.Tensor] = None

    def update(self, x3: torch.Tensor) -> None:
        """Fold one batch's per-group min and max (x3 is [P, G, Q]) into the estimate."""
        low = x3.detach().amin(dim=(0, 2)).float()  # min/max of the activation dtype: no fp32 copy of x
        width = x3.detach().amax(dim=(0, 2)).float() - low
        if self.alpha is None or self.alpha.shape != width.shape:
            self.alpha, self.beta = width, low
            return
        self.alpha = self.decay * self.alpha + (1 - self.decay) * width
        self.beta = self.decay * self.beta + (1 - self.decay) * low


NOISE_BLOCK_ELEMENTS = 2**22
"""Rounding noise comes from one seeded draw per block of whole rows of about this many elements: the codes of any
row range can be made again alone (a token-wise plan recomputes a slice of the tokens), and quantising keeps fp32
temporaries of one block, not of the whole tensor."""


def quantize(x: torch.Tensor, running: RunningRange, num_groups: int, update: bool, noise_seed: int = 0,
             head_major: bool = False, levels: int = LEVELS) -> Int8Codes:
    """x's codes in [0, levels] under the running range (updated first when `update`), stochastically rounded,
    clamped (S2A uses levels=15)."""
    x3 = grouped(x.detach(), num_groups, head_major)
    if update or running.alpha is None:
        running.update(x3)
    scale = levels / running.alpha.clamp_min(MIN_RANGE)
    offset = running.beta.clone()
    codes = encode_rows(x3, scale, offset, levels, noise_seed, first_row=0, total_rows=x3.shape[0])
    return Int8Codes(codes, scale, offset, tuple(x.shape), x.dtype)


def encode_rows(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: int, noise_seed: int,
                first_row: int, total_rows: int) -> torch.Tensor:
    """Codes [P, G, Q] of rows first_row .. first_row + P of a tensor of total_rows rows quantised with this scale,
    offset and seed: the same codes whether the rows are encoded alone or with the whole tensor."""
    codes = torch.empty(x3.shape, dtype=torch.uint8, device=x3.device)
    scale, offset = scale.view(1, -1, 1), offset.view(1, -1, 1)
    stop_row = first_row + x3.shape[0]
    block_rows = max(1, min(total_rows, NOISE_BLOCK_ELEMENTS // max(1, x3[0].numel())))
    for block in range(first_row // block_rows, -(-stop_row // block_rows)):
        lo, hi = max(first_row, block * block_rows), min(stop_row, (block + 1) * block_rows)
        noise = _block_noise(noise_seed, block, (block_rows, *x3.shape[1:]), x3.device)
        noise = noise[lo - block * block_rows:hi - block * block_rows]
        scaled = (x3[lo - first_row:hi - first_row].float() - offset) * scale + noise
        codes[lo - first_row:hi - first_row] = scaled.floor_().clamp_(0, levels).to(torch.uint8)
    return codes


def _block_noise(seed: int, block: int, shape: tuple, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, block)) % (2**63 - 1))  # int tuples hash the same in every process
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
