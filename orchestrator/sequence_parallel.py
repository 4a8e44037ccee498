"""DeepSpeed Ulysses sequence parallelism: `parallel.sp_degree` ranks share one sequence, each holding a contiguous
shard of its tokens; attention exchanges shards for heads (all-to-all) and back.

Two attention paths, both on DeepSpeed's all-to-all (`deepspeed.sequence.layer`):
- `DistributedAttention` (DeepSpeed's module, unchanged) for layers whose activations are kept whole (no plan, or
  DeepSpeed's own activation checkpointing). Its attention kernel saves the exchanged (all-heads-shard, whole-
  sequence) q, k, v and output for backward.
- `LocalShardAttention` for layers the plan splits by token (MEMO swap / recompute). Those must save only this
  rank's own token shard of q, k, v and the output, the tensors the token-wise runtime knows how to keep, swap
  or recompute; so the exchange runs inside one autograd function that saves the local shards, and SDPA (the
  kernel the plain model gets) runs inside it in an inner autograd graph whose saved q, k, v and output are kept
  only by name; its backward repeats the forward exchanges to rebuild them (communication only: attention is
  never recomputed). Gradients equal the unsplit model's.

Why gradients need nothing else: every rank's loss is the mean over its equal token shard, and ZeRO averages
gradients over all ranks, so the average of shard means is the sequence mean. (Packed documents leave some targets
out, so shards predict unequal numbers of tokens: the trainer weights each shard's mean by its share of the
sequence's predicted tokens.)

Packed documents: each rank's head group sees the whole sequence after the exchange, so both paths apply the
same document layout (`orchestrator.attention`, built from the whole sequence) to every head group.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from orchestrator.attention import causal_attention, document_attention
from spec.parallel import ParallelDims

HEADS, SEQUENCE, BATCH = 2, 1, 0
"""Dimensions of the [B, S, H, D] layout the exchanges use."""


def sequence_groups(dims: ParallelDims) -> Optional[dist.ProcessGroup]:
    """This rank's Ulysses group: the "sp" dimension of a (dp, sp) device mesh, i.e. `sp_degree` consecutive
    ranks (None for sp_degree 1). DeepSpeed itself is given no group: ZeRO spans every rank."""
    if dims.sp_degree == 1:
        return None
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dims.dp_degree, dims.sp_degree), mesh_dim_names=("dp", "sp"))
    return mesh["sp"].get_group()


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
            attention.sequence_parallel = LocalShardAttention(group, attention.kernel)
        else:
            inner = DistributedAttention(_LocalAttention(attention.kernel), group,
                                         scatter_idx=HEADS, gather_idx=SEQUENCE)
            attention.sequence_parallel = _HeadMajor(inner)


class _LocalAttention(torch.nn.Module):
    """Causal attention on [B, S, H, D] tensors (DeepSpeed's layout) through our [B, H, S, D] contract."""

    def __init__(self, kernel: str):
        super().__init__()
        self.kernel = kernel

    def forward(self, q, k, v, documents=None):
        heads_major = [t.transpose(1, 2) for t in (q, k, v)]
        if documents is not None:
            return document_attention(*heads_major, documents, self.kernel).transpose(1, 2)
        return causal_attention(*heads_major, self.kernel).transpose(1, 2)


class _HeadMajor:
    """Adapts DeepSpeed's [B, S, H, D] module to our [B, H, S, D] attention contract."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, q, k, v, documents=None):
        extra = () if documents is None else (None, documents)  # DeepSpeed passes what follows rotary_pos_emb on
        out = self.inner(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                         v.transpose(1, 2).contiguous(), BATCH, *extra)
        return out.transpose(1, 2)


class LocalShardAttention:
    """Ulysses attention that saves only this rank's token shard (see the module docstring)."""

    def __init__(self, group: dist.ProcessGroup, kernel: str):
        self.group, self.kernel = group, kernel

    def __call__(self, q, k, v, documents=None):
        return _LocalShardFunction.apply(q, k, v, self.group, self.kernel, documents)


def _to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, H, S/p, D] (this rank's tokens, all heads) -> [B, H/p, S, D] (all tokens, this rank's heads)."""
    from deepspeed.sequence.layer import single_all_to_all

    return single_all_to_all(x.transpose(1, 2).contiguous(), HEADS, SEQUENCE, BATCH, group).transpose(1, 2)


def _to_tokens(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of `_to_heads`."""
    from deepspeed.sequence.layer import single_all_to_all

    return single_all_to_all(x.transpose(1, 2).contiguous(), SEQUENCE, HEADS, BATCH, group).transpose(1, 2)


class _Regathered:
    """Saved-tensor hooks for the attention kernel's own autograd node: its saved q, k, v and output (whole
    sequence, this rank's heads) are not kept but named, and rebuilt in backward by exchanging the local shards
    again (a saved view of one of them is rebuilt as the same view of the rebuilt tensor); everything else it
    saves (log-sum-exp, RNG state: small) is kept as is."""

    def __init__(self):
        self.saved = []
        """[tensor, role, view] per saved tensor; after `name`, tensor is None where role is set."""
        self.tensors = {}

    def pack(self, tensor):
        entry = [tensor, None, None]
        self.saved.append(entry)
        return entry

    def unpack(self, entry):
        tensor, role, view = entry
        if role is None:
            return tensor
        base = self.tensors[role]
        shape, stride, offset = view
        return base.as_strided(shape, stride, base.storage_offset() + offset)

    def name(self, **tensors) -> None:
        """After the forward: replace each saved tensor that is (a view of) one of `tensors` by its role."""
        by_storage = {t.untyped_storage().data_ptr(): (role, t) for role, t in tensors.items()}
        for entry in self.saved:
            found = by_storage.get(entry[0].untyped_storage().data_ptr())
            if found is not None:
                role, base = found
                saved = entry[0]
                entry[:] = [None, role, (tuple(saved.shape), tuple(saved.stride()),
                                         saved.storage_offset() - base.storage_offset())]


class _LocalShardFunction(torch.autograd.Function):
    """Exchange, the model's attention kernel (train.attention_kernel), exchange back; its autograd node is kept
    (`ctx.inner`) with its large saved tensors replaced by names (`_Regathered`)."""

    @staticmethod
    def forward(ctx, q, k, v, group, kernel, documents=None):
        leaves = [_to_heads(t, group).detach().requires_grad_() for t in (q, k, v)]
        regathered = _Regathered()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(regathered.pack, regathered.unpack):
            if documents is None:
                out_heads = causal_attention(*leaves, kernel)
            else:
                out_heads = document_attention(*leaves, documents, kernel)
        regathered.name(q=leaves[0], k=leaves[1], v=leaves[2], out=out_heads)
        out = _to_tokens(out_heads.detach(), group)
        out_heads.untyped_storage().resize_(0)  # autograd below needs its node and shape only, not its data
        for leaf in leaves:
            leaf.untyped_storage().resize_(0)
        ctx.group, ctx.inner = group, (leaves, out_heads, regathered)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out = ctx.saved_tensors
        leaves, out_heads, regathered = ctx.inner
        group = ctx.group
        regathered.tensors = {role: _to_heads(t, group) for role, t in zip(("q", "k", "v", "out"), (q, k, v, out))}
        grads = torch.autograd.grad(out_heads, leaves, _to_heads(grad_out, group))
        regathered.tensors, ctx.inner = {}, None
        return (*(_to_tokens(g, group) for g in grads), None, None, None)
