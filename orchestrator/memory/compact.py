"""Compact forms of saved tensors, shared by Mesa int8, S2A int4 and WTA-CRS (wired into layers by `compressed`).

An `InputStore` turns one input tensor into what backward keeps instead of it: int8 codes with fp32 per-group scale
and offset (`quant_int8`), packed 4-bit codes (`quant_int4_deriv`), or sampled rows in token order with int64
indices and fp32 importance weights (`wta_crs`), or sampled rows as codes. Linears fed the same tensor (q/k/v,
gate/up) share one store, which packs that tensor once per forward and hands every linear the same compact tensors,
so they are stored once. `Packed` says how backward reads them back (the whole tensor, rows of it, or a weight
gradient). Under a token-wise plan (`tokenwise`) each store reports its `CompactForm`, and the plan keeps, swaps or
recomputes its token ranges like any activation: a recomputed range is encoded again with the stored ranges, sample
and seed (an element's rounding noise is a hash of the seed and its index, `quant_int8`), so it equals what was
stored. Encoding and decoding run through `codec_kernels`: op by op, or compiled into one kernel each way.

A store packs (moving its running range and its step's seed) only in a training forward with autograd on, and every
recomputation packs at most once a step: the token-wise recompute runs without autograd and encodes with the stored
ranges (`CompactForm.encode`); DeepSpeed's activation checkpointing runs the first forward without autograd and packs
only in its backward's replay; a layer the plan checkpoints whole (`layer_replay`) is never compressed
(`spec.plan.check_plan_composes`). So no forward needs marking as a replay.
"""

import bisect
import contextlib
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from orchestrator.memory import quant_int4_deriv, quant_int8, wta_crs
from orchestrator.memory.codec_kernels import fused, kernel

BACKWARD_CHUNK_ELEMENTS = 2**24
"""Elements a chunked backward restores at once (the SwiGLU's and a linear's weight gradient: fp32 temporaries of
~6 x 64 MiB)."""
FUSED_BACKWARD_CHUNK_ELEMENTS = 2**26
"""The same for a linear's weight gradient with fused codecs: the kernel writes the rows in the activation dtype with
no fp32 temporaries (128 MiB in bf16), and fewer chunks mean fewer fp32 sums of the [out, in] partial gradients."""


def exact_rows(values: torch.Tensor, weight: Optional[torch.Tensor], rows: int, columns: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Kept rows [rows, columns] in `dtype`, times their importance weights (fp32) when sampled."""
    values = values.reshape(rows, columns)
    if weight is not None:
        values = values.float() * weight.unsqueeze(1)
    return values.to(dtype)


def int8_rows(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, weight: Optional[torch.Tensor],
              rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [rows, columns] in `dtype` decoded (fp32) from their int8 codes, times their weights when sampled."""
    grouped = codes.reshape(rows, scale.numel(), -1)
    values = quant_int8.dequantized(grouped, scale, offset, torch.float32).reshape(rows, columns)
    if weight is not None:
        values = values * weight.unsqueeze(1)
    return values.to(dtype)


def int4_rows(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, weight: Optional[torch.Tensor],
              rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """`int8_rows` from packed 4-bit codes."""
    codes = quant_int4_deriv.unpack_nibbles(packed, rows * columns)
    return int8_rows(codes, scale, offset, weight, rows, columns, dtype)


def decoded_rows(bits: int, tensors, rows: int, columns: int, dtype: torch.dtype,
                 weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows [rows, columns] in `dtype` from compact tensors of `bits` (16: the rows themselves)."""
    if bits == 16:
        return exact_rows(tensors[0], weight, rows, columns, dtype)
    return (int4_rows if bits == 4 else int8_rows)(*tensors, weight, rows, columns, dtype)


@dataclass(frozen=True)
class Packed:
    """How to read a compact input back: `restore(tensors)` gives (rows [k, d] weighted, kept indices or None)."""

    bits: int
    """16 for the tensor itself (sampled rows), 8 for int8 codes, 4 for packed 4-bit codes."""
    sampled: bool
    shape: tuple
    dtype: torch.dtype

    def restore(self, tensors) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        tensors = list(tensors)
        index = weight = None
        if self.sampled:
            index, weight = tensors[-2:]
            tensors = tensors[:-2]
        rows = index.numel() if self.sampled else _rows(self.shape)
        return self.decode(tensors, weight, rows, self.dtype), index

    def decode(self, tensors, weight: Optional[torch.Tensor], rows: int, dtype: torch.dtype) -> torch.Tensor:
        """All rows of these compact tensors (without index and weight) as [rows, columns] in `dtype`."""
        function = exact_rows if self.bits == 16 else int4_rows if self.bits == 4 else int8_rows
        return kernel(function, tensors[0].device)(*tensors, weight, rows, self.shape[-1], dtype)

    def row_slice(self, tensors, start: int, stop: int) -> tuple:
        """The compact tensors of rows start..stop of an unsampled compact tensor (views)."""
        columns = self.shape[-1]
        if self.bits == 16:
            return (tensors[0].reshape(-1, columns)[start:stop],)
        codes, scale, offset = tensors
        if self.bits == 4:  # two codes per byte in row-major order: `start * columns` must be even
            assert start * columns % 2 == 0, "4-bit rows must start on a byte"
            return codes[start * columns // 2:(stop * columns + 1) // 2], scale, offset
        return codes.reshape(-1, columns)[start:stop], scale, offset

    def restore_rows(self, tensors, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start..stop of an unsampled compact tensor, in `dtype` (fp32 by default), without restoring the rest
        (a backward that works chunk by chunk keeps its temporaries to one chunk)."""
        return self.decode(self.row_slice(tensors, start, stop), None, stop - start, dtype)

    def restore_tensor(self, tensors) -> torch.Tensor:
        """The whole (unsampled) input back, in its shape and dtype: what a norm's backward reads."""
        rows, _ = self.restore(tensors)
        return rows.reshape(self.shape)

    def weight_grad(self, tensors, grad2d: torch.Tensor) -> torch.Tensor:
        """g^T x from the compact x; unsampled codes are restored a chunk of rows at a time, the products summed in
        fp32, so the backward never holds the whole input in fp32 (it did: the H100 peak barely moved with int8)."""
        chunk = FUSED_BACKWARD_CHUNK_ELEMENTS if fused(grad2d.device) else BACKWARD_CHUNK_ELEMENTS
        step = max(1, chunk // self.shape[-1])
        if self.sampled or self.bits == 16 or step >= grad2d.shape[0]:
            rows, index = self.restore(tensors)
            picked = grad2d if index is None else grad2d.index_select(0, index)
            return picked.t().matmul(rows.to(picked.dtype))
        total = None
        for start, stop in quant_int8.row_chunks(grad2d.shape[0], step):
            part = grad2d[start:stop].t().matmul(self.restore_rows(tensors, start, stop, grad2d.dtype)).float()
            total = part if total is None else total.add_(part)
        return total.to(grad2d.dtype)


class InputStore:
    """The compact form of one input tensor, shared by the linears it feeds, with its running range and seed."""

    def __init__(self, seed: int, int8: Optional[quant_int8.Config], keep_ratio: float = 1.0, bits: int = 8,
                 source: str = ""):
        """int8: the range settings (a `quant_int4_deriv.Config` with bits=4), None to keep the tensor; source: the
        layer's name for the input (`tokenwise` roles), under which a token-wise plan finds the compact form."""
        self.seed, self.int8, self.keep_ratio, self.bits, self.source = seed, int8, keep_ratio, bits, source
        self.running = quant_int8.RunningRange(int8.range_decay) if int8 else None
        self.step = 0
        self._source = None
        self._packed = None

    def pack(self, x: torch.Tensor, training: bool) -> Tuple[Packed, tuple]:
        cached = self._cached(x)
        if cached is not None:
            return cached
        if training:  # a training forward (the model packs only with autograd on) moves to the next step's draws
            self.step += 1
        seed = (self.seed * 1_000_003 + self.step) % (2**63 - 1)
        rows, index, weight = x.detach().reshape(-1, x.shape[-1]), None, None  # compact copies carry no graph
        k = wta_crs.budget(rows.shape[0], self.keep_ratio)
        if k < rows.shape[0]:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(seed)
            norms = kernel(wta_crs.row_norms, rows.device)(rows)
            index, weight = (t[0] for t in wta_crs.draw_rows(norms, k, generator))
            index, weight = _token_major(index, weight, tuple(x.shape))
            rows = rows.index_select(0, index)
        tensors = (rows,)
        if self.int8 and self.bits == 4:
            x3, scale, offset = quant_int8.ranged(rows, self.running, self.int8.num_groups, training,
                                                  levels=quant_int4_deriv.LEVELS)
            tensors = (quant_int4_deriv.encode_packed(x3, scale, offset, seed), scale, offset)
        elif self.int8:
            tensors = quant_int8.quantize(rows, self.running, self.int8.num_groups, training, seed).tensors
        if index is not None:
            tensors = (*tensors, index, weight)
        packed = Packed(self.bits if self.int8 else 16, index is not None, tuple(x.shape), x.dtype)
        self._remember(x, packed, tensors)
        if _collectors and self.source and (self.int8 or index is not None):
            _collectors[-1][self.source] = CompactForm.of(self.source, packed, tensors, seed)
        return packed, tensors

    def _remember(self, x: torch.Tensor, packed: Packed, tensors: tuple) -> None:
        """Keep the compact tensors for the next linear fed the same x, for as long as x lives.

        Why strong references: under a token-wise plan autograd holds only the plan's copies, so weak references
        to the compact tensors died between q_proj and k_proj, and k and v drew their own samples."""
        store = weakref.ref(self)

        def forget(source):
            if store() is not None and store()._source is not None and store()._source[0] is source:
                store()._source = store()._packed = None

        self._source = (weakref.ref(x, forget), x._version)
        self._packed = (packed, tensors)

    def _cached(self, x: torch.Tensor):
        if self._source is None or self._source[0]() is not x or self._source[1] != x._version:
            return None
        return self._packed


def _token_major(index: torch.Tensor, weight: torch.Tensor, shape: tuple):
    """The sample reordered by (token, sequence): the rows of any token range are then one slice, which a
    token-wise plan keeps, swaps or recomputes like a token range of a dense tensor. The estimate is a sum over
    the sample, so its order does not matter (duplicates carry equal weights)."""
    seq = shape[-2] if len(shape) >= 2 else 1
    batch = _rows(shape) // seq
    order = torch.argsort((index % seq) * batch + index // seq)
    return index.index_select(0, order), weight.index_select(0, order)


_collectors: List[Dict[str, "CompactForm"]] = []


@contextlib.contextmanager
def collecting(into: Dict[str, "CompactForm"]):
    """Inside, every store that packs a compact tensor records its `CompactForm` in `into`, keyed by its source
    (the token-wise runtime collects one layer's forward this way)."""
    _collectors.append(into)
    try:
        yield into
    finally:
        _collectors.pop()


@dataclass
class CompactForm:
    """One store's compact tensor as a token-wise plan splits it: `view` lays it out [B, units, F], units being the
    tokens (codes) or the sampled rows in token order; `encode` makes the units of a token range again from the
    recomputed input rows, with the original forward's ranges, sample and seed, so they equal the stored ones."""

    source: str
    packed: Packed
    view: Optional[torch.Tensor]
    """The whole compact tensor; the runtime drops it once it has split it."""
    scale: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    seed: int
    positions: Optional[List[int]] = None
    """Token of each sampled row, ascending (on the host: ranges are found by bisection)."""

    @classmethod
    def of(cls, source: str, packed: Packed, tensors: tuple, seed: int) -> "CompactForm":
        index = tensors[-2] if packed.sampled else None
        scale, offset = tensors[1:3] if packed.bits < 16 else (None, None)
        data, shape = tensors[0], packed.shape
        seq = shape[-2] if len(shape) >= 2 else 1
        if packed.sampled:
            view = data.view(1, index.numel(), -1)
        elif packed.bits == 4:  # two codes a byte: an even width, checked with the job (compression.silu=int4)
            assert shape[-1] % 2 == 0, f"4-bit codes of odd width {shape[-1]} cannot be split by token"
            view = data.view(-1, seq, shape[-1] // 2)
        else:
            view = data.view(-1, seq, shape[-1])
        return cls(source, packed, view, scale, offset, index, seed)

    @property
    def seq_len(self) -> int:
        shape = self.packed.shape
        return shape[-2] if len(shape) >= 2 else 1

    def units(self, token: int) -> int:
        """How many units lie before `token`."""
        if not self.packed.sampled:
            return token
        if self.positions is None:
            self.positions = (self.index % self.seq_len).tolist()
        return bisect.bisect_left(self.positions, token)

    def encode(self, source: torch.Tensor, start: int) -> torch.Tensor:
        """The units of tokens start .. start + n, from the input rows source [B, n, d] of those tokens."""
        seq, columns = self.seq_len, self.packed.shape[-1]
        if self.packed.sampled:
            first, stop = self.units(start), self.units(start + source.shape[1])
            chosen = self.index[first:stop]
            rows = source[chosen // seq, chosen % seq - start]
            if self.packed.bits == 16:
                return rows.view(1, -1, columns)
            return self._codes(rows, first).view(1, stop - first, -1)
        pieces = [self._codes(source[b], b * seq + start) for b in range(source.shape[0])]
        return torch.stack(pieces).view(source.shape[0], source.shape[1], -1)

    def _codes(self, rows: torch.Tensor, first_row: int) -> torch.Tensor:
        """The codes of these rows, the tensor's rows first_row onwards (packed two a byte for 4-bit codes)."""
        grouped = rows.reshape(rows.shape[0], self.scale.numel(), -1)
        if self.packed.bits == 4:
            return quant_int4_deriv.encode_packed(grouped, self.scale, self.offset, self.seed, first_row)
        return quant_int8.encode_seeded(grouped, self.scale, self.offset, quant_int8.LEVELS, self.seed, first_row)


def _rows(shape: tuple) -> int:
    total = 1
    for size in shape[:-1]:
        total *= size
    return total
