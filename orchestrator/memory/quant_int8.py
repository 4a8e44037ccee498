"""Mesa: 8-bit activations saved for backward (Pan et al., "Mesa: A Memory-saving Training Framework for
Transformers", arXiv 2111.11124; github.com/ziplab/Mesa).

The forward runs on the exact activations; only the copy autograd keeps for backward is 8-bit. Each tensor is
split into groups (contiguous channel groups of a [..., C] tensor, or heads of a [B, H, S, D] one) and each group
has a range (alpha = width, beta = minimum) kept as a running estimate: the first training forward sets it from the
batch, later ones decay towards the batch's (alpha <- d*alpha + (1-d)*range), before quantising that batch. Codes
are q = floor((x - beta) * 255 / alpha + u), u ~ U[0, 1) (stochastic rounding: unbiased inside the range), CLAMPED
to [0, 255]; Mesa's public code wraps values above the range around the byte, we do not. The noise u of an element
is a counter-based hash of (seed, its index in the tensor) (`rounding_noise`), not a generator's draw: a fused kernel
computes it in registers instead of reading a tensor of it, the codes of any row range can be made again alone (a
token-wise plan recomputes a slice of the tokens), and the compiled (`codec_kernels`) and op-by-op paths draw the
same u, so a seed gives the same codes on both. The ranges are frozen in eval and without autograd, so they move
once a training step, recomputation or not (`compact`'s docstring says why no recomputation packs twice). Error
inside the range: |x_hat - x| < alpha / 255.

The int8 swap's codes (`SwapCodes`, the plan's `swap_codec: int8`) use the same encoder (`encode_seeded`), fused
the same way: there the range is the swapped slice's own min and max (the whole slice is at hand) and each encoded
slice has a seed of its own (the token-wise runtime counts them), as nothing is encoded twice.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from orchestrator.memory.codec_kernels import fused, kernel

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
    seed: int = 0
    """The run's seed: each layer's rounding noise is seeded from it and the layer index."""




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
        decode = kernel(dequantized, self.codes.device)
        return decode(self.codes, self.scale, self.offset, self.dtype).reshape(self.shape)

    @property
    def tensors(self) -> tuple:
        return self.codes, self.scale, self.offset


def dequantized(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [P, G, Q] back to values in `dtype` (through fp32): codes / scale + offset."""
    return (codes.float() / scale.view(1, -1, 1) + offset.view(1, -1, 1)).to(dtype)


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
        self._weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def update(self, x3: torch.Tensor) -> None:
        """Fold one batch's per-group min and max (x3 is [P, G, Q]) into the estimate. The first batch sets it
        through the same function with weight 0 (0 x 0 + 1 x range is the range exactly), so a compiled run makes
        one kernel in its first step, not a second one in its second (that compile would land in a timed step)."""
        if self._weights is None or self._weights[0].device != x3.device:
            self._weights = (torch.zeros((), device=x3.device), torch.full((), self.decay, device=x3.device))
        first = self.alpha is None or self.alpha.shape[0] != x3.shape[1]
        if first:
            self.alpha, self.beta = (torch.zeros(x3.shape[1], device=x3.device) for _ in range(2))  # not aliased:
            # one tensor passed twice would compile a graph of its own
        weight = self._weights[0] if first else self._weights[1]
        self.alpha, self.beta = kernel(decayed_range, x3.device)(x3.detach(), self.alpha, self.beta, weight)


def decayed_range(x3: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, decay: torch.Tensor):
    """The running (alpha, beta) moved towards x3's per-group width and minimum by `decay` (a 0-d tensor, so every
    step runs the same compiled graph; compiled: one reduction kernel)."""
    low, width = group_range(x3)
    return decay * alpha + (1 - decay) * width, decay * beta + (1 - decay) * low


def group_range(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max - min) in fp32 of x3 [P, G, Q], from the activation dtype (no fp32 copy of x)."""
    low = x3.amin(dim=(0, 2)).float()
    return low, x3.amax(dim=(0, 2)).float() - low


ENCODE_BLOCK_ELEMENTS = 2**18
"""The op-by-op encoder goes a block of whole rows of about this many elements at a time, so its temporaries are one
block's, not the whole tensor's (a fused kernel has none and encodes the tensor at once). Small: the noise hash's
int64 temporaries (2 MiB a block) stay in cache; at 2^22 a CPU encode of 4M elements took 0.56 s, at 2^18 0.05 s
(the generator's noise it replaced: 0.03 s)."""


def quantize(x: torch.Tensor, running: RunningRange, num_groups: int, update: bool, noise_seed: int = 0,
             head_major: bool = False, levels: int = LEVELS) -> Int8Codes:
    """x's codes in [0, levels] under the running range (updated first when `update`), stochastically rounded,
    clamped (S2A uses levels=15)."""
    x3, scale, offset = ranged(x, running, num_groups, update, head_major, levels)
    codes = encode_seeded(x3, scale, offset, levels, noise_seed)
    return Int8Codes(codes, scale, offset, tuple(x.shape), x.dtype)


def ranged(x: torch.Tensor, running: RunningRange, num_groups: int, update: bool, head_major: bool = False,
           levels: int = LEVELS) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x as [P, G, Q], scale, offset) under the running range, updated first when `update`."""
    x3 = grouped(x.detach(), num_groups, head_major)
    if update or running.alpha is None:
        running.update(x3)
    return x3, levels / running.alpha.clamp_min(MIN_RANGE), running.beta.clone()


_MASK32 = 0xFFFFFFFF


def _mix32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply, constants from C. Wellons' hash-prospector) on int64 tensors
    holding values in [0, 2^32); both multipliers are below 2^31, so no product leaves int64."""
    v = v ^ (v >> 16)
    v = (v * 0x21F0AAAD) & _MASK32
    v = v ^ (v >> 15)
    v = (v * 0x735A2D97) & _MASK32
    return v ^ (v >> 15)


def noise_keys(seed: int) -> Tuple[int, int]:
    """The two 32-bit keys `rounding_noise` mixes in, from a seed of any size."""
    seed %= 2**64
    return seed & _MASK32, (seed >> 32) & _MASK32


def rounding_noise(index: torch.Tensor, key_low: int, key_high: int) -> torch.Tensor:
    """u in [0, 1) (fp32, multiples of 2^-24) for each element index (int64, any size): a hash of the index's two
    32-bit halves and the seed's keys, so it is the same wherever and however often the element is encoded."""
    low = _mix32((index & _MASK32) ^ key_low)
    mixed = _mix32(low ^ (((index >> 32) + key_high) & _MASK32))
    return (mixed >> 8).float() * 2.0**-24


def rounded_codes(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, u: torch.Tensor, levels: int):
    """floor((x - offset) * scale + u) clamped to [0, levels], as uint8: the one arithmetic of every encoder."""
    scaled = (x3.float() - offset.view(1, -1, 1)) * scale.view(1, -1, 1) + u
    return scaled.floor().clamp(0, levels).to(torch.uint8)


def seeded_codes(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, key_low: int, key_high: int,
                 first_index: int, levels: int) -> torch.Tensor:
    """Codes of x3 [P, G, Q], whose first element is element `first_index` of the tensor the seed's noise is for."""
    index = torch.arange(x3.numel(), device=x3.device, dtype=torch.int64).view(x3.shape) + first_index
    return rounded_codes(x3, scale, offset, rounding_noise(index, key_low, key_high), levels)


def encode_seeded(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: int, seed: int,
                  first_row: int = 0) -> torch.Tensor:
    """Codes [P, G, Q] of rows first_row .. first_row + P of a tensor, with the seed's rounding noise: the same
    codes whether the rows are encoded alone or with the whole tensor. Fused: one kernel; op by op: a block of
    rows at a time (`ENCODE_BLOCK_ELEMENTS`)."""
    keys = noise_keys(seed)
    row = x3[0].numel() if x3.shape[0] else 1
    if fused(x3.device):
        return kernel(seeded_codes, x3.device)(x3, scale, offset, *keys, first_row * row, levels)
    codes = torch.empty(x3.shape, dtype=torch.uint8, device=x3.device)
    for lo, hi in row_chunks(x3.shape[0], max(1, ENCODE_BLOCK_ELEMENTS // row)):
        codes[lo:hi] = seeded_codes(x3[lo:hi], scale, offset, *keys, (first_row + lo) * row, levels)
    return codes


SWAP_CHUNK_ELEMENTS = 2**26
"""Elements the int8 swap decodes at once op by op (its fp32 temporaries)."""


def row_chunks(num_rows: int, step: int):
    """(start, stop) of consecutive ranges of `step` rows (the last may be shorter) covering `num_rows`: the chunked
    backwards (`compressed`) and the swap's decoding bound their fp32 temporaries this way."""
    return ((start, min(start + step, num_rows)) for start in range(0, num_rows, step))


SWAP_GROUPS = 8
"""Channel groups of a swapped slice, each with its own range."""


@dataclass
class SwapCodes:
    """A swapped slice as uint8 codes (what crosses PCIe: half the bf16 bytes) plus per-channel-group ranges that
    stay on the device.

    The slice's memory is read as rows of its innermost dimension (channels) in `SWAP_GROUPS` contiguous groups;
    each group's range is the slice's own min and max, so codes lie in it by construction and the error per element
    is below width / 255; stochastic rounding keeps them unbiased."""

    codes: Optional[torch.Tensor]
    """The codes on the device until `tokenwise` hands them to the copy out (the host buffer holds them then)."""
    low: torch.Tensor
    width: torch.Tensor
    channels: int

    @classmethod
    def encode(cls, flat: torch.Tensor, channels: int, seed: int) -> "SwapCodes":
        """`seed`: this slice's own (no two encoded slices share one, so their rounding noise is independent)."""
        rows = grouped(flat.view(-1, channels), SWAP_GROUPS)
        low, width = kernel(group_range, rows.device)(rows)
        width = width.clamp_min(1e-12)
        codes = encode_seeded(rows, 255.0 / width, low, LEVELS, seed)
        return cls(codes.view(-1), low, width, channels)

    def decode_into(self, target: torch.Tensor, codes: torch.Tensor) -> None:
        """Write the dequantised slice into `target` (a flat view of the restored tensor's region).

        Why x * (width / 255) here and x / scale in `Int8Codes`: the same value, rounded differently in the last
        bit; each keeps the arithmetic its codes always had, so results stay bitwise what they were."""
        groups = self.low.numel()
        rows = codes.view(-1, groups, self.channels // groups)
        out = target.view(rows.shape)
        step, low = (self.width / 255.0).view(1, -1, 1), self.low.view(1, -1, 1)
        if fused(rows.device):
            out.copy_(kernel(swap_values, rows.device)(rows, step, low, out.dtype))
            return
        for start, stop in row_chunks(rows.shape[0], max(1, SWAP_CHUNK_ELEMENTS // self.channels)):
            out[start:stop] = swap_values(rows[start:stop], step, low, out.dtype)


def swap_values(rows: torch.Tensor, step: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 swap's codes back to values (compiled: one kernel)."""
    return (rows.float() * step + low).to(dtype)
