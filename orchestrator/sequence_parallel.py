"""DeepSpeed Ulysses sequence parallelism: `parallel.sp_degree` ranks share one sequence, each holding a contiguous
shard of its tokens; attention exchanges shards for heads (all-to-all) and back.

Two attention paths, both on DeepSpeed's all-to-all (`deepspeed.sequence.layer`):
- `DistributedAttention` (DeepSpeed's module, unchanged) for layers whose activations are kept whole (no plan, or
  DeepSpeed's own activation checkpointing). Its attention kernel saves the exchanged (all-heads-shard, whole-
  sequence) q, k, v and output for backward.
- `LocalShardAttention` for layers the plan splits by token (MEMO swap / recompute). Those must save only this
  rank's own token shard of q, k, v and the output, the tensors the token-wise runtime knows how to keep, swap
  or recompute; so the exchange runs inside one autograd function that saves the local shards and the kernel's
  log-sum-exp, and its backward repeats the forward exchanges (communication only: attention is never
  recomputed) before calling the attention kernel's own backward. Gradients equal the unsplit model's.

Why gradients need nothing else: every rank's loss is the mean over its equal token shard, and ZeRO averages
gradients over all ranks, so the average of shard means is the sequence mean.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.errors import ConfigError

HEADS, SEQUENCE, BATCH = 2, 1, 0
"""Dimensions of the [B, S, H, D] layout the exchanges use."""


def sequence_groups(sp_degree: int) -> Optional[dist.ProcessGroup]:
    """This rank's group of `sp_degree` consecutive ranks (None for sp_degree 1). Every rank creates every group,
    in the same order, as torch.distributed requires."""
    if sp_degree == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_degree:
        raise ConfigError(f"parallel.sp_degree ({sp_degree}) must divide the number of workers ({world})")
    mine = None
    for start in range(0, world, sp_degree):
        group = dist.new_group(list(range(start, start + sp_degree)))
        if start <= rank < start + sp_degree:
            mine = group
    return mine


def shard_of(tokens: torch.Tensor, group: Optional[dist.ProcessGroup]) -> slice:
    """The token positions (dim 1 of a [B, S] batch) this rank holds."""
    if group is None:
        return slice(0, tokens.shape[1])
    size, index = dist.get_world_size(group), dist.get_rank(group)
    local = tokens.shape[1] // size
    return slice(index * local, (index + 1) * local)


def install(model, group: dist.ProcessGroup, split_layers) -> None:
    """Route every layer's attention through Ulysses: the MEMO-compatible path on `split_layers`, DeepSpeed's
    `DistributedAttention` elsewhere."""
    from deepspeed.sequence.layer import DistributedAttention

    for index, layer in enumerate(model.layers):
        attention = layer.attn
        if index in split_layers:
            attention.sequence_parallel = LocalShardAttention(group, attention.num_heads, attention.num_kv_heads)
        else:
            inner = DistributedAttention(_LocalAttention(attention.num_heads != attention.num_kv_heads), group,
                                         scatter_idx=HEADS, gather_idx=SEQUENCE)
            attention.sequence_parallel = _HeadMajor(inner)


class _LocalAttention(torch.nn.Module):
    """Causal attention on [B, S, H, D] tensors (DeepSpeed's layout) through SDPA's [B, H, S, D]."""

    def __init__(self, grouped: bool):
        super().__init__()
        self.grouped = grouped

    def forward(self, q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=self.grouped)
        return out.transpose(1, 2)


class _HeadMajor:
    """Adapts DeepSpeed's [B, S, H, D] module to our [B, H, S, D] attention contract."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, q, k, v):
        out = self.inner(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                         v.transpose(1, 2).contiguous(), BATCH)
        return out.transpose(1, 2)


class LocalShardAttention:
    """Ulysses attention that saves only this rank's token shard (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int, num_kv_heads: int):
        self.group = group
        self.repeats = num_heads // num_kv_heads

    def __call__(self, q, k, v):
        return _LocalShardFunction.apply(q, k, v, self.group, self.repeats)


def _to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, S/p, D] (this rank's tokens, all heads) -> [B, H/p, S, D] (all tokens, this rank's heads)."""
    from deepspeed.sequence.layer import single_all_to_all

    return single_all_to_all(x.transpose(1, 2).contiguous(), HEADS, SEQUENCE, BATCH, group).transpose(1, 2)


def _to_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of `_to_heads`."""
    from deepspeed.sequence.layer import single_all_to_all

    return single_all_to_all(x.transpose(1, 2).contiguous(), SEQUENCE, HEADS, BATCH, group).transpose(1, 2)


class _LocalShardFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, repeats):
        ctx.group, ctx.repeats = group, repeats
        heads_q, heads_k, heads_v = (_to_heads(t, group) for t in (q, k, v))
        out_heads, lse, extras = flash_forward(heads_q, _expand(heads_k, repeats), _expand(heads_v, repeats))
        out = _to_tokens(out_heads, group)
        ctx.extras = extras
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        group, repeats = ctx.group, ctx.repeats
        heads_q, heads_k, heads_v, heads_out, heads_grad = (_to_heads(t, group) for t in (q, k, v, out, grad_out))
        grad_q, grad_k, grad_v = flash_backward(heads_grad, heads_q, _expand(heads_k, repeats),
                                                _expand(heads_v, repeats), heads_out, lse, ctx.extras)
        grad_k, grad_v = _fold(grad_k, repeats), _fold(grad_v, repeats)
        return (_to_tokens(grad_q, group), _to_tokens(grad_k, group), _to_tokens(grad_v, group), None, None)


def _expand(kv: torch.Tensor, repeats: int) -> torch.Tensor:
    """Grouped-query keys/values repeated to one per query head (the kernels below take equal head counts)."""
    return kv if repeats == 1 else kv.repeat_interleave(repeats, dim=1)


def _fold(grad: torch.Tensor, repeats: int) -> torch.Tensor:
    if repeats == 1:
        return grad
    batch, heads, seq, dim = grad.shape
    return grad.view(batch, heads // repeats, repeats, seq, dim).sum(2)


def flash_forward(q, k, v):
    """Causal flash attention on [B, H, S, D]: (output, log-sum-exp, what its backward needs besides)."""
    if q.is_cuda:
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ConfigError(f"sequence parallelism on GPU needs train.precision bf16 or fp16 (got {q.dtype})")
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse, ()


def flash_backward(grad, q, k, v, out, lse, extras):
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad.contiguous(), q, k, v, out,
                                                                               lse, 0.0, True)
