"""Memory techniques, one module each, applied per layer from the plan and the job's sections.

The contract: a technique module exposes a typed `Config` and one entry point, `apply(model, config, layers)`, that
applies it to those layers of the model (indices; for the token-wise split, the plan's `LayerPlan` records, which
name their layer). It changes a layer only through the model's slots (`orchestrator.model`). The registry maps the
stable names to the modules; `apply_plan` applies them in their order, through the registry, with one log line
each (logger `longtrain.memory`). MEMO's swap and recompute are one token-wise split, so both names lead to
`tokenwise`, and so does a plan's whole-layer checkpoint (`checkpoint_layer`, `layer_replay`: one runtime holds
every layer's saved inputs and host copies); `compression` applies the approximate techniques (a compression
section: Mesa int8, S2A int4 and WTA-CRS parts at once, `compressed`); `quant_int8`, `quant_int4_deriv` and
`wta_crs` are their codes and samplers, not techniques of their own.
"""

import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Dict, Iterable, List, Optional, Set, Tuple

from spec.config import CompressionConfig, TokenElimConfig, TrainConfig
from spec.errors import ConfigError
from spec.plan import Plan, compression_spec, parse_compression_spec
from orchestrator.memory import arena, compressed, ds_checkpointing, tiled_loss, tiled_mlp, token_elim, tokenwise

log = logging.getLogger("longtrain.memory")

REGISTRY: Dict[str, ModuleType] = {
    "swap": tokenwise, "recompute": tokenwise, "checkpoint_layer": tokenwise, "arena": arena,
    "compression": compressed, "token_elim": token_elim,
    "activation_checkpointing": ds_checkpointing, "tiled_mlp": tiled_mlp, "tiled_loss": tiled_loss}


def technique(name: str) -> ModuleType:
    if name not in REGISTRY:
        raise ConfigError(f"memory technique {name!r} is unknown; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


@dataclass
class AppliedMemory:
    """What `apply_plan` installed, as the trainer reads it."""

    runtime: Optional[tokenwise.TokenwiseRuntime] = None
    """The token-wise split's runtime (None: no layer is split)."""
    kept_arena: Optional[arena.KeptArena] = None
    compressed_layers: List[int] = field(default_factory=list)
    """Layers whose saved inputs are compressed (a checkpoint then carries their ranges: `compressed.state_dict`)."""
    sparse_layers: Dict[int, float] = field(default_factory=dict)

    @property
    def split_layers(self) -> Set[int]:
        return set(self.runtime.layers) if self.runtime is not None else set()

    @property
    def host_bytes(self) -> int:
        """Host memory the swap's buffers hold."""
        return self.runtime.pool.bytes if self.runtime is not None else 0

    @property
    def arena_bytes(self) -> int:
        return self.kept_arena.bytes if self.kept_arena is not None else 0

    def step_arena_fallbacks(self) -> Tuple[int, int]:
        """(slice sets, bytes) the arena handed to the caching allocator since the last call; (0, 0) without one."""
        return self.kept_arena.step_fallbacks() if self.kept_arena is not None else (0, 0)


def apply_plan(model, plan: Optional[Plan], compression: CompressionConfig, elimination: TokenElimConfig,
               train: TrainConfig) -> AppliedMemory:
    """Apply the plan's per-layer decisions (none without a plan) and the job's technique sections to the model.

    Order, and why. Only one step needs another before it: the arena is the token-wise runtime's, so it follows
    the split. The others fill separate slots of a layer (saved-tensor hooks, saved-input slots, the sparse
    forward, the model's layer runner) and give the same model in any order; the order is fixed so that every run
    applies and logs them alike: first the plan's decisions (1. swap / recompute, 2. arena, 3. compression of the
    layers it chose), then what the job's sections add (the compression section on its layers, where it replaces
    the plan's choice; 4. token elimination), and 5. DeepSpeed's activation checkpointing last, as it wraps whole
    layers as the others left them (the job config allows it only without a plan). The tiled MLP (train.tiled_mlp)
    fills the MLPs' own slot and the ALST recipe's tiled loss the model's loss slot: both are applied just before
    the checkpointing, whose `alst` mode brings them."""
    applied, num_layers = AppliedMemory(), len(model.layers)
    split = [layer for layer in plan.layers if not layer.is_plain] if plan is not None else []
    if split:
        host_bytes = _swap_host_bytes(plan)
        applied.runtime = _apply("swap", model, tokenwise.Config(host_bytes=host_bytes), split,
                                 _split_summary(split) + (f"; {host_bytes / 2**30:.1f} GiB of host memory pinned up "
                                                          "front" if host_bytes else ""))
        if plan.runtime_arena:
            applied.kept_arena = _apply("arena", model, arena.Config(plan.runtime_arena), [p.layer for p in split],
                                   f"{plan.runtime_arena['arena_bytes'] / 2**30:.2f} GiB")
    for section, layers in _compression_groups(plan, compression, num_layers):
        _apply("compression", model, compressed.Config(section, train.seed), layers, compression_spec(section))
        applied.compressed_layers += layers
    if elimination.enabled:
        applied.sparse_layers = _apply("token_elim", model, elimination, sorted(elimination.keep_ratios(num_layers)),
                                       f"keep {elimination.keep_ratio} of {elimination.block_size}-token blocks"
                                       + (f", predictors {elimination.predictors}" if elimination.predictors else ""))
    if train.tiled_mlp or train.activation_checkpointing == "alst":
        _apply("tiled_mlp", model, tiled_mlp.Config(), list(range(num_layers)),
               f"DeepSpeed's TiledMLP, tiles of {tiled_mlp.tile_tokens(model.config.hidden_size)} tokens")
    if train.activation_checkpointing == "alst":
        _apply("tiled_loss", model, tiled_loss.Config(), [], "DeepSpeed's TiledFusedLogitsLoss")
    if train.activation_checkpointing != "none":
        _apply("activation_checkpointing", model, ds_checkpointing.Config.of(train.activation_checkpointing),
               list(range(num_layers)), train.activation_checkpointing)
    applied.compressed_layers.sort()
    return applied


def _swap_host_bytes(plan: Plan) -> int:
    """The plan's swap share of host memory (its host bytes less the offloaded optimizer's and parameters')."""
    predicted = plan.predicted or {}
    gib = predicted.get("host_gib", 0.0) - (predicted.get("host_memory") or {}).get("offloaded_gib", 0.0)
    return max(0, int(gib * 2**30))


def _apply(name: str, model, config, layers: list, summary: str):
    result = technique(name).apply(model, config, layers)
    indices = [getattr(layer, "layer", layer) for layer in layers]
    log.info("applied %s to layers %s: %s", name, _spans(indices), summary)
    return result


def _compression_groups(plan: Optional[Plan], section: CompressionConfig,
                        num_layers: int) -> List[Tuple[CompressionConfig, List[int]]]:
    """Each layer's compression settings, grouped: the plan's `activation_compression`, replaced by the job's
    section on the section's layers."""
    chosen: Dict[int, Tuple[str, CompressionConfig]] = {}
    for layer in plan.layers if plan is not None else []:
        if layer.activation_compression != "none":
            chosen[layer.layer] = (layer.activation_compression, parse_compression_spec(layer.activation_compression))
    if section.is_active:
        for index in section.layer_indices(num_layers):
            chosen[index] = (compression_spec(section), section)
    groups: Dict[str, Tuple[CompressionConfig, List[int]]] = {}
    for index in sorted(chosen):
        spec, settings = chosen[index]
        groups.setdefault(spec, (settings, []))[1].append(index)
    return list(groups.values())


def _split_summary(split) -> str:
    shares = sorted({(p.keep_fraction, p.swap_fraction, p.recompute_fraction, p.offload_skeletal, p.swap_codec)
                     for p in split if not p.checkpoint_layer})
    parts = [f"{k:.2f}/{s:.2f}/{r:.2f}" + (" skeletal to host" if o else "")
             + (f" {codec} swap" if codec != "none" else "") for k, s, r, o, codec in shares]
    for where, host in (("host", True), ("gpu", False)):
        layers = [p.layer for p in split if p.checkpoint_layer and p.offload_skeletal == host]
        if layers:
            parts.append(f"whole layer checkpointed, input on {where}: layers {_spans(layers)}")
    return "keep/swap/recompute " + "; ".join(parts)


def _spans(indices: Iterable[int]) -> str:
    """Layer indices as ranges: 0-3, 6."""
    spans: List[List[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
