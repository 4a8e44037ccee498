"""Per-layer wiring of the approximate techniques (Mesa int8, S2A int4, WTA-CRS) into `DecoderLayer`s.

Why class swaps: a compressed linear, norm or MLP is the same module object with the same parameters (so
DeepSpeed ZeRO, checkpoints and optimizers see nothing new), whose class is switched to a subclass with another
forward; `install` switches back when a layer loses its compression. Each subclass runs the exact forward and
gives autograd a compact copy of what the backward needs. Linears fed the same tensor (q/k/v, gate/up) share one
`InputStore`, which compresses (samples, quantises) that tensor once per forward and hands every linear the same
compact tensors, so they are stored once. The o projection stays exact: attention keeps its input (the attention
output) for its own backward anyway, so a compressed copy would add bytes, not save them.

The compact tensors are what `ctx.save_for_backward` receives, hence what saved-tensor hooks (a swap) see:
uint8 codes with fp32 per-group scale/offset, packed 4-bit codes, or sampled rows (in token order) with int64
indices and fp32 importance weights. Under a token-wise plan (`tokenwise`) each store reports its `CompactForm`, and
the plan keeps, swaps or recomputes its token ranges like any activation: the swap moves the compact bytes, and a
recomputed range is encoded again with the stored ranges, sample and seed (rounding noise is seeded per block of
rows), so it equals what was stored. `replaying()` marks a whole forward run again: ranges do not move and the
step's seed is reused.
"""

import bisect
import contextlib
import weakref
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from spec.errors import ConfigError
from orchestrator.memory import quant_int4_deriv, quant_int8, wta_crs
from orchestrator.model import MLP, RMSNorm, _RMSNormFunction

_replay_depth = 0
BACKWARD_CHUNK_ELEMENTS = 2**24
"""Elements of the SwiGLU backward restored at once (fp32 temporaries of ~6 x 64 MiB)."""


@contextlib.contextmanager
def replaying():
    """Mark forwards run inside as recomputations: no range updates, the same random draws as the original."""
    global _replay_depth
    _replay_depth += 1
    try:
        yield
    finally:
        _replay_depth -= 1


@dataclass
class LayerSettings:
    """What is compressed in one layer (None / 1.0: nothing)."""

    int8: Optional[quant_int8.Config] = None
    silu_int4: Optional[quant_int4_deriv.Config] = None
    keep_ratio: float = 1.0


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
        rows_shape = (index.numel() if self.sampled else _rows(self.shape), self.shape[-1])
        if self.bits == 16:
            rows = tensors[0].reshape(rows_shape)
        else:
            codes, scale, offset = tensors
            if self.bits == 4:
                codes = quant_int4_deriv.unpack_nibbles(codes, rows_shape[0] * rows_shape[1])
            codes = codes.reshape(rows_shape[0], scale.numel(), -1)
            rows = quant_int8.Int8Codes(codes, scale, offset, rows_shape, torch.float32).dequantize()
        if weight is not None:
            rows = rows.float() * weight.unsqueeze(1)
        return rows.to(self.dtype), index

    def restore_rows(self, tensors, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of an unsampled compact tensor, in fp32, without restoring the rest (a backward that
        works chunk by chunk keeps its fp32 temporaries to one chunk)."""
        tensors = list(tensors)
        columns = self.shape[-1]
        if self.bits == 16:
            return tensors[0].reshape(-1, columns)[start:stop].float()
        codes, scale, offset = tensors
        if self.bits == 4:  # two codes per byte in row-major order: `start * columns` must be even
            assert start * columns % 2 == 0, "4-bit rows must start on a byte"
            codes = quant_int4_deriv.unpack_nibbles(codes[start * columns // 2:(stop * columns + 1) // 2],
                                                    (stop - start) * columns)
        else:
            codes = codes.reshape(-1, columns)[start:stop]
        codes = codes.reshape(stop - start, scale.numel(), -1)
        return quant_int8.Int8Codes(codes, scale, offset, (stop - start, columns), torch.float32).dequantize()


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
        updating = self.updating(training)
        if updating:  # a training forward that is not a replay moves to the next step's draws
            self.step += 1
        seed = (self.seed * 1_000_003 + self.step) % (2**63 - 1)
        rows, index, weight = x.detach().reshape(-1, x.shape[-1]), None, None  # compact copies carry no graph
        k = wta_crs.budget(rows.shape[0], self.keep_ratio)
        if k < rows.shape[0]:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(seed)
            index, weight = (t[0] for t in wta_crs.draw_rows(wta_crs.row_norms(rows), k, generator))
            index, weight = _token_major(index, weight, tuple(x.shape))
            rows = rows.index_select(0, index)
        tensors = (rows,)
        if self.int8:
            levels = quant_int4_deriv.LEVELS if self.bits == 4 else quant_int8.LEVELS
            tensors = quant_int8.quantize(rows, self.running, self.int8.num_groups, updating, seed,
                                          levels=levels).tensors
            if self.bits == 4:
                tensors = (quant_int4_deriv.pack_nibbles(tensors[0]), *tensors[1:])
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

    def updating(self, training: bool) -> bool:
        return training and _replay_depth == 0


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
        elif packed.bits == 4:
            if shape[-1] % 2:
                raise ConfigError(f"S2A int4 codes under a token-wise plan need an even width, got {shape[-1]}; "
                                  "use compression.silu=int8 or an even model.intermediate_size")
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
            return self._codes(rows, first, self.index.numel()).view(1, stop - first, -1)
        pieces = [self._codes(source[b], b * seq + start, source.shape[0] * seq) for b in range(source.shape[0])]
        return torch.stack(pieces).view(source.shape[0], source.shape[1], -1)

    def _codes(self, rows: torch.Tensor, first_row: int, total_rows: int) -> torch.Tensor:
        levels = quant_int4_deriv.LEVELS if self.packed.bits == 4 else quant_int8.LEVELS
        grouped = rows.reshape(rows.shape[0], self.scale.numel(), -1)
        codes = quant_int8.encode_rows(grouped, self.scale, self.offset, levels, self.seed, first_row, total_rows)
        return quant_int4_deriv.pack_nibbles(codes) if self.packed.bits == 4 else codes


def _rows(shape: tuple) -> int:
    total = 1
    for size in shape[:-1]:
        total *= size
    return total


class _CompactInputLinear(torch.autograd.Function):
    """y = x W^T + b exactly; backward: dx = g W and db = sum g exactly, dW from the compact input."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed: Packed, *tensors):
        ctx.packed, ctx.has_bias, ctx.num_compact = packed, bias is not None, len(tensors)
        ctx.save_for_backward(weight, *tensors)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, *tensors = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(ctx.packed, tensors, grad2d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2d.sum(0)
        return (grad_x, grad_w, grad_b, None) + (None,) * ctx.num_compact


def row_chunks(num_rows: int, step: int):
    """(start, stop) of consecutive ranges of `step` rows (the last may be shorter) covering `num_rows`: the chunked
    backwards here and the int8 swap (`tokenwise.Int8Swap`) bound their fp32 temporaries this way."""
    return ((start, min(start + step, num_rows)) for start in range(0, num_rows, step))


def _weight_grad(packed: Packed, tensors, grad2d: torch.Tensor) -> torch.Tensor:
    """g^T x from the compact x; unsampled codes are restored a chunk of rows at a time, the products summed in
    fp32, so the backward never holds the whole input in fp32 (it did: the H100 peak barely moved with int8)."""
    step = max(1, BACKWARD_CHUNK_ELEMENTS // packed.shape[-1])
    if packed.sampled or packed.bits == 16 or step >= grad2d.shape[0]:
        rows, index = packed.restore(tensors)
        picked = grad2d if index is None else grad2d.index_select(0, index)
        return picked.t().matmul(rows.to(picked.dtype))
    total = None
    for start, stop in row_chunks(grad2d.shape[0], step):
        part = grad2d[start:stop].t().matmul(packed.restore_rows(tensors, start, stop).to(grad2d.dtype)).float()
        total = part if total is None else total.add_(part)
    return total.to(grad2d.dtype)


class CompressedLinear(nn.Linear):
    """An nn.Linear whose saved input is its `store`'s compact form."""

    store: InputStore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        packed, tensors = self.store.pack(x, self.training)
        return _CompactInputLinear.apply(x, self.weight, self.bias, packed, *tensors)


class _CompactInputRMSNorm(torch.autograd.Function):
    """The model's RMSNorm (same forward), with its saved input int8; the backward runs on the dequantised input."""

    @staticmethod
    def forward(ctx, x, weight, eps, packed: Packed, *tensors):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.packed = packed
        ctx.save_for_backward(weight, rstd, *tensors)
        return (x32 * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad):
        weight, rstd, *tensors = ctx.saved_tensors
        rows, _ = ctx.packed.restore(tensors)
        exact = SimpleNamespace(saved_tensors=(rows.reshape(ctx.packed.shape), weight, rstd))
        grad_x, grad_weight, _ = _RMSNormFunction.backward(exact, grad)
        return (grad_x, grad_weight, None, None) + (None,) * len(tensors)


class Int8RMSNorm(RMSNorm):
    store: InputStore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        packed, tensors = self.store.pack(x, self.training)
        return _CompactInputRMSNorm.apply(x, self.weight, self.eps, packed, *tensors)


class _CompactSwiGLU(torch.autograd.Function):
    """silu(gate) * up exactly; saves gate as 4-bit bin codes (S2A) or int8 codes, up exact or int8."""

    @staticmethod
    def forward(ctx, gate, up, gate_codec, gate_meta, up_packed: Packed, num_up: int, *tensors):
        ctx.gate_codec, ctx.gate_meta, ctx.up_packed, ctx.num_up = gate_codec, gate_meta, up_packed, num_up
        ctx.gate_shape = tuple(gate.shape)
        ctx.save_for_backward(*tensors)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        """Chunk by chunk of rows: restoring the whole gate and up in fp32 (with silu and silu' beside them) made
        this backward's peak larger than plain autograd's (H100, 64K tokens: 46.9 vs 42.9 GiB for 4 layers)."""
        tensors = ctx.saved_tensors
        up_tensors, gate_tensors = tensors[:ctx.num_up], tensors[ctx.num_up:]
        columns = grad.shape[-1]
        grad_rows = grad.reshape(-1, columns)
        grad_gate, grad_up = torch.empty_like(grad_rows), torch.empty_like(grad_rows)
        step = max(2, BACKWARD_CHUNK_ELEMENTS // columns // 2 * 2)  # even: 4-bit chunks start on a byte
        for start, stop in row_chunks(grad_rows.shape[0], step):
            up = ctx.up_packed.restore_rows(up_tensors, start, stop)
            value, slope = ctx.gate_codec.evaluate(ctx.gate_meta.restore_rows(gate_tensors, start, stop))
            grad32 = grad_rows[start:stop].float()
            grad_gate[start:stop] = grad32 * up * slope
            grad_up[start:stop] = grad32 * value
        return (grad_gate.view(grad.shape), grad_up.view(grad.shape), None, None, None, None) + (None,) * len(tensors)


class GateCodec:
    """gate -> int8 (Mesa) or packed 4-bit (S2A) codes; backward evaluates silu and silu' at the restored level."""

    def __init__(self, store: InputStore):
        self.store = store

    def pack(self, gate: torch.Tensor, training: bool) -> tuple:
        return self.store.pack(gate, training)

    def restore(self, meta: Packed, tensors, shape: tuple):
        gate, _ = meta.restore(tensors)
        return self.evaluate(gate.float().reshape(shape))

    @staticmethod
    def evaluate(gate: torch.Tensor):
        """silu and silu' at the restored (fp32) gate levels."""
        return F.silu(gate), quant_int4_deriv.silu_derivative(gate)


class CompressedMLP(MLP):
    """SwiGLU whose silu(gate) * up saves compact gate (and up) codes; its linears are swapped separately."""

    gate_codec: object
    up_store: InputStore

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> dict:
        if not torch.is_grad_enabled():
            return super().swiglu(gate, up)
        up_packed, up_tensors = self.up_store.pack(up, self.training)
        gate_meta, gate_tensors = self.gate_codec.pack(gate, self.training)
        return {"gated": _CompactSwiGLU.apply(gate, up, self.gate_codec, gate_meta, up_packed, len(up_tensors),
                                              *up_tensors, *gate_tensors)}


def install(model, layers: Iterable[int], seed: int = 0, **changes) -> None:
    """Merge `changes` (fields of `LayerSettings`) into the listed layers' settings and switch their modules."""
    for index in layers:
        layer = model.layers[index]
        settings = replace(getattr(layer, "compression", None) or LayerSettings(), **changes)
        layer.compression = settings
        _install_layer(layer, settings, seed * 1000 + index)


def _install_layer(layer, settings: LayerSettings, seed: int) -> None:
    int8 = settings.int8
    linears = int8 if int8 and int8.linears else None
    compress_linears = linears is not None or settings.keep_ratio < 1
    stores = [InputStore(seed * 8 + i, linears, settings.keep_ratio, source=source)
              for i, source in enumerate(("attn_norm_out", "mlp_norm_out", "gated"))]
    for store, projections in zip(stores, ((layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj),
                                           (layer.mlp.gate_proj, layer.mlp.up_proj), (layer.mlp.down_proj,))):
        for projection in projections:
            _become(projection, CompressedLinear if compress_linears else nn.Linear, store=store)
    norm_int8 = int8 if int8 and int8.norms else None
    for offset, (norm, source) in enumerate(((layer.attn_norm, "layer_input"), (layer.mlp_norm, "attn_residual"))):
        _become(norm, Int8RMSNorm if norm_int8 else RMSNorm,
                store=InputStore(seed * 8 + 3 + offset, norm_int8, source=source))
    gate_codec = _gate_codec(settings, seed * 8 + 5)
    _become(layer.mlp, CompressedMLP if gate_codec else MLP, gate_codec=gate_codec,
            up_store=InputStore(seed * 8 + 6, linears, source="up"))


def _gate_codec(settings: LayerSettings, seed: int):
    if settings.silu_int4:
        return GateCodec(InputStore(seed, settings.silu_int4, bits=4, source="gate"))
    if settings.int8 and settings.int8.silu:
        return GateCodec(InputStore(seed, settings.int8, source="gate"))
    return None


def _become(module: nn.Module, cls: type, **attributes) -> None:
    """Switch the module's class; the compressed classes get their stores, plain ones lose them."""
    module.__class__ = cls
    for name, value in attributes.items():
        if cls in (nn.Linear, RMSNorm, MLP):
            module.__dict__.pop(name, None)
        else:
            setattr(module, name, value)


def apply_config(model, section, seed: int) -> bool:
    """Install the job config's `compression` section; False when it asks for nothing."""
    if not section.is_active:
        return False
    install_settings(model, section, section.layer_indices(len(model.layers)), seed)
    return True


def install_settings(model, section, layers, seed: int) -> None:
    """Compress these layers with a `compression` section's settings (its own `layers` is not read)."""
    int8 = quant_int8.Config(section.range_decay, section.range_groups, linears=section.linear_inputs == "int8",
                             norms=section.norm_inputs == "int8", silu=section.silu == "int8")
    install(model, layers, seed, int8=int8 if (int8.linears or int8.norms or int8.silu) else None,
            silu_int4=quant_int4_deriv.Config(section.range_decay, section.range_groups) if section.silu == "int4"
            else None, keep_ratio=section.wta_crs_keep_ratio)


def _stores(model) -> Dict[str, InputStore]:
    """Every InputStore of the model once (q/k/v share one), keyed by the first module path that holds it."""
    found: Dict[str, InputStore] = {}
    seen = set()
    for name, module in model.named_modules():
        codec = module.__dict__.get("gate_codec")
        candidates = [("store", module.__dict__.get("store")), ("up_store", module.__dict__.get("up_store")),
                      ("gate_codec", codec.store if codec is not None else None)]
        for attribute, store in candidates:
            if isinstance(store, InputStore) and id(store) not in seen:
                seen.add(id(store))
                found[f"{name}.{attribute}"] = store
    return found


def state_dict(model) -> Dict[str, dict]:
    """What a resume needs to continue bit for bit: each store's running range and sampling step.

    Why: the ranges are running estimates and the random draws are seeded by the step count, so a run resumed
    without them quantises and samples differently from the run it continues."""
    state = {}
    for key, store in _stores(model).items():
        running = store.running
        state[key] = {"step": store.step,
                      "alpha": running.alpha.cpu() if running is not None and running.alpha is not None else None,
                      "beta": running.beta.cpu() if running is not None and running.beta is not None else None}
    return state


def load_state_dict(model, state: Dict[str, dict]) -> None:
    """Restore `state_dict`'s output into a model compressed with the same settings (one line if it differs)."""
    stores = _stores(model)
    if set(stores) != set(state):
        raise ConfigError(f"the checkpoint's compression state covers {len(state)} stores and this model has "
                          f"{len(stores)}; resume with the compression section the run was started with")
    device = next(model.parameters()).device
    for key, store in stores.items():
        saved = state[key]
        store.step = saved["step"]
        if store.running is not None and saved["alpha"] is not None:
            store.running.alpha = saved["alpha"].to(device)
            store.running.beta = saved["beta"].to(device)
