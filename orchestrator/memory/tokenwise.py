"""MEMO's token-wise swap and recompute (Zhao et al., "MEMO: Fine-grained Tensor Management For Ultra-long
Context LLM Training", SIGMOD 2025, arXiv 2407.12117).

At long context a layer's activations grow linearly with the sequence and its compute quadratically, so copying a
share of them to host memory can hide behind compute. Per layer, the plan splits the tokens in three ranges:
the first `keep` share of every token-wise tensor (norm outputs, q/k/v, MLP intermediates) stays on the device,
the next `swap` share goes to pinned host memory (on a side stream on GPU) and is prefetched one layer ahead
in backward, and the rest is dropped and recomputed from the layer input and the attention output, which are
kept for every token (the *skeletal* tensors, optionally swapped whole). Attention is never recomputed: its
backward gets q, k, v restored and its own saved output and log-sum-exp. Every piece is an exact copy or an
exact recomputation by the same functions, so gradients equal the plain run's.

Mechanics: the layer's forward runs under saved-tensor hooks. Packing only records what autograd saves; at the
end of the forward the layer names its intermediates (`tag`), and each saved tensor that is one of them (or a
view of one) is replaced by its kept slice, its host copy and nothing for the recomputed tokens. In backward the
first unpack of a layer restores its skeletal tensors and starts the previous layer's prefetch; the MLP tensors
are restored when the MLP backward first needs one, the attention inputs only when the attention backward is
reached (the two groups never coexist); each saved view is rebuilt from its restored base.

A compressed layer (`compressed`) saves compact forms (int8 or 4-bit codes, sampled rows) instead of some of these
tensors; they are split by token the same way under their own roles (`COMPACT`), so what crosses PCIe is the
compact bytes, and their recomputed range is encoded again exactly as stored.
"""

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

import torch

from orchestrator.memory import compressed
from spec.activations import token_ranges

HEAD_MAJOR = {"q", "k", "v", "attn_out"}
"""Roles laid out [B, H, S, D] (tokens on dim 2); the others are [B, S, F] (tokens on dim 1)."""
SKELETAL = ("layer_input", "attn_out")
INT8_SWAP_SEED = 20240717
MAX_LAYERS_AHEAD = 2
"""How many layers the host may queue ahead of the device (see `TokenwiseRuntime.throttle`)."""
RECOMPUTE_CHUNK_TOKENS = 8192
"""Tokens recomputed at once: bounds the extra memory of recomputation to one chunk's token-wise tensors."""
TOKEN_WISE = ("attn_norm_out", "q", "k", "v", "attn_residual", "mlp_norm_out", "gate", "up", "silu_gate",
              "gated")
ATTENTION_GROUP = ("attn_norm_out", "q", "k", "v")
"""Restored (and recomputed) only when the attention backward is reached: backward runs the MLP part first, so
the two groups are never restored at the same time, which bounds a layer's backward working set."""
COMPACT = ".compact"
"""Suffix of a role holding a compressed layer's compact form of a tensor (`compressed.CompactForm`): int8 or
packed 4-bit codes, or sampled rows; split by token like the tensor itself, so a swap moves 2x / 4x /
1 / keep_ratio fewer bytes."""


@dataclass
class LayerPolicy:
    """One layer's decision, as in the plan file."""

    keep_fraction: float = 1.0
    swap_fraction: float = 0.0
    recompute_fraction: float = 0.0
    offload_skeletal: bool = False
    int8_swap: bool = False
    """Swap the token-wise slices as int8 codes (approximate: see `Int8Swap`); the plan's quant_int8."""

    def token_ranges(self, seq_len: int) -> Tuple[int, int, int]:
        """(kept, swapped, recomputed) token counts, exactly as the planner counts them."""
        return token_ranges(self.swap_fraction, self.recompute_fraction, seq_len)

    @property
    def is_plain(self) -> bool:
        return self.keep_fraction >= 1.0 and not self.offload_skeletal


class HostPool:
    """Host buffers for swapped slices, allocated once per (layer, role, shape) and reused every step; pinned
    on a CUDA machine so copies are asynchronous."""

    def __init__(self):
        self.buffers: Dict[tuple, torch.Tensor] = {}

    def buffer(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        full_key = (*key, tuple(like.shape), like.dtype)
        if full_key not in self.buffers:
            pin = like.is_cuda
            self.buffers[full_key] = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
        return self.buffers[full_key]

    @property
    def bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


@dataclass
class _Saved:
    """What autograd holds for one saved tensor: the tensor itself until the layer's forward ends, then (for a
    tagged role) only how to rebuild this view from the role's restored base."""

    tensor: Optional[torch.Tensor]
    role: Optional[str] = None
    view: Optional[Tuple[tuple, tuple, int]] = None


@dataclass
class _RoleStore:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    kept: Optional[torch.Tensor] = None
    host: Optional[torch.Tensor] = None
    codes: Optional["Int8Swap"] = None
    """Set when `host` holds int8 codes of the swapped slice instead of the slice."""
    whole: Optional[torch.Tensor] = None
    """Set when the role is not split (a skeletal tensor kept on the device)."""
    num_views: int = 0


@dataclass
class _LayerRecord:
    layer: torch.nn.Module
    layer_index: int
    policy: LayerPolicy
    cos: torch.Tensor
    sin: torch.Tensor
    saved: List[_Saved] = field(default_factory=list)
    roles: Dict[str, _RoleStore] = field(default_factory=dict)
    restored: Dict[str, torch.Tensor] = field(default_factory=dict)
    prefetched: Dict[str, torch.Tensor] = field(default_factory=dict)
    prefetch_event: Optional[object] = None
    materialized: set = field(default_factory=set)
    """Groups restored so far: skeletal, mlp, attention."""
    skeletal: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Restored layer input and attention output, held until both token-wise groups are restored."""
    compact: Dict[str, "compressed.CompactForm"] = field(default_factory=dict)
    """Compact roles (`COMPACT`) by name: how to find their token ranges and recompute them."""
    context: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Other tensors the forward tagged, passed to the layer's `recompute_tokens` (a sparse layer's kept token
    indices: recomputation reuses them, never re-scores)."""


class TokenwiseRuntime:
    """Shared by all layers of one model: the host pool, the side stream and the records of layers awaiting
    their backward (for prefetching the next one)."""

    def __init__(self, policies: Dict[int, LayerPolicy], arena=None):
        self.policies = policies
        self.arena = arena
        self.pool = HostPool()
        self.pending: List[_LayerRecord] = []
        self.stream = None
        self.recompute_chunk_tokens = RECOMPUTE_CHUNK_TOKENS
        self.prefetch = True
        self._generator = None
        self.in_flight: Deque[object] = deque()
        """Device events of the latest layers' copies (forward) or backward starts: the host waits for the oldest
        beyond `MAX_LAYERS_AHEAD`, so it never queues more than that many layers ahead of the device."""

    def generator(self, device: torch.device) -> torch.Generator:
        """The stochastic-rounding generator of int8 swaps (its own seed: the training RNG streams stay as they are)."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(INT8_SWAP_SEED)
        return self._generator

    def throttle(self, event) -> None:
        """Let the host run at most MAX_LAYERS_AHEAD layers ahead of the device.

        Why: the host queues a whole step in milliseconds. A buffer freed while a copy still reads it cannot be
        reused before the copy ends, so without a bound the caching allocator reserves new memory for every
        layer's slices (reserved grew to 3x allocated at 64K tokens) until it must free its cache, which
        synchronises the device; and prefetches queued for every layer at once all compete for the copy
        engine with the one the device is waiting for."""
        self.in_flight.append(event)
        while len(self.in_flight) > MAX_LAYERS_AHEAD:
            self.in_flight.popleft().synchronize()

    def hooks_for(self, layer_index: int):
        def factory(layer, x, cos, sin):
            return _LayerHooks(self, _LayerRecord(layer, layer_index, self.policies[layer_index], cos, sin))
        return factory

    def copy_stream(self):
        if self.stream is None and torch.cuda.is_available():
            self.stream = torch.cuda.Stream()
        return self.stream


class _LayerHooks:
    """Saved-tensor hooks for one forward of one layer."""

    def __init__(self, runtime: TokenwiseRuntime, record: _LayerRecord):
        self.runtime, self.record = runtime, record
        self.tags: Dict[str, torch.Tensor] = {}
        self.compact: Dict[str, compressed.CompactForm] = {}
        self.context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.collector = compressed.collecting(self.compact)

    def __enter__(self):
        self.context.__enter__()
        self.collector.__enter__()
        return self

    def __exit__(self, *exc):
        self.collector.__exit__(*exc)
        self.context.__exit__(*exc)
        self.context = self.collector = None  # they hold our bound methods: a cycle only the collector would break
        if exc[0] is None:
            self._finalize()
        return False

    def tag(self, **tensors: torch.Tensor) -> None:
        self.tags.update(tensors)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor.detach())  # a saved output's grad_fn would lead back here: see `_split`
        self.record.saved.append(saved)
        return saved

    def _unpack(self, saved: _Saved) -> torch.Tensor:
        if saved.role is None:
            return saved.tensor
        record = self.record
        _materialize(self.runtime, record, _group_of(saved.role))
        base = record.restored[saved.role]
        shape, stride, offset = saved.view
        view = base.as_strided(shape, stride, base.storage_offset() + offset)
        store = record.roles[saved.role]
        store.num_views -= 1
        if store.num_views == 0:
            del record.restored[saved.role]
        return view

    def _finalize(self) -> None:
        """Replace every saved view of a tagged tensor by its role's split storage."""
        record = self.record
        kept_targets = self._kept_targets()
        for source, form in self.compact.items():
            record.compact[source + COMPACT] = form
            self.tags[source + COMPACT] = form.view
            form.view = None  # the runtime's split is all that may keep it
        by_storage = {t.untyped_storage().data_ptr(): (role, t) for role, t in self.tags.items()
                      if role in TOKEN_WISE or role in SKELETAL or role in record.compact}
        for saved in record.saved:
            found = by_storage.get(saved.tensor.untyped_storage().data_ptr())
            if found is None:
                continue
            role, base = found
            if role not in record.roles:
                record.roles[role] = _split(self.runtime, record, role, base, kept_targets.get(role))
            saved.role = role
            saved.view = (tuple(saved.tensor.shape), tuple(saved.tensor.stride()),
                          saved.tensor.storage_offset() - base.storage_offset())
            record.roles[role].num_views += 1
            saved.tensor = None
        if record.policy.recompute_fraction > 0:  # recompute needs them even if autograd saved neither
            for role in SKELETAL:
                if role not in record.roles:
                    record.roles[role] = _split(self.runtime, record, role, self.tags[role])
        if record.roles:
            self.runtime.pending.append(record)
            stream = self.runtime.stream
            if stream is not None:
                copied_out = torch.cuda.Event()
                copied_out.record(stream)
                self.runtime.throttle(copied_out)
        record.context = {role: t.detach() for role, t in self.tags.items()
                          if role not in TOKEN_WISE and role not in SKELETAL and role not in record.compact}
        self.tags, self.compact = {}, {}  # autograd keeps these hooks until backward: the full tensors must go
        record.saved = []  # autograd holds each `_Saved`; the list was only needed to classify them

    def _kept_targets(self) -> Dict[str, torch.Tensor]:
        """Where the kept slices go: views of the runtime's arena at this layer's planned region, if it has one."""
        arena = self.runtime.arena
        if arena is None:
            return {}
        slices = []
        for role in TOKEN_WISE:
            base = self.tags.get(role)
            if base is None:  # silu_gate: a compressed MLP does not make it
                continue
            kept, _, _ = self.record.policy.token_ranges(base.shape[_token_dim(role)])
            if kept == base.shape[_token_dim(role)]:
                return {}  # kept whole, nothing to copy
            shape = list(base.shape)
            shape[_token_dim(role)] = kept
            slices.append((role, tuple(shape), base.dtype))
        return arena.views(self.record.layer_index, slices) or {}


def _token_dim(role: str) -> int:
    return 2 if role in HEAD_MAJOR else 1


def _split(runtime: TokenwiseRuntime, record: _LayerRecord, role: str, base: torch.Tensor,
           kept_target: Optional[torch.Tensor] = None) -> _RoleStore:
    """Keep, copy out and drop the role's token ranges. Everything stored is detached: a stored tensor with a
    grad_fn would lead back, through autograd's C++ nodes, to these hooks, a cycle Python's collector cannot
    see, and every step's activations would leak."""
    base = base.detach()
    store = _RoleStore(tuple(base.shape), tuple(base.stride()), base.dtype, base.device)
    dim, policy, form = _token_dim(role), record.policy, record.compact.get(role)
    seq_len = base.shape[dim]
    if role in SKELETAL:
        kept, swapped = (0, seq_len) if policy.offload_skeletal else (seq_len, 0)
    elif form is not None:  # the units of the token ranges (sampled rows are not one per token)
        kept_tokens, swapped_tokens, _ = policy.token_ranges(form.seq_len)
        kept = form.units(kept_tokens)
        swapped = form.units(kept_tokens + swapped_tokens) - kept
    else:
        kept, swapped, _ = policy.token_ranges(seq_len)
    if kept == seq_len:
        store.whole = base
        return store
    if kept:
        kept_part = base.narrow(dim, 0, kept)
        store.kept = kept_target.copy_(kept_part) if kept_target is not None else kept_part.clone()
    if swapped:
        part = base.narrow(dim, kept, swapped)
        flat = dense_flat(part)
        if flat is None:  # not one dense block (micro-batch > 1): gather it on the device first
            flat = part.contiguous().view(-1)
        if policy.int8_swap and role not in SKELETAL and form is None:  # skeletal: exact; compact: already
            store.codes = Int8Swap.encode(flat, part.shape[-1], runtime.generator(flat.device))
            flat = store.codes.codes
        store.host = runtime.pool.buffer((record.layer_index, role), flat)
        _copy(runtime, store.host, flat)
    return store


@dataclass
class Int8Swap:
    """A swapped slice as uint8 codes (what crosses PCIe: half the bf16 bytes) plus per-channel-group ranges
    that stay on the device.

    The slice's memory is read as rows of its innermost dimension (channels), split in `GROUPS` contiguous groups;
    each group's range is the slice's own min and max (no running estimate: the whole slice is at hand), codes are
    stochastically rounded (unbiased) and lie in the range by construction, so the error per element is below
    width / 255. Encoding and decoding go chunk by chunk so their fp32 temporaries stay small."""

    codes: torch.Tensor
    low: torch.Tensor
    width: torch.Tensor
    channels: int

    GROUPS = 8
    CHUNK_ELEMENTS = 2**26

    @classmethod
    def encode(cls, flat: torch.Tensor, channels: int, generator) -> "Int8Swap":
        groups = math.gcd(channels, cls.GROUPS)
        rows = flat.view(-1, groups, channels // groups)
        low = rows.amin(dim=(0, 2)).float()
        width = (rows.amax(dim=(0, 2)).float() - low).clamp_min(1e-12)
        codes = torch.empty(rows.shape, dtype=torch.uint8, device=flat.device)
        scale = (255.0 / width).view(1, -1, 1)
        for start, stop in compressed.row_chunks(rows.shape[0], max(1, cls.CHUNK_ELEMENTS // channels)):
            scaled = (rows[start:stop].float() - low.view(1, -1, 1)) * scale
            scaled += torch.rand(scaled.shape, generator=generator, device=flat.device)
            codes[start:stop] = scaled.floor_().clamp_(0, 255).to(torch.uint8)
        return cls(codes.view(-1), low, width, channels)

    def decode_into(self, target: torch.Tensor, codes: torch.Tensor) -> None:
        """Write the dequantised slice into `target` (a flat view of the restored tensor's region)."""
        groups = self.low.numel()
        rows = codes.view(-1, groups, self.channels // groups)
        out = target.view(rows.shape)
        step = (self.width / 255.0).view(1, -1, 1)
        for start, stop in compressed.row_chunks(rows.shape[0], max(1, self.CHUNK_ELEMENTS // self.channels)):
            out[start:stop] = (rows[start:stop].float() * step + self.low.view(1, -1, 1)).to(out.dtype)


def dense_flat(tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """A 1-D view of the tensor's memory in memory order, when it covers one dense block (None otherwise).

    Why: a token slice of a head-major tensor ([B, H, S, D] stored as [B, S, H, D]) is one dense block but not
    "contiguous" in its logical order, and copying it to a contiguous host buffer takes PyTorch's element-wise
    cross-device path: 1.8 GB/s instead of 50 GB/s on an H200, with host synchronisations that serialise
    the copy with compute. Copied as flat bytes it is one DMA each way."""
    dims = sorted((d for d in range(tensor.dim()) if tensor.shape[d] != 1), key=lambda d: -tensor.stride(d))
    expected = 1
    for d in reversed(dims):
        if tensor.stride(d) != expected:
            return None
        expected *= tensor.shape[d]
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def _copy(runtime: TokenwiseRuntime, dst: torch.Tensor, src: torch.Tensor) -> None:
    """Device -> host on the side stream (the compute stream does not wait); a plain copy on CPU."""
    stream = runtime.copy_stream()
    if stream is None or not src.is_cuda:
        dst.copy_(src)
        return
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    src.record_stream(stream)


def _group_of(role: str) -> str:
    if role in SKELETAL:
        return "skeletal"
    source = role[:-len(COMPACT)] if role.endswith(COMPACT) else role
    return "attention" if source in ATTENTION_GROUP or source == "layer_input" else "mlp"


def _materialize(runtime: TokenwiseRuntime, record: _LayerRecord, group: str) -> None:
    """Restore a group of this layer's roles (kept + host + recomputed tokens). The first call of a layer also
    restores its skeletal tensors and starts the previous layer's prefetch."""
    if group in record.materialized:
        return
    if not record.materialized:
        if record in runtime.pending:
            runtime.pending.remove(record)
        _mark_backward_start(runtime)
        if record.prefetch_event is None:  # the last layer of the forward, or prefetching is off: fetch now
            _start_fetch(runtime, record)
        _wait_for_prefetch(record)
        record.skeletal = {role: _restore(runtime, record, role) for role in SKELETAL if role in record.roles}
        record.restored.update({r: t for r, t in record.skeletal.items() if record.roles[r].num_views})
        record.materialized.add("skeletal")
        if runtime.pending and runtime.prefetch:
            _start_fetch(runtime, runtime.pending[-1])
    if group != "skeletal":
        outputs = {role: _restore(runtime, record, role) for role in record.roles if _group_of(role) == group}
        _recompute_into(runtime, record, record.skeletal, outputs, group)
        record.restored.update(outputs)
        record.materialized.add(group)
    if {_group_of(role) for role in record.roles} <= record.materialized:
        record.skeletal = {}


def _restore(runtime: TokenwiseRuntime, record: _LayerRecord, role: str) -> torch.Tensor:
    """The role's full tensor, laid out as the original (same strides), with its kept and swapped token ranges
    filled; the recomputed range (last) is written by `_recompute_into`."""
    store = record.roles[role]
    if store.whole is not None:
        return store.whole
    out = torch.empty_strided(store.shape, store.stride, dtype=store.dtype, device=store.device)
    dim = _token_dim(role)
    kept = store.kept.shape[dim] if store.kept is not None else 0
    if kept:
        out.narrow(dim, 0, kept).copy_(store.kept)
    if store.host is not None:
        fetched = _fetch(runtime, record, role, store)
        region = out.narrow(dim, kept, fetched.numel() // (out.numel() // out.shape[dim]))
        flat = dense_flat(region)  # dense exactly when the swapped slice was: the same strides
        if store.codes is not None:
            target = flat if flat is not None else torch.empty(region.shape, dtype=out.dtype, device=out.device)
            store.codes.decode_into(target.view(-1), fetched)
            if flat is None:
                region.copy_(target)
        elif flat is not None:
            flat.copy_(fetched)
        else:
            region.copy_(fetched.view(region.shape))
    return out


def _fetch(runtime: TokenwiseRuntime, record: _LayerRecord, role: str, store: _RoleStore) -> torch.Tensor:
    """The swapped slice on the device: brought in by `_start_fetch` (on GPU), or copied now (on CPU)."""
    prefetched = record.prefetched.pop(role, None)
    if prefetched is not None:
        return prefetched
    return store.host.to(store.device)


def _recompute_into(runtime: TokenwiseRuntime, record: _LayerRecord, skeletal: Dict[str, torch.Tensor],
                    outputs: Dict[str, torch.Tensor], group: str) -> None:
    """Recompute the last token range of every token-wise tensor from the layer input and the attention output
    (no attention), a chunk of tokens at a time so the extra memory is one chunk's tensors, not the range's."""
    split = [role for role, out in outputs.items() if record.roles[role].whole is None]
    if not split or record.policy.recompute_fraction <= 0:
        return
    plain = [role for role in split if role not in record.compact]  # a sparse layer's attention roles: kept rows
    seq_len = record.roles[plain[0]].shape[_token_dim(plain[0])] if plain else skeletal["layer_input"].shape[1]
    kept, swapped, recomputed = record.policy.token_ranges(seq_len)
    chunk = runtime.recompute_chunk_tokens
    for start in range(kept + swapped, seq_len, chunk):
        length = min(chunk, seq_len - start)
        with torch.no_grad():
            tensors = record.layer.recompute_tokens(group, skeletal, record.cos, record.sin, start, length,
                                                    record.context)
        tensors["layer_input"] = skeletal["layer_input"].narrow(1, start, length)
        for role in split:
            form = record.compact.get(role)
            if form is None:
                outputs[role].narrow(_token_dim(role), start, length).copy_(tensors[role])
                continue
            first = form.units(start)
            units = form.encode(tensors[form.source], start)
            outputs[role].narrow(1, first, units.shape[1]).copy_(units)


def _mark_backward_start(runtime: TokenwiseRuntime) -> None:
    """Throttle the host on an event where this layer's backward starts on the compute stream (GPU only)."""
    if runtime.stream is not None:
        started = torch.cuda.Event()
        started.record(torch.cuda.current_stream())
        runtime.throttle(started)


def _start_fetch(runtime: TokenwiseRuntime, record: _LayerRecord) -> None:
    """Start the host -> device copies of a layer's swapped slices on the side stream.

    The destinations come from the compute stream's pool (blocks of a side-stream pool would never serve the
    compute stream: reserved memory doubles), and the copies start only once the compute stream reaches this
    point: after every earlier use of those blocks, and after the backward of the layer above has started, so
    a prefetch never competes for the copy engine with the copies the device is waiting for. The copy-out of
    the same slices ran earlier on the same stream, so it has finished."""
    stream = runtime.stream
    if stream is None or record.prefetch_event is not None:
        return
    swapped = {role: store for role, store in record.roles.items() if store.host is not None}
    targets = {role: torch.empty(store.host.shape, dtype=store.host.dtype, device=store.device)
               for role, store in swapped.items()}
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        stream.wait_event(ready)
        for role, store in swapped.items():
            targets[role].copy_(store.host, non_blocking=True)
        record.prefetch_event = torch.cuda.Event()
        record.prefetch_event.record(stream)
    record.prefetched.update(targets)


def _wait_for_prefetch(record: _LayerRecord) -> None:
    """The compute stream waits for the layer's fetched slices (their blocks are the compute stream's own)."""
    if record.prefetch_event is not None:
        torch.cuda.current_stream().wait_event(record.prefetch_event)


def apply_policies(model, policies: Dict[int, LayerPolicy], arena=None) -> Optional[TokenwiseRuntime]:
    """Install the token-wise hooks on the layers whose policy is not plain; None when every layer is plain.
    With an arena (`orchestrator.memory.arena.KeptArena`), kept slices go to its planned regions."""
    active = {i: p for i, p in policies.items() if not p.is_plain}
    if not active:
        return None
    runtime = TokenwiseRuntime(active, arena)
    for index, layer in enumerate(model.layers):
        layer.activation_hooks = runtime.hooks_for(index) if index in active else None
    return runtime
