"""The plan file: versioned, self-describing YAML that the runtime loads and checks against its job.

Why a hash of the inputs: the runtime never re-plans. A plan made for another model shape, sequence length,
world size, ZeRO stage or profile must be refused with a message saying how to re-plan, so the plan carries
its inputs (`plan_inputs`, computed the same way by the planner and the runtime) and a hash of them.

Why typed layers: each layer's decision is a `LayerPlan` record, loaded and validated once through an OmegaConf
structured schema, so a malformed plan fails at load naming the key, and no reader spells dict keys.

Versions: 2 names the swap's codec `swap_codec: none|int8` (version 1 called it `compression: quant_int8`, a name
that also meant Mesa elsewhere); 3 adds a layer's `checkpoint_layer` (the whole layer recomputed from its input, the
ALST recipe's choice, made per layer). Older files are migrated on load (their inputs hash is unchanged); a runtime
of version 2 refuses a version-3 file by its version instead of misreading it.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spec import attention_choice
from spec.activations import token_ranges
from spec.config.schema import CompressionConfig, JobConfig
from spec.errors import LongtrainError
from spec.prepared import document_inputs
from spec.yamlio import read_yaml

PLAN_FORMAT = "longtrain-plan"
PLAN_VERSION = 3
SWAP_CODECS = ("none", "int8")
ALIGN_BYTES = 512
"""Every buffer of a layout starts at a multiple of this (the planner's offsets and the runtime's arena)."""
COMPRESSION_SPEC_KEYS = ("linear_inputs", "norm_inputs", "silu", "wta_crs_keep_ratio", "range_decay",
                         "range_groups")


class PlanError(LongtrainError):
    """A plan file is missing, malformed, of another version, or made for another job."""


@dataclass
class LayerPlan:
    """One layer's decision: how its token-wise activations are kept, swapped and recomputed, and compressed."""

    layer: int
    keep_fraction: float = 1.0
    swap_fraction: float = 0.0
    recompute_fraction: float = 0.0
    offload_skeletal: bool = False
    """The layer's skeletal tensors go to host memory too (prefetched one layer ahead in backward)."""
    swap_codec: str = "none"
    """none, or int8: the swapped share crosses PCIe as int8 (approximate)."""
    activation_compression: str = "none"
    """none, or the compressed layer's settings (`compression_spec`; approximate)."""
    checkpoint_layer: bool = False
    """The layer keeps only its input (in host memory with `offload_skeletal`) and runs its whole forward again in
    backward, attention included; its fractions then read keep 0, swap 0, recompute 1."""

    @property
    def is_plain(self) -> bool:
        """Everything kept on the GPU: the layer runs without the token-wise runtime."""
        return self.keep_fraction >= 1.0 and not self.offload_skeletal and not self.checkpoint_layer

    def token_ranges(self, seq_len: int) -> Tuple[int, int, int]:
        """(kept, swapped, recomputed) token counts, exactly as the planner counts them."""
        return token_ranges(self.swap_fraction, self.recompute_fraction, seq_len)

    def key(self) -> tuple:
        """What makes two layers' decisions the same (fractions to 3 decimals)."""
        return (round(self.keep_fraction, 3), round(self.swap_fraction, 3), round(self.recompute_fraction, 3),
                self.offload_skeletal, self.swap_codec, self.activation_compression, self.checkpoint_layer)


@dataclass
class Plan:
    inputs: Dict[str, Any]
    inputs_hash: str
    layers: List[LayerPlan]
    layout: List[Dict[str, Any]]
    layer_block_layout: List[Dict[str, Any]]
    arena_bytes: int
    lower_bound_bytes: int
    layer_block: Dict[str, Any]
    predicted: Dict[str, Any]
    solver: Dict[str, Any]
    created: str = ""
    runtime_arena: Dict[str, Any] = field(default_factory=dict)
    """The buffers the runtime places in its preallocated arena (today: each layer's kept token-wise share)."""
    format: str = PLAN_FORMAT
    version: int = PLAN_VERSION
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        head = {k: data.pop(k) for k in ("format", "version", "created", "inputs_hash", "inputs")}
        return {**head, **data}


def align(size: float) -> int:
    return int(-(-int(size) // ALIGN_BYTES) * ALIGN_BYTES)


def compression_spec(settings) -> str:
    """A compression section's settings as the plan file records them per layer: 'key=value ...' (all keys)."""
    return " ".join(f"{key}={getattr(settings, key)}" for key in COMPRESSION_SPEC_KEYS)


def parse_compression_spec(spec: str) -> CompressionConfig:
    """The inverse of `compression_spec` (layers: all; the plan says which layers get it)."""
    fields = dict(item.split("=", 1) for item in spec.split())
    types = {"wta_crs_keep_ratio": float, "range_decay": float, "range_groups": int}
    return CompressionConfig(**{key: types.get(key, str)(value) for key, value in fields.items()})


def plan_inputs(job: JobConfig, profile, precision: str) -> dict:
    """What a plan depends on; the runtime compares these (via their hash) before executing a plan. An active
    compression section is one of them (the plan counts its layers' bytes); absent otherwise, so plans made
    before it existed keep their hash. So are packed documents' attention share and length (data.packing=documents:
    the plan's times depend on them; absent for packing=stream)."""
    m = job.model
    return {"model": {k: getattr(m, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                                 "num_kv_heads", "intermediate_size", "tie_embeddings")},
            **({"qkv_bias": True} if m.qkv_bias else {}),  # absent without biases: older plans keep their hash
            "seq_len": job.data.seq_len, "micro_batch_size": job.data.micro_batch_size,
            "grad_accum_steps": job.train.grad_accum_steps, "world_size": job.cluster.num_workers,
            "sp_degree": job.parallel.sp_degree, "zero_stage": job.train.zero_stage, "precision": precision,
            "profile": profile.name, "gpu_memory_fraction": job.plan.gpu_memory_fraction,
            "host_memory_fraction": job.plan.host_memory_fraction, "allow_approximate": job.plan.allow_approximate,
            **({"compression": compression_spec(job.compression)
                + f" layers={job.compression.layer_indices(m.num_layers)}"} if job.compression.is_active else {}),
            **_token_elim_inputs(job), **document_inputs(job.data), **_whole_job_inputs(job, profile)}


def _whole_job_inputs(job: JobConfig, profile) -> dict:
    """LoRA, offload, the tiled MLP, an explicit host memory, fused elementwise kernels and another attention kernel
    change a plan's bytes and times: plan inputs when set (absent otherwise, so plans made before they existed keep their hash)."""
    inputs, lora, train = {}, job.model.lora, job.train
    if lora.enabled:
        inputs["lora"] = {"rank": lora.rank, "target_modules": sorted(lora.target_modules)}
    if train.offload.any:
        inputs["offload"] = {"optimizer": train.offload.optimizer, "params": train.offload.params}
    if train.tiled_mlp:
        inputs["tiled_mlp"] = True
    if job.plan.host_memory_gib is not None:
        inputs["host_memory_gib"] = job.plan.host_memory_gib
    if job.train.elementwise != "eager":  # a fused SwiGLU saves less
        inputs["elementwise"] = job.train.elementwise
    kernel, _ = attention_choice.choose(job.train.attention_kernel, job.data.seq_len, profile)
    if kernel != "sdpa":  # priced at the profile's rate for that kernel (auto: the one it picks)
        inputs["attention_kernel"] = kernel
    return inputs


def _token_elim_inputs(job: JobConfig) -> dict:
    """Token elimination changes each sparse layer's bytes and times: its layers and keep ratio are plan inputs
    (absent when it is off, so plans made before it keep their hash)."""
    elim = job.token_elim
    if not elim.enabled:
        return {}
    return {"token_elim": {"keep_ratios": elim.keep_ratios(job.model.num_layers), "block_size": elim.block_size,
                           "predictors": bool(elim.predictors)}}


def hash_inputs(inputs: Dict[str, Any]) -> str:
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def save_plan(plan: Plan, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(plan.to_dict(), sort_keys=False, width=120))
    tmp.replace(path)


def load_plan(path: Path) -> Plan:
    """The plan file at `path`, migrated to this version and validated (types, codecs, its own hash)."""
    if not Path(path).is_file():
        raise PlanError(f"plan file {path} not found; make one with `longtrain plan CONFIG --out {path}`")
    data = read_yaml(Path(path), "plan file", PlanError, "re-plan with `longtrain plan`") or {}
    if not isinstance(data, dict):
        raise PlanError(f"plan file {path} holds a {type(data).__name__}, not a plan; re-plan with `longtrain plan`")
    data = _migrated(data, path)
    try:
        plan = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Plan), data))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "plan"
        raise PlanError(f"plan file {path} is malformed at {key} ({str(error).splitlines()[0]}); re-plan with "
                        "`longtrain plan`") from error
    _check_layers(plan, path)
    if hash_inputs(plan.inputs) != plan.inputs_hash:
        raise PlanError(f"plan file {path}: its inputs do not match its inputs_hash (edited by hand?); re-plan "
                        "with `longtrain plan`")
    return plan


def _migrated(data: dict, path: Path) -> dict:
    """Version 1 -> 2: a layer's `compression: none|quant_int8` (the swap's codec) becomes `swap_codec: none|int8`.
    Version 2 -> 3: no layer of an older plan checkpoints whole (`checkpoint_layer` defaults to false)."""
    if data.get("format") != PLAN_FORMAT or data.get("version") not in (1, 2, PLAN_VERSION):
        raise PlanError(f"plan file {path} is format {data.get('format')!r} version {data.get('version')!r}, "
                        f"expected {PLAN_FORMAT!r} version {PLAN_VERSION}; re-plan with `longtrain plan`")
    if data["version"] == 1:
        for layer in data.get("layers") or []:
            codec = layer.pop("compression", "none")
            layer["swap_codec"] = {"quant_int8": "int8"}.get(codec, codec)
        data["version"] = 2
    if data["version"] == 2:
        for layer in data.get("layers") or []:
            layer.setdefault("checkpoint_layer", False)
        data["version"] = PLAN_VERSION
    return data


def _check_layers(plan: Plan, path: Path) -> None:
    """Rules on the layers a loader cannot type-check: the codecs this runtime runs, one record per layer."""
    unknown = sorted({layer.swap_codec for layer in plan.layers} - set(SWAP_CODECS))
    if unknown:
        raise PlanError(f"plan {path} uses swap_codec {', '.join(unknown)}, which this runtime does not run; "
                        "re-plan with this version of longtrain")
    indices = [layer.layer for layer in plan.layers]
    if indices != list(range(len(indices))):
        raise PlanError(f"plan {path} has layers {indices}, expected 0..{len(indices) - 1} once each; re-plan "
                        "with `longtrain plan`")


def check_plan_composes(plan: Plan, job: JobConfig, path: Path) -> None:
    """Token elimination and compression (the job's section, or the plan's own `activation_compression`) each run on
    layers the plan splits, but not both on one such layer (a sparse layer's compact attention forms would mix
    full-length and kept-row token ranges). A layer the plan checkpoints whole runs neither: its recomputation
    replays the plain forward."""
    _check_checkpointed_layers(plan, job, path)
    if not job.token_elim.enabled:
        return
    split = {layer.layer for layer in plan.layers if not layer.is_plain}
    compressed = {layer.layer for layer in plan.layers if layer.activation_compression != "none"}
    if job.compression.is_active:
        compressed |= set(job.compression.layer_indices(job.model.num_layers))
    both = sorted(split & set(job.token_elim.keep_ratios(job.model.num_layers)) & compressed)
    if both:
        raise PlanError(f"token_elim and compression both apply to layers {both}, which the plan {path} "
                        f"splits into kept / swapped / recomputed tokens; they do not compose there yet: drop "
                        f"those layers from compression.layers or token_elim, or run without plan.path")


def _check_checkpointed_layers(plan: Plan, job: JobConfig, path: Path) -> None:
    checkpointed = {layer.layer for layer in plan.layers if layer.checkpoint_layer}
    if not checkpointed:
        return
    other = {layer.layer for layer in plan.layers if layer.activation_compression != "none"}
    if job.compression.is_active:
        other |= set(job.compression.layer_indices(job.model.num_layers))
    if job.token_elim.enabled:
        other |= set(job.token_elim.keep_ratios(job.model.num_layers))
    both = sorted(checkpointed & other)
    if both:
        raise PlanError(f"the plan {path} checkpoints layers {both} whole, which compression or token_elim also "
                        "change; re-plan with `longtrain plan` for this job (the planner never combines them)")


def check_plan_matches(plan: Plan, inputs: Dict[str, Any], path: Path) -> None:
    """Refuse a plan made for another job, naming the first input that differs."""
    if plan.inputs_hash == hash_inputs(inputs):
        return
    differing = sorted(k for k in set(plan.inputs) | set(inputs) if plan.inputs.get(k) != inputs.get(k))
    key = differing[0] if differing else "inputs"
    raise PlanError(f"plan {path} was made for {key}={plan.inputs.get(key)!r}, this job has "
                    f"{inputs.get(key)!r}; re-plan with `longtrain plan CONFIG --out {path}`")
