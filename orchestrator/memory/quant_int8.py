"""Mesa: 8-bit activations saved for backward (Pan et al., "Mesa: A Memory-saving Training Framework for
Transformers", arXiv 2111.11124; github.com/ziplab/Mesa).

The forward runs on the exact activations; only the copy autograd keeps for backward is 8-bit. Each tensor is
split into groups (contiguous channel groups of a [..., C] tensor, or heads of a [B, H, S, D] one) and each group
has a range (alpha = width, beta = minimum) kept as a running estimate: the first training forward sets it from the
batch, later ones decay towards the batch's (alpha <- d*alpha + (1-d)*range), before quantising that batch. Codes
are q = floor((x - beta) * 255 / alpha + u), u ~ U[0, 1) (stochastic rounding: unbiased inside the range), CLAMPED
to [0, 255]; Mesa's public code wraps values above the range around the byte, we do not. The ranges are frozen in
eval and without autograd, so they move once a training step, recomputation or not (`compact`'s docstring says why
no recomputation packs twice). Error inside the range: |x_hat - x| < alpha / 255.

The same encoder (`encode_rows`) makes the int8 swap's codes (`SwapCodes`, the plan's `swap_codec: int8`): there the
range is the swapped slice's own min and max (the whole slice is at hand) and the rounding noise is drawn in order
from one generator (`StreamNoise`), as nothing is encoded twice.
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
    codes = encode_rows(x3, scale, offset, levels, SeededNoise(noise_seed), first_row=0, total_rows=x3.shape[0])
    return Int8Codes(codes, scale, offset, tuple(x.shape), x.dtype)


class SeededNoise:
    """Mesa's rounding noise: one seeded draw per block of whole rows (`NOISE_BLOCK_ELEMENTS`), so the codes of any
    row range can be made again alone, equal to the first encoding."""

    block_elements = NOISE_BLOCK_ELEMENTS

    def __init__(self, seed: int):
        self.seed = seed

    def draw(self, block: int, block_shape: tuple, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        """Rows lo..hi (within the block) of the block's noise."""
        return _block_noise(self.seed, block, block_shape, device)[lo:hi]


def _block_noise(seed: int, block: int, shape: tuple, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(hash((seed, block)) % (2**63 - 1))  # int tuples hash the same in every process
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


SWAP_CHUNK_ELEMENTS = 2**26
"""Elements the int8 swap encodes or decodes at once (its fp32 temporaries)."""


class StreamNoise:
    """The int8 swap's rounding noise: drawn in order from one generator, exactly a chunk of rows at a time (a
    swapped slice is encoded once, never again in part)."""

    block_elements = SWAP_CHUNK_ELEMENTS

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def draw(self, block: int, block_shape: tuple, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        return torch.rand((hi - lo, *block_shape[1:]), generator=self.generator, device=device)


def encode_rows(x3: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: int, noise,
                first_row: int = 0, total_rows: Optional[int] = None) -> torch.Tensor:
    """Codes [P, G, Q] of rows first_row .. first_row + P of a tensor of total_rows rows (default: these rows),
    floor((x - offset) * scale + u) clamped to [0, levels], u from `noise` (`SeededNoise`: the same codes whether
    the rows are encoded alone or with the whole tensor; `StreamNoise`: the swap's). Block by block of rows, so
    the fp32 temporaries stay one block's."""
    total_rows = x3.shape[0] if total_rows is None else total_rows
    codes = torch.empty(x3.shape, dtype=torch.uint8, device=x3.device)
    scale, offset = scale.view(1, -1, 1), offset.view(1, -1, 1)
    stop_row = first_row + x3.shape[0]
    block_rows = max(1, min(total_rows, noise.block_elements // max(1, x3[0].numel())))
    for block in range(first_row // block_rows, -(-stop_row // block_rows)):
        lo, hi = max(first_row, block * block_rows), min(stop_row, (block + 1) * block_rows)
        u = noise.draw(block, (block_rows, *x3.shape[1:]), lo - block * block_rows, hi - block * block_rows,
                       x3.device)
        scaled = (x3[lo - first_row:hi - first_row].float() - offset) * scale + u
        codes[lo - first_row:hi - first_row] = scaled.floor_().clamp_(0, levels).to(torch.uint8)
    return codes


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

    codes: torch.Tensor
    low: torch.Tensor
    width: torch.Tensor
    channels: int

    @classmethod
    def encode(cls, flat: torch.Tensor, channels: int, generator: torch.Generator) -> "SwapCodes":
        rows = grouped(flat.view(-1, channels), SWAP_GROUPS)
        low = rows.amin(dim=(0, 2)).float()
        width = (rows.amax(dim=(0, 2)).float() - low).clamp_min(1e-12)
        codes = encode_rows(rows, 255.0 / width, low, LEVELS, StreamNoise(generator))
        return cls(codes.view(-1), low, width, channels)

    def decode_into(self, target: torch.Tensor, codes: torch.Tensor) -> None:
        """Write the dequantised slice into `target` (a flat view of the restored tensor's region).

        Why x * (width / 255) here and x / scale in `Int8Codes`: the same value, rounded differently in the last
        bit; each keeps the arithmetic its codes always had, so results stay bitwise what they were."""
        groups = self.low.numel()
        rows = codes.view(-1, groups, self.channels // groups)
        out = target.view(rows.shape)
        step = (self.width / 255.0).view(1, -1, 1)
        for start, stop in row_chunks(rows.shape[0], max(1, SWAP_CHUNK_ELEMENTS // self.channels)):
            out[start:stop] = (rows[start:stop].float() * step + self.low.view(1, -1, 1)).to(out.dtype)
