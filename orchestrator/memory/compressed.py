"""Per-layer wiring of the approximate techniques (Mesa int8, S2A int4, WTA-CRS) into `DecoderLayer`s: the job's
`compression` section, and a plan layer's `activation_compression` (the same settings as a string).

Each compressed module keeps its exact forward and its parameters (so DeepSpeed ZeRO, checkpoints and optimizers
see nothing new); what changes is what it saves for backward, through the model's slots (`orchestrator.model`):
the linears' and norms' `saved_input` hold an `InputStore` (`compact`), which hands autograd a compact copy of the
input, and the MLP's `saved_swiglu` keeps compact gate (and up) codes for silu(gate) * up. Linears fed the same
tensor (q/k/v, gate/up) share one store, so that tensor is stored once. The o projection stays exact: attention
keeps its input (the attention output) for its own backward anyway, so a compressed copy would add bytes, not save
them. The layer's `compression` slot records its `LayerSettings`; `apply` sets them from a section and fills the slots
again from the result.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F

from spec import activations as role
from spec.config import CompressionConfig
from spec.errors import ConfigError
from orchestrator.memory import compact, quant_int4_deriv, quant_int8
from orchestrator.memory.codec_kernels import fused, kernel
from orchestrator.memory.compact import InputStore, Packed
from orchestrator.model import input_linears


@dataclass
class Config:
    """A compression section (the job's, or a plan layer's `activation_compression` parsed) and the run's seed; the
    section's own `layers` is not read (`apply` is told the layers)."""

    section: CompressionConfig
    seed: int = 0


@dataclass
class LayerSettings:
    """What is compressed in one layer (None / 1.0: nothing): the layer's `compression` slot."""

    int8: Optional[quant_int8.Config] = None
    silu_int4: Optional[quant_int4_deriv.Config] = None
    keep_ratio: float = 1.0

    @property
    def is_active(self) -> bool:
        return self.int8 is not None or self.silu_int4 is not None or self.keep_ratio < 1


def apply(model, config: Config, layers: Iterable[int]) -> None:
    """Compress these layers as the section says (all three parts at once, replacing what they had): Mesa int8 for
    the chosen inputs, S2A int4 codes for the gate, WTA-CRS sampled rows for the linears' weight gradients; the
    slots are filled again (fresh stores, seeded by the run's seed and the layer index)."""
    section, seed = config.section, config.seed
    int8 = quant_int8.Config(section.range_decay, section.range_groups, linears=section.linear_inputs == "int8",
                             norms=section.norm_inputs == "int8", silu=section.silu == "int8", seed=seed)
    int4 = quant_int4_deriv.Config(section.range_decay, section.range_groups, seed=seed)
    settings = LayerSettings(int8=int8 if (int8.linears or int8.norms or int8.silu) else None,
                             silu_int4=int4 if section.silu == "int4" else None, keep_ratio=section.wta_crs_keep_ratio)
    for index in layers:
        layer = model.layers[index]
        layer.compression = settings if settings.is_active else None
        _fill_slots(layer, settings, seed * 1000 + index)


def _fill_slots(layer, settings: LayerSettings, seed: int) -> None:
    int8 = settings.int8
    linears = int8 if int8 and int8.linears else None
    compress_linears = linears is not None or settings.keep_ratio < 1
    stores = [InputStore(seed * 8 + i, linears, settings.keep_ratio, source=source)
              for i, source in enumerate((role.ATTN_NORM_OUT, role.MLP_NORM_OUT, role.GATED))]
    for store, projections in zip(stores, ((layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj),
                                           (layer.mlp.gate_proj, layer.mlp.up_proj), (layer.mlp.down_proj,))):
        for linear in (linear for projection in projections for linear in input_linears(projection)):
            linear.saved_input = store if compress_linears else None  # with LoRA: the adapters' lora_A
    norm_int8 = int8 if int8 and int8.norms else None
    for offset, (norm, source) in enumerate(((layer.attn_norm, role.LAYER_INPUT),
                                             (layer.mlp_norm, role.ATTN_RESIDUAL))):
        norm.saved_input = InputStore(seed * 8 + 3 + offset, norm_int8, source=source) if norm_int8 else None
    gate_codec = _gate_codec(settings, seed * 8 + 5)
    layer.mlp.saved_swiglu = (CompactSwiGLU(gate_codec, InputStore(seed * 8 + 6, linears, source=role.UP))
                              if gate_codec else None)


def _gate_codec(settings: LayerSettings, seed: int):
    if settings.silu_int4:
        return GateCodec(InputStore(seed, settings.silu_int4, bits=4, source=role.GATE))
    if settings.int8 and settings.int8.silu:
        return GateCodec(InputStore(seed, settings.int8, source=role.GATE))
    return None


class _CompactSwiGLU(torch.autograd.Function):
    """silu(gate) * up exactly; saves gate as 4-bit bin codes (S2A) or int8 codes, up exact or int8."""

    @staticmethod
    def forward(ctx, gate, up, gate_codec, gate_meta, up_packed: Packed, num_up: int, *tensors):
        ctx.gate_codec, ctx.gate_meta, ctx.up_packed, ctx.num_up = gate_codec, gate_meta, up_packed, num_up
        ctx.gate_shape = tuple(gate.shape)
        ctx.save_for_backward(*tensors)
        return kernel(swiglu_value, gate.device)(gate, up)

    @staticmethod
    def backward(ctx, grad):
        """Op by op, chunk by chunk of rows: restoring the whole gate and up in fp32 (with silu and silu' beside
        them) made this backward's peak larger than plain autograd's (H100, 64K tokens: 46.9 vs 42.9 GiB for 4
        layers). Fused, one kernel over all rows: it decodes in registers, so there are no fp32 temporaries."""
        tensors = ctx.saved_tensors
        up_tensors, gate_tensors = tensors[:ctx.num_up], tensors[ctx.num_up:]
        up_bits, gate_bits = ctx.up_packed.bits, ctx.gate_meta.bits
        columns = grad.shape[-1]
        grad_rows = grad.reshape(-1, columns)
        nones = (None, None, None, None) + (None,) * len(tensors)
        if fused(grad.device):
            grad_gate, grad_up = kernel(swiglu_grads, grad.device)(grad_rows, up_bits, up_tensors, gate_bits,
                                                                   gate_tensors, grad_rows.shape[0], columns)
            return (grad_gate.view(grad.shape), grad_up.view(grad.shape)) + nones
        grad_gate, grad_up = torch.empty_like(grad_rows), torch.empty_like(grad_rows)
        step = max(2, compact.BACKWARD_CHUNK_ELEMENTS // columns // 2 * 2)  # even: 4-bit chunks start on a byte
        for start, stop in quant_int8.row_chunks(grad_rows.shape[0], step):
            grad_gate[start:stop], grad_up[start:stop] = swiglu_grads(
                grad_rows[start:stop], up_bits, ctx.up_packed.row_slice(up_tensors, start, stop), gate_bits,
                ctx.gate_meta.row_slice(gate_tensors, start, stop), stop - start, columns)
        return (grad_gate.view(grad.shape), grad_up.view(grad.shape)) + nones


def swiglu_value(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_grads(grad: torch.Tensor, up_bits: int, up: tuple, gate_bits: int, gate: tuple, rows: int, columns: int):
    """(d gate, d up) of silu(gate) * up for `rows` rows, from the compact up and gate tensors of those rows: the
    values decoded in fp32, silu and silu' read at the gate's level (`GateCodec.evaluate`)."""
    up32 = compact.decoded_rows(up_bits, up, rows, columns, torch.float32)
    value, slope = GateCodec.evaluate(compact.decoded_rows(gate_bits, gate, rows, columns, torch.float32))
    grad32 = grad.float()
    return (grad32 * up32 * slope).to(grad.dtype), (grad32 * value).to(grad.dtype)


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


class CompactSwiGLU:
    """The MLP's `saved_swiglu` slot: silu(gate) * up, saving compact gate codes and an up exact or as int8."""

    def __init__(self, gate_codec: GateCodec, up_store: InputStore):
        self.gate_codec, self.up_store = gate_codec, up_store

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, training: bool) -> torch.Tensor:
        up_packed, up_tensors = self.up_store.pack(up, training)
        gate_meta, gate_tensors = self.gate_codec.pack(gate, training)
        return _CompactSwiGLU.apply(gate, up, self.gate_codec, gate_meta, up_packed, len(up_tensors), *up_tensors,
                                    *gate_tensors)


def _stores(model) -> Dict[str, InputStore]:
    """Every InputStore of the model once (q/k/v share one), keyed by the first module path that holds it (the
    keys checkpoints carry: `.store` for a saved input, `.up_store` and `.gate_codec` for a SwiGLU)."""
    found: Dict[str, InputStore] = {}
    seen = set()
    for name, module in model.named_modules():
        swiglu = getattr(module, "saved_swiglu", None)
        candidates = [("store", getattr(module, "saved_input", None)),
                      ("up_store", swiglu.up_store if swiglu is not None else None),
                      ("gate_codec", swiglu.gate_codec.store if swiglu is not None else None)]
        for attribute, store in candidates:
            if store is not None and id(store) not in seen:
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
