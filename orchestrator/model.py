"""A Llama-style decoder written for longtrain: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Why our own: the memory techniques (swap, recompute, quantization, token elimination) need to decide, per layer,
what each block saves for backward. So the layer is spelled out as explicit modules (`DecoderLayer`, its
`Attention` and `MLP`), attention goes through one fused kernel (`orchestrator.attention`: PyTorch's SDPA, or
FlashAttention-4 with train.attention_kernel=fa4), and the layers live in one `ModuleList` a technique can wrap one
by one. Shapes: B batch, S tokens, H heads, D head dim.
Hugging Face's Llama, Mistral (without a sliding window) and Qwen2 (q/k/v biases) are this model
(`model.architecture`); RoPE scaling for context extension is in `orchestrator.rope`.

Slots: a memory technique (`orchestrator.memory`) changes a layer only through these attributes, each None until
it sets one, and this module imports none of them. The forward stays this module's; a slot decides what is kept
for backward, or (token elimination) which rows the attention block sees.
- `Linear.saved_input`, `RMSNorm.saved_input`: an object with `pack(x, training) -> (packed, tensors)`; the module
  computes its exact output and saves `tensors` (a compact form of x) instead of x. Backward reads x back with
  `packed.restore_tensor(tensors)` (the norm) or the weight gradient with `packed.weight_grad(tensors, grad)` (the
  linear; from sampled rows it is an estimate).
- `MLP.saved_swiglu`: an object whose `swiglu(gate, up, training)` computes silu(gate) * up exactly and keeps
  compact codes of gate and up.
- `DecoderLayer.activation_hooks`: saved-tensor hooks for one forward (the token-wise swap and recompute).
- `DecoderLayer.token_elim`: runs the layer's `forward` and `recompute_tokens` instead (a sparse layer).
- `DecoderLayer.compression`: what the layer's saved-input slots were set from (a record, read by techniques).
- `Attention.sequence_parallel`, `LlamaModel.layer_runner`: attention over the whole sequence from a shard, and
  a runner of whole layers (activation checkpointing).
- `MLP.tiling`: runs the MLP in sequence tiles that save only the MLP's input (`memory.tiled_mlp`, DeepSpeed's
  TiledMLP); `LlamaModel.loss_function`: replaces the segmented loss (the ALST recipe's TiledFusedLogitsLoss).
- LoRA (`orchestrator.lora`, peft) wraps the projections; the frozen base `Linear` then saves nothing for its
  weight, and the slot that keeps a compact input is the adapter's `lora_A` (`input_linears` finds it).
- `RMSNorm.kernels`, `Attention.rope`, `MLP.fused_swiglu`: the norm's, RoPE's and SwiGLU's arithmetic as fused
  kernels (`orchestrator.elementwise`, train.elementwise=compiled); the eager functions here otherwise.
- `Attention.documents`: not a technique's: the micro-batch's packed documents (`orchestrator.attention`), set by
  `LlamaModel.forward` for one forward and its backward; attention then stays within each document.
"""

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from spec import activations as role
from spec.config import ModelConfig
from orchestrator.attention import causal_attention, document_attention
from orchestrator.loss import segmented_cross_entropy
from orchestrator.rope import inverse_frequencies


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The norm's output and its fp32 scale per token (what backward needs besides the input)."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * rstd).type_as(x) * weight, rstd


def rms_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the input and the weight, the normalised input recomputed from the input and its scale."""
    normed = x.float() * rstd
    grad_out32 = grad_out.float()
    grad_weight = (grad_out32 * normed.type_as(x).float()).flatten(0, -2).sum(0)
    grad_normed = grad_out32 * weight.float()
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    return grad_x.type_as(x), grad_weight  # fp32: `_RMSNormFunction` sums its row chunks' before rounding


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that saves only its input (activation dtype) and one fp32 scale per token for backward, or instead
    of the input its compact form (`packed` and its tensors, from `RMSNorm.saved_input`).

    Why not plain autograd: the fp32 upcast would be saved by autograd (2x the bytes of a bf16 input, in every
    layer, twice); at 1M tokens that is gigabytes per layer. The backward recomputes the normalised input.
    `kernels` (`RMSNorm.kernels`) computes both directions: these functions, or the same compiled. Both run on
    `NORM_CHUNK_ROWS` tokens at a time (`_by_rows`): their fp32 work (the upcast input and gradient, the normalised
    rows and their products: about ten fp32 bytes a bf16 element at once, 25 GiB at 320K tokens x 4096 in one go)
    is then one chunk's, and the planner's working set (the tensors in and out) is what exists.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, kernels, packed=None, *compact: torch.Tensor):
        out, rstd = _by_rows(lambda rows: kernels.rms_norm_forward(rows[0], weight, eps), x)
        ctx.packed, ctx.kernels = packed, kernels
        if packed is None:
            ctx.save_for_backward(x, weight, rstd)
        else:
            ctx.save_for_backward(weight, rstd, *compact)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.packed is None:
            x, weight, rstd = ctx.saved_tensors
            compact = ()
        else:
            weight, rstd, *compact = ctx.saved_tensors
            x = ctx.packed.restore_tensor(compact)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

        def chunk_backward(rows):
            grad_rows, weight_part = ctx.kernels.rms_norm_backward(rows[0], rows[1], weight, rows[2])
            grad_weight.add_(weight_part)
            return (grad_rows,)

        (grad_x,) = _by_rows(chunk_backward, grad_out, x, rstd)
        return (grad_x, grad_weight.type_as(weight), None, None, None) + (None,) * len(compact)


NORM_CHUNK_ROWS = 8192
"""Tokens an RMSNorm forward or backward computes at once (`_RMSNormFunction`)."""


def _by_rows(fn, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """`fn` on the tensors' rows (all but the last dim; equal row counts), `NORM_CHUNK_ROWS` at a time, its outputs
    written into whole tensors of the first tensor's leading shape: each row's result is the unchunked one."""
    lead = tensors[0].shape[:-1]
    rows = [t.reshape(-1, t.shape[-1]) for t in tensors]
    count = rows[0].shape[0]
    if count <= NORM_CHUNK_ROWS:
        return fn(tensors)
    outs = None
    for start in range(0, count, NORM_CHUNK_ROWS):
        parts = fn([r[start:start + NORM_CHUNK_ROWS] for r in rows])
        if outs is None:
            outs = [torch.empty((count, p.shape[-1]), dtype=p.dtype, device=p.device) for p in parts]
        for out, part in zip(outs, parts):
            out[start:start + part.shape[0]] = part
    return tuple(out.view(*lead, out.shape[-1]) for out in outs)


class EagerKernels:
    """The layer's elementwise work as written here, run op by op (`orchestrator.elementwise` compiles the same)."""

    rms_norm_forward = staticmethod(rms_norm_forward)
    rms_norm_backward = staticmethod(rms_norm_backward)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activation dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.saved_input = None
        """Slot (see the module docstring): keeps a compact form of the input for backward."""
        self.kernels = EagerKernels
        """Slot: computes the norm's forward and backward (`orchestrator.elementwise`: compiled)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.saved_input is None or not torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps, self.kernels, None)
        packed, compact = self.saved_input.pack(x, self.training)
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.kernels, packed, *compact)


class _CompactInputLinear(torch.autograd.Function):
    """y = x W^T + b exactly; backward: dx = g W and db = sum g exactly, dW from the compact input's `packed`."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed, *compact):
        ctx.packed, ctx.has_bias, ctx.num_compact = packed, bias is not None, len(compact)
        ctx.save_for_backward(weight, *compact)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, *compact = ctx.saved_tensors
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = ctx.packed.weight_grad(compact, grad2d) if ctx.needs_input_grad[1] else None
        grad_b = grad2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (grad_x, grad_w, grad_b, None) + (None,) * ctx.num_compact


class Linear(nn.Linear):
    """nn.Linear with a slot (see the module docstring): `saved_input` keeps a compact form of the input, from
    which backward makes the weight gradient; the output and the input gradient stay exact."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.saved_input = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.saved_input is None or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        packed, compact = self.saved_input.pack(x, self.training)
        return _CompactInputLinear.apply(x, self.weight, self.bias, packed, *compact)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                scaling=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [S, D] for the given token positions (rotate-half layout); `scaling`:
    model.rope_scaling (orchestrator/rope.py), none for plain RoPE."""
    inv_freq, attention_factor = inverse_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:  # YaRN: scales the attention logits by its square
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by the position tables [S, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query attention: num_kv_heads key/value heads shared by groups of query heads.

    Split in two so a memory technique can recompute the per-token part (`project`) for a slice of the tokens
    without repeating the quadratic part (`attend`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(config.hidden_size, config.hidden_size, bias=False)
        self.sequence_parallel = None
        """Set by `orchestrator.sequence_parallel.install`: attention over the whole sequence from this rank's shard."""
        self.documents = None
        """The packed documents of this forward (a `DocumentLayout`, whole sequence), set by `LlamaModel.forward`;
        None: causal attention over the whole sequence."""
        self.rope = apply_rope
        """Slot: rotates q and k (`orchestrator.elementwise`: a fused kernel with its own backward)."""
        self.kernel = "sdpa"
        """train.attention_kernel: sdpa (PyTorch's fused kernels: cuDNN's or FlashAttention-2 on a GPU) or fa4
        (`orchestrator.attention_fa4`); packed documents' kernel follows it where data.document_attention=auto."""

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, H, S, D], k and v [B, Hkv, S, D], RoPE applied: per token, so any token slice recomputes alone."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return self.rope(q, cos, sin), self.rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over all tokens: [B, H, S, D]."""
        if self.sequence_parallel is not None:
            return self.sequence_parallel(q, k, v, documents=self.documents)
        if self.documents is not None:
            return document_attention(q, k, v, self.documents, self.kernel)
        return causal_attention(q, k, v, self.kernel)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        out = self.attend(*self.project(x, cos, sin))
        return self.o_proj(merge_heads(out))


def merge_heads(attn_out: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H * D] (a view when SDPA wrote B, S, H, D, as its kernels do)."""
    batch, _, seq, _ = attn_out.shape
    return attn_out.transpose(1, 2).reshape(batch, seq, -1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.saved_swiglu = None
        """Slot (see the module docstring): computes silu(gate) * up keeping compact codes of gate and up."""
        self.fused_swiglu = None
        """Slot: computes silu(gate) * up saving gate and up only (`orchestrator.elementwise`)."""
        self.tiling = None
        """Slot: called as tiling(mlp, x) instead of the forward (the tiled MLP)."""

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> dict:
        """silu(gate) * up and the intermediates autograd saves (with `saved_swiglu`, compact codes instead)."""
        if self.saved_swiglu is not None and torch.is_grad_enabled():
            return {role.GATED: self.saved_swiglu.swiglu(gate, up, self.training)}
        if self.fused_swiglu is not None and torch.is_grad_enabled():
            return {role.GATED: self.fused_swiglu(gate, up)}
        silu_gate = F.silu(gate)
        return {role.SILU_GATE: silu_gate, role.GATED: silu_gate * up}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiling is not None:
            return self.tiling(self, x)
        return self.untiled(x)

    def untiled(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.swiglu(self.gate_proj(x), self.up_proj(x))[role.GATED])


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Under `activation_hooks` the forward names its intermediates by role (`hooks.tag`, roles from
    `spec.activations`) so the hooks know which saved tensor is which."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)
        self.activation_hooks = None
        """Slot: called as activation_hooks(layer, x, cos, sin), gives the saved-tensor hooks of one forward."""
        self.token_elim = None
        """Slot: an object whose forward(layer, x, cos, sin) and recompute_tokens(layer, ...) run instead."""
        self.compression = None
        """Slot: the settings this layer's saved-input slots were filled from."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.token_elim is not None:
            return self.token_elim.forward(self, x, cos, sin)
        if self.activation_hooks is None or not torch.is_grad_enabled():
            x = x + self.attn(self.attn_norm(x), cos, sin)
            return x + self.mlp(self.mlp_norm(x))
        hooks = self.activation_hooks(self, x, cos, sin)
        with hooks:
            attn_inputs = self.attention_inputs(x, cos, sin)
            hooks.tag({role.LAYER_INPUT: x, **attn_inputs})
            attn_out = self.attn.attend(attn_inputs[role.Q], attn_inputs[role.K], attn_inputs[role.V])
            hooks.tag({role.ATTN_OUT: attn_out})
            mlp = self.mlp_part(x, attn_out)
            hooks.tag({k: v for k, v in mlp.items() if k != "out"})
            return mlp["out"]

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> dict:
        """The per-token tensors before attention."""
        normed = self.attn_norm(x)
        q, k, v = self.attn.project(normed, cos, sin)
        return {role.ATTN_NORM_OUT: normed, role.Q: q, role.K: k, role.V: v}

    def mlp_part(self, x: torch.Tensor, attn_out: torch.Tensor) -> dict:
        """The per-token tensors after attention, from the layer input and the attention output."""
        return self.mlp_tensors(x + self.attn.o_proj(merge_heads(attn_out)))

    def mlp_tensors(self, residual: torch.Tensor) -> dict:
        """The per-token tensors of the MLP half, from the residual stream after attention."""
        normed = self.mlp_norm(residual)
        if self.mlp.tiling is not None:  # the tiled MLP saves only its input; recomputation needs nothing more
            tensors = {role.ATTN_RESIDUAL: residual, role.MLP_NORM_OUT: normed}
            return {**tensors, "out": residual + self.mlp(normed)} if torch.is_grad_enabled() else tensors
        gate, up = self.mlp.gate_proj(normed), self.mlp.up_proj(normed)
        swiglu = self.mlp.swiglu(gate, up)
        return {role.ATTN_RESIDUAL: residual, role.MLP_NORM_OUT: normed, role.GATE: gate, role.UP: up, **swiglu,
                "out": residual + self.mlp.down_proj(swiglu[role.GATED])}

    def recompute_tokens(self, group: str, skeletal: dict, cos: torch.Tensor, sin: torch.Tensor, start: int,
                         length: int, context: dict) -> dict:
        """The token-wise tensors of `group` ("attention" or "mlp") for tokens [start, start + length), from the
        skeletal tensors (layer input, attention output): what the token-wise runtime recomputes. `context` holds
        what else the forward tagged (a sparse layer's kept token indices, read by its `token_elim`)."""
        if self.token_elim is not None:
            return self.token_elim.recompute_tokens(self, group, skeletal, cos, sin, start, length, context)
        x = skeletal[role.LAYER_INPUT].narrow(1, start, length)
        if group == "attention":
            return self.attention_inputs(x, cos.narrow(-2, start, length), sin.narrow(-2, start, length))
        return self.mlp_part(x, skeletal[role.ATTN_OUT].narrow(2, start, length))


class LlamaModel(nn.Module):
    """Token ids [B, S] -> logits [B, S, vocab], or the mean next-token cross-entropy given targets."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.layer_runner = None
        """Set by a technique that runs whole layers itself (DeepSpeed activation checkpointing): called as
        runner(layer, x, cos, sin)."""
        self.loss_function = None
        """Set by a technique that computes the loss itself: called as loss_function(hidden, lm_head, targets)."""
        self.reset_parameters()

    def reset_parameters(self, whole=None) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * layers) (GPT-2); biases
        (Qwen2's q/k/v) zero. `whole(param)`: a context in which a partitioned parameter is whole (a model built
        under ZeRO-3's zero.Init, whose parameters are empty outside it)."""
        residual_std = self.config.init_std / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            with whole(param) if whole is not None else contextlib.nullcontext():
                if name.endswith("norm.weight"):
                    nn.init.ones_(param)
                elif name.endswith(".bias"):
                    nn.init.zeros_(param)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(param, std=residual_std)
                else:
                    nn.init.normal_(param, std=self.config.init_std)

    def hidden_states(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      documents=None) -> torch.Tensor:
        """`positions`: [S] for every row, or [B, S] per row (packed documents restart them); `documents`: the
        `DocumentLayout` of packed documents (attention within each), None for one causal sequence per row."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        rows = positions if positions.dim() == 2 else None
        if rows is not None:
            positions = rows.flatten()
        x = self.embed(tokens)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype,
                               self.config.rope_scaling)
        if rows is not None:  # [B, 1, S, D]: per row, broadcast over heads
            cos, sin = (table.view(*rows.shape, -1)[:, None] for table in (cos, sin))
        for layer in self.layers:
            layer.attn.documents = documents
        for layer in self.layers:
            x = layer(x, cos, sin) if self.layer_runner is None else self.layer_runner(layer, x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, documents=None) -> torch.Tensor:
        """Logits, or with `targets` the mean cross-entropy (so a DeepSpeed engine call returns the loss), computed
        in token chunks so the tokens x vocab logits never exist (`orchestrator.loss`); targets of -100 are not
        predicted (a packed document's last token). `positions`, `documents`: see `hidden_states`."""
        hidden = self.hidden_states(tokens, positions, documents)
        if targets is None:
            return self.lm_head(hidden)
        return (self.loss_function or segmented_cross_entropy)(hidden, self.lm_head, targets)


def input_linears(projection: nn.Module) -> list:
    """The `Linear`s under a projection whose weight gradient needs the projection's input: the projection itself,
    or with LoRA (peft wraps it; its frozen base needs no input) the adapter's `lora_A`. Compression fills their
    `saved_input` slots."""
    return [module for module in projection.modules()
            if isinstance(module, Linear) and module.weight.requires_grad]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
