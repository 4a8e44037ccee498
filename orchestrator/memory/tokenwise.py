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
compact bytes, and their recomputed range is encoded again exactly as stored. The copies themselves (side stream,
prefetch, throttle) are `swap_stream`'s. A layer the plan checkpoints whole (`checkpoint_layer`) keeps only its
input, as a skeletal role, and replays its forward in backward (`layer_replay`); its input in host memory is fetched
when its own backward starts, not one layer ahead: its backward (a whole forward and backward with attention) is
far longer than the copy, and a prefetched input would sit on the GPU beside the replay's working set, at the peak.
A checkpointed layer whose input is the embedding's output (layer 0) keeps nothing: its replay looks the token ids
up again (`EmbeddingSource`), the same rows bit for bit (the embedding does not change within a step).
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from orchestrator.memory.compact import CompactForm, collecting
from orchestrator.memory.host_slab import HostSlab
from orchestrator.memory.layer_replay import ReplayCapture, parameter_storages, replay_forward
from orchestrator.memory.quant_int8 import SwapCodes
from orchestrator.memory.swap_stream import HostPool, SwapStream, dense_flat
from spec.activations import ATTENTION_GROUP, COMPACT, HEAD_MAJOR, LAYER_INPUT, SKELETAL, TOKEN_WISE
from spec.plan import LayerPlan


@dataclass
class Config:
    """The runtime's knobs; the plan's per-layer decisions come as `apply`'s layers."""

    recompute_chunk_tokens: int = 8192
    """Tokens recomputed at once: bounds the extra memory of recomputation to one chunk's token-wise tensors."""
    max_layers_ahead: int = 2
    """How many layers the host may queue ahead of the device (`swap_stream.SwapStream.throttle`)."""
    prefetch: bool = True
    """Bring the next layer's swapped slices back while this layer's backward runs (GPU)."""
    int8_swap_seed: int = 20240717
    """Seed of the int8 swap's stochastic rounding (its own generator: the training RNG streams stay as they are)."""
    host_bytes: int = 0
    """The plan's swap share of host memory: pinned up front in one slab (`host_slab.HostSlab`) when > 0."""


@dataclass
class _Saved:
    """What autograd holds for one saved tensor: the tensor itself until the layer's forward ends, then (for a
    tagged role) only how to rebuild this view from the role's restored base."""

    tensor: Optional[torch.Tensor]
    role: Optional[str] = None
    view: Optional[Tuple[tuple, tuple, int]] = None
    replay_index: Optional[int] = None
    """A checkpointed layer's dropped tensor: its place in the order of the forward's saves."""


@dataclass
class _RoleStore:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    kept: Optional[torch.Tensor] = None
    host: Optional[torch.Tensor] = None
    codes: Optional[SwapCodes] = None
    """Set when `host` holds int8 codes of the swapped slice instead of the slice."""
    whole: Optional[torch.Tensor] = None
    """Set when the role is not split (a skeletal tensor kept on the device)."""
    again: Optional[Callable[[], torch.Tensor]] = None
    """Set when nothing is stored: the tensor is made again (a replayed layer 0's input, `EmbeddingSource`)."""
    num_views: int = 0


@dataclass
class _LayerRecord:
    layer: torch.nn.Module
    layer_index: int
    plan: LayerPlan
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
    compact: Dict[str, CompactForm] = field(default_factory=dict)
    """Compact roles (`COMPACT`) by name: how to find their token ranges and recompute them."""
    context: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Other tensors the forward tagged, passed to the layer's `recompute_tokens` (a sparse layer's kept token
    indices: recomputation reuses them, never re-scores)."""
    input_requires_grad: bool = False
    """A checkpointed layer's replay gives its input the same flag (so autograd saves the same tensors)."""
    replayed: Optional[List[Optional[torch.Tensor]]] = None
    """A checkpointed layer's saved tensors, recomputed in order at its first unpack; each dropped once used."""


class TokenwiseRuntime:
    """Shared by all split layers of one model: their plans, the host pool, the swap stream, the arena (set by
    `arena.apply`) and the records of layers awaiting their backward (for prefetching the next one)."""

    def __init__(self, layers: Dict[int, LayerPlan], config: Config):
        self.layers, self.config = layers, config
        self.arena = None
        self.pool = HostPool(HostSlab(config.host_bytes, pin=torch.cuda.is_available())
                             if config.host_bytes > 0 else None)
        self.swap = SwapStream(config.max_layers_ahead)
        self.pending: List[_LayerRecord] = []
        self.replaying: Optional[list] = None
        """Set while a checkpointed layer's forward is replayed: the layer's hooks then only capture."""
        self.embedding: Optional[EmbeddingSource] = None
        """The last embedding lookup of the model (`apply` hooks the model's embedding)."""
        self._swap_slices = 0

    def swap_seed(self) -> int:
        """The rounding-noise seed of the next int8-swapped slice: the run's int8 swap seed and a count of the slices
        encoded (so no two share their noise, and the training RNG streams stay as they are)."""
        self._swap_slices += 1
        return (self.config.int8_swap_seed << 32) + self._swap_slices


class EmbeddingSource:
    """The model's last embedding lookup: its module, token ids and output storage, so a replayed layer whose input
    is that output can look the ids up again instead of keeping it (on the GPU or in host memory). Not under ZeRO-3
    (a partitioned embedding weight is whole only inside its module's call; `planner.schedule.layer_input_bytes`
    counts the input then)."""

    def __init__(self, module: torch.nn.Module, tokens: torch.Tensor, output: torch.Tensor):
        self.module, self.tokens = module, tokens.detach()
        self.storage = output.untyped_storage().data_ptr()

    @staticmethod
    def hook(runtime: "TokenwiseRuntime"):
        def remember(module, args, output):
            partitioned = hasattr(module.weight, "ds_id")  # DeepSpeed ZeRO-3
            runtime.embedding = None if partitioned else EmbeddingSource(module, args[0], output)
        return remember

    def made(self, x: torch.Tensor) -> bool:
        return x.untyped_storage().data_ptr() == self.storage and x.storage_offset() == 0

    def again(self) -> torch.Tensor:
        with torch.no_grad():
            return self.module(self.tokens)


class _LayerSplit:
    """A split layer's `activation_hooks` slot: makes the saved-tensor hooks of each forward."""

    def __init__(self, runtime: TokenwiseRuntime, index: int):
        self.runtime, self.index = runtime, index

    def __call__(self, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        if self.runtime.replaying is not None:
            return ReplayCapture(self.runtime.replaying)
        self.runtime.swap.forward_starts()
        record = _LayerRecord(layer, self.index, self.runtime.layers[self.index], cos, sin,
                              input_requires_grad=x.requires_grad)
        return _LayerHooks(self.runtime, record)


class _LayerHooks:
    """Saved-tensor hooks for one forward of one layer."""

    def __init__(self, runtime: TokenwiseRuntime, record: _LayerRecord):
        self.runtime, self.record = runtime, record
        self.tags: Dict[str, torch.Tensor] = {}
        self.compact: Dict[str, CompactForm] = {}
        self.context = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.collector = collecting(self.compact)

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

    def tag(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Name tensors of this forward by role (`spec.activations`); other names are context for recomputation."""
        self.tags.update(tensors)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor.detach())  # a saved output's grad_fn would lead back here: see `_split`
        self.record.saved.append(saved)
        return saved

    def _unpack(self, saved: _Saved) -> torch.Tensor:
        if saved.replay_index is not None:
            return _replayed(self.runtime, self.record, saved.replay_index)
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
        if record.plan.checkpoint_layer:
            self._finalize_checkpointed()
            return
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
        if record.plan.recompute_fraction > 0:  # recompute needs them even if autograd saved neither
            for role in SKELETAL:
                if role not in record.roles:
                    record.roles[role] = _split(self.runtime, record, role, self.tags[role])
        if record.roles:
            self.runtime.pending.append(record)
            self.runtime.swap.forward_done()
        record.context = {role: t.detach() for role, t in self.tags.items()
                          if role not in TOKEN_WISE and role not in SKELETAL and role not in record.compact}
        self.tags, self.compact = {}, {}  # autograd keeps these hooks until backward: the full tensors must go
        record.saved = []  # autograd holds each `_Saved`; the list was only needed to classify them

    def _finalize_checkpointed(self) -> None:
        """Keep the layer input (whole, or its host copy) and the saved parameters; drop every other saved tensor,
        remembering its place in the order of saves for the replay."""
        record, x = self.record, self.tags[LAYER_INPUT]
        embedding = self.runtime.embedding
        if embedding is not None and embedding.made(x):  # layer 0: look the ids up again in the replay
            record.roles[LAYER_INPUT] = _RoleStore(tuple(x.shape), tuple(x.stride()), x.dtype, x.device,
                                                   again=embedding.again)
        else:
            record.roles[LAYER_INPUT] = _split(self.runtime, record, LAYER_INPUT, x)
        self.runtime.embedding = None  # the lookup's tensors go with this forward
        weights, source = parameter_storages(record.layer), x.untyped_storage().data_ptr()
        for index, saved in enumerate(record.saved):
            storage = saved.tensor.untyped_storage().data_ptr()
            if storage == source:
                saved.role = LAYER_INPUT
                saved.view = (tuple(saved.tensor.shape), tuple(saved.tensor.stride()),
                              saved.tensor.storage_offset() - x.storage_offset())
                record.roles[LAYER_INPUT].num_views += 1
            elif storage in weights:
                continue
            else:
                saved.replay_index = index
            saved.tensor = None
        self.runtime.pending.append(record)
        self.runtime.swap.forward_done()
        self.tags, self.compact, record.saved = {}, {}, []

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
            kept, _, _ = self.record.plan.token_ranges(base.shape[_token_dim(role)])
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
    dim, plan, form = _token_dim(role), record.plan, record.compact.get(role)
    seq_len = base.shape[dim]
    if role in SKELETAL:
        kept, swapped = (0, seq_len) if plan.offload_skeletal else (seq_len, 0)
    elif form is not None:  # the units of the token ranges (sampled rows are not one per token)
        kept_tokens, swapped_tokens, _ = plan.token_ranges(form.seq_len)
        kept = form.units(kept_tokens)
        swapped = form.units(kept_tokens + swapped_tokens) - kept
    else:
        kept, swapped, _ = plan.token_ranges(seq_len)
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
        if plan.swap_codec == "int8" and role not in SKELETAL and form is None:  # skeletal: exact; compact: is
            store.codes = SwapCodes.encode(flat, part.shape[-1], runtime.swap_seed())
            flat, store.codes.codes = store.codes.codes, None  # only the copy out may hold them on the device
        store.host = runtime.pool.buffer((record.layer_index, role), flat)
        runtime.swap.copy_out(store.host, flat)
    return store


def _group_of(role: str) -> str:
    if role in SKELETAL:
        return "skeletal"
    source = role[:-len(COMPACT)] if role.endswith(COMPACT) else role
    return "attention" if source in ATTENTION_GROUP or source == LAYER_INPUT else "mlp"


def _materialize(runtime: TokenwiseRuntime, record: _LayerRecord, group: str) -> None:
    """Restore a group of this layer's roles (kept + host + recomputed tokens). The first call of a layer also
    restores its skeletal tensors and starts the previous layer's prefetch."""
    if group in record.materialized:
        return
    if not record.materialized:
        if record in runtime.pending:
            runtime.pending.remove(record)
        fetch_now = record.prefetch_event is None  # the last layer of the forward, or prefetching is off
        if fetch_now:
            _take_held(runtime, record)  # before `backward_started` waits for every copy out
        runtime.swap.backward_started()
        if fetch_now:
            _start_fetch(runtime, record)
        runtime.swap.wait(record.prefetch_event)
        record.skeletal = {role: _restore(runtime, record, role) for role in SKELETAL if role in record.roles}
        record.restored.update({r: t for r, t in record.skeletal.items() if record.roles[r].num_views})
        record.materialized.add("skeletal")
        if runtime.pending and runtime.config.prefetch and not runtime.pending[-1].plan.checkpoint_layer:
            _start_fetch(runtime, runtime.pending[-1])  # a replayed layer's input comes when its backward starts
    if group != "skeletal":
        outputs = {role: _restore(runtime, record, role) for role in record.roles if _group_of(role) == group}
        _recompute_into(runtime, record, record.skeletal, outputs, group)
        record.restored.update(outputs)
        record.materialized.add(group)
    if {_group_of(role) for role in record.roles} <= record.materialized and not record.plan.checkpoint_layer:
        record.skeletal = {}


def _replayed(runtime: TokenwiseRuntime, record: _LayerRecord, index: int) -> torch.Tensor:
    """A checkpointed layer's saved tensor: the first call restores the input (waiting for its prefetch, starting
    the layer below's) and replays the forward; each tensor is handed out once and then dropped."""
    if record.replayed is None:
        _materialize(runtime, record, "skeletal")
        x = record.skeletal.pop(LAYER_INPUT)
        record.skeletal = {}
        record.replayed = replay_forward(record.layer, x, record.input_requires_grad, record.cos, record.sin, runtime)
    tensor, record.replayed[index] = record.replayed[index], None
    assert tensor is not None, f"layer {record.layer_index}: saved tensor {index} unpacked twice or not replayed"
    return tensor


def _restore(runtime: TokenwiseRuntime, record: _LayerRecord, role: str) -> torch.Tensor:
    """The role's full tensor, laid out as the original (same strides), with its kept and swapped token ranges
    filled; the recomputed range (last) is written by `_recompute_into`."""
    store = record.roles[role]
    if store.whole is not None:
        return store.whole
    if store.again is not None:
        return store.again()
    if _swapped_whole(store):
        return _fetch_whole(runtime, record, role, store)
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


def _swapped_whole(store: _RoleStore) -> bool:
    """The role's every byte went to host memory as they are (no kept or recomputed tokens, no int8 codes), from
    one dense block: its fetched bytes are the tensor itself."""
    if store.kept is not None or store.codes is not None or store.host is None:
        return False
    layout = torch.empty_strided(store.shape, store.stride, dtype=store.dtype, device="meta")
    flat = dense_flat(layout)
    return flat is not None and flat.numel() == store.host.numel()


def _fetch_whole(runtime: TokenwiseRuntime, record: _LayerRecord, role: str, store: _RoleStore) -> torch.Tensor:
    """A role swapped whole, read where its bytes were fetched (or are still held) instead of copied into a new
    tensor of the same size.

    Why: the copy needed a second block of the role's size while the fetched one was alive (at 256K tokens 5.4 GiB
    for an MLP intermediate) and a device copy of it; the planner counts the fetched bytes as the restored tensor."""
    fetched = _fetch(runtime, record, role, store)
    if fetched.data_ptr() == store.host.data_ptr():  # on CPU: the host buffer itself, refilled next step
        fetched = fetched.clone()
    return fetched.as_strided(store.shape, store.stride)


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
    if not split or record.plan.recompute_fraction <= 0:
        return
    plain = [role for role in split if role not in record.compact]  # a sparse layer's attention roles: kept rows
    seq_len = record.roles[plain[0]].shape[_token_dim(plain[0])] if plain else skeletal[LAYER_INPUT].shape[1]
    kept, swapped, recomputed = record.plan.token_ranges(seq_len)
    chunk = runtime.config.recompute_chunk_tokens
    for start in range(kept + swapped, seq_len, chunk):
        length = min(chunk, seq_len - start)
        with torch.no_grad():
            tensors = record.layer.recompute_tokens(group, skeletal, record.cos, record.sin, start, length,
                                                    record.context)
        tensors[LAYER_INPUT] = skeletal[LAYER_INPUT].narrow(1, start, length)
        for role in split:
            form = record.compact.get(role)
            if form is None:
                outputs[role].narrow(_token_dim(role), start, length).copy_(tensors[role])
                continue
            first = form.units(start)
            units = form.encode(tensors[form.source], start)
            outputs[role].narrow(1, first, units.shape[1]).copy_(units)


def _take_held(runtime: TokenwiseRuntime, record: _LayerRecord) -> None:
    """A layer fetched when its backward starts reads its swapped slices still on the device as they are
    (`SwapStream.take_held`); only the rest is brought back."""
    roles = {store.host.data_ptr(): role for role, store in record.roles.items() if store.host is not None}
    for address, source in runtime.swap.take_held(roles).items():
        record.prefetched[roles[address]] = source


def _start_fetch(runtime: TokenwiseRuntime, record: _LayerRecord) -> None:
    """Start bringing a layer's swapped slices back on the swap stream (GPU; on CPU `_fetch` copies on use), but
    those already on the device (`_take_held`)."""
    if record.prefetch_event is not None:
        return
    hosts = {role: (store.host, store.device) for role, store in record.roles.items()
             if store.host is not None and role not in record.prefetched}
    started = runtime.swap.prefetch(hosts)
    if started is not None:
        targets, record.prefetch_event = started
        record.prefetched.update(targets)


def apply(model, config: Config, layers: Iterable[LayerPlan]) -> Optional[TokenwiseRuntime]:
    """Split the activations of the layers whose plan is not plain (keep / swap / recompute token ranges, each
    `LayerPlan` naming its layer); the others run plain. The runtime, or None when every layer is plain."""
    active = {plan.layer: plan for plan in layers if not plan.is_plain}
    if not active:
        return None
    runtime = TokenwiseRuntime(active, config)
    for index, layer in enumerate(model.layers):
        layer.activation_hooks = _LayerSplit(runtime, index) if index in active else None
    if any(plan.checkpoint_layer for plan in active.values()) and hasattr(model, "embed"):
        model.embed.register_forward_hook(EmbeddingSource.hook(runtime))
    return runtime


def runtime_of(model) -> Optional[TokenwiseRuntime]:
    """The token-wise runtime installed on the model's layers (None if no layer is split)."""
    for layer in model.layers:
        if isinstance(layer.activation_hooks, _LayerSplit):
            return layer.activation_hooks.runtime
    return None
