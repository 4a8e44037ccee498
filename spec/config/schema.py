"""The job configuration schema: one small dataclass per component, composed by `JobConfig`.

Why: dataclasses are the schema OmegaConf checks YAML and command-line overrides against, so a typo in a key or
a wrong type fails at load time with the full dotted key. Each section offers `problems()` (a list of one-line
messages, each naming the key, the value and the fix); `JobConfig.__post_init__` collects them all, with the
cross-section rules, so the user sees every problem of a config at once.
"""

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from spec.errors import ConfigError
from spec.parallel import TOKEN_BLOCK, ParallelDims

"""Sequences are planned, eliminated and swapped in blocks of this many tokens."""

DATA_SOURCES = ("corpus", "synthetic", "tokens", "jsonl", "parquet", "text")
TEXT_SOURCES = ("jsonl", "parquet", "text")
"""Sources of documents (text), tokenized by `longtrain prepare-data`."""
PACKINGS = ("auto", "stream", "documents")
DOCUMENT_ATTENTION = ("auto", "flex", "sdpa_mask", "per_document", "varlen")
ELEMENTWISE = ("eager", "compiled")
ALLOCATORS = ("caching", "planned")
ATTENTION_KERNELS = ("sdpa", "fa4", "auto")
TOKEN_DTYPES = ("uint16", "uint32")
PRECISIONS = ("auto", "bf16", "fp32")
ACTIVATION_CHECKPOINTING = ("none", "deepspeed", "deepspeed_cpu", "alst")
ON_NONFINITE = ("stop", "skip")
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


ARCHITECTURES = ("llama", "mistral", "qwen2")
ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling for a context longer than the model was trained at, as Hugging Face's `rope_scaling`
    (orchestrator/rope.py computes it): none; linear (position interpolation: every frequency / factor); llama3
    (Llama 3.1: low frequencies / factor, high ones kept, a smooth ramp between); yarn (YaRN: per-frequency ramp
    between interpolation and extrapolation, attention logits scaled)."""

    type: str = "none"
    factor: float = 1.0
    """Context growth: the scaled positions reach factor x original_max_position_embeddings."""
    original_max_position_embeddings: Optional[int] = None
    """Context the model was pretrained at (llama3, yarn)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original / high_freq_factor are kept."""
    beta_fast: float = 32.0
    """yarn: rotations at which the ramp starts (extrapolation above)."""
    beta_slow: float = 1.0
    """yarn: rotations at which the ramp ends (interpolation below)."""
    attention_factor: Optional[float] = None
    """yarn: scale of cos and sin (none: 0.1 ln(factor) + 1, the paper's)."""
    truncate: bool = True
    """yarn: round the ramp's ends to whole dimensions (Hugging Face's default)."""

    def problems(self) -> List[str]:
        key = "model.rope_scaling"
        if self.type == "dynamic":
            return [f"{key}.type=dynamic is refused: dynamic NTK scaling changes the frequencies with each "
                    "sequence's length, an inference trick that training cannot match; use linear, llama3 or yarn"]
        if self.type not in ROPE_SCALING_TYPES:
            return [f"{key}.type ({self.type!r}) must be one of {', '.join(ROPE_SCALING_TYPES)}"]
        if self.type == "none":
            return []
        found = [] if self.factor >= 1.0 else [f"{key}.factor ({self.factor}) must be >= 1 for {self.type}"]
        if self.type in ("llama3", "yarn") and not (self.original_max_position_embeddings or 0) > 0:
            found.append(f"{key}.original_max_position_embeddings is required for {self.type}: the context length "
                         "the model was pretrained at (config.json's max_position_embeddings before extension)")
        if self.type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            found.append(f"{key}.low_freq_factor ({self.low_freq_factor}) must be < high_freq_factor "
                         f"({self.high_freq_factor}); Llama 3.1 uses 1 and 4")
        if self.type == "yarn" and not self.beta_slow < self.beta_fast:
            found.append(f"{key}.beta_slow ({self.beta_slow}) must be < beta_fast ({self.beta_fast}); YaRN uses 1 "
                         "and 32")
        if self.type == "yarn" and self.attention_factor is not None and self.attention_factor <= 0:
            found.append(f"{key}.attention_factor ({self.attention_factor}) must be > 0 (or unset)")
        return found


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """LoRA fine-tuning through `peft` (Hu et al., arXiv 2106.09685): the base weights are frozen (no gradients, no
    optimizer state; bf16 on the GPU with bf16 training) and each targeted linear learns a rank-`rank` update
    B A scaled by alpha / rank. Only the adapters are trained, optimized and checkpointed (with the base's path and
    hash). rank 0: off (full fine-tuning). See orchestrator/lora.py."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout); above 0 each adapted linear saves a dropped copy of
    its input, which a plan does not manage (refused with plan.path)."""
    target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Projections that get adapters (all seven by default, as QLoRA and LeMo do)."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def problems(self) -> List[str]:
        found = []
        if self.rank < 0:
            found.append(f"model.lora.rank ({self.rank}) must be >= 0 (0: no LoRA; 8-64 are usual)")
        if self.alpha <= 0:
            found.append(f"model.lora.alpha ({self.alpha}) must be > 0; 2 x rank is usual")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"model.lora.dropout ({self.dropout}) must be in [0, 1)")
        unknown = [name for name in self.target_modules if name not in LORA_TARGETS]
        if unknown or (self.enabled and not self.target_modules):
            found.append(f"model.lora.target_modules ({list(self.target_modules)}) must be a non-empty list of "
                         f"{', '.join(LORA_TARGETS)}")
        return found


@dataclass
class ModelConfig:
    """Shape of the Llama-style decoder; `preset` fills every other field, explicit keys override it; with
    model.init_from=HF_DIR its config.json fills the shape instead (spec.config.hf)."""

    preset: str = "debug"
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters through peft (rank 0: off, full fine-tuning)."""
    init_from: Optional[str] = None
    """Weights a fresh run starts from (fine-tuning): a .safetensors file, a Hugging Face model directory
    (model.safetensors or sharded with model.safetensors.index.json) or a DeepSpeed checkpoint DIR[:TAG]; Hugging
    Face Llama names are mapped onto ours. A Hugging Face directory's config.json fills the shape (spec.config.hf).
    Ignored when the run resumes from a checkpoint."""
    architecture: str = "llama"
    """llama (LlamaForCausalLM), mistral (MistralForCausalLM without a sliding window) or qwen2 (Qwen2ForCausalLM:
    q/k/v projections with biases); from config.json with model.init_from, and what `longtrain export` writes."""
    max_position_embeddings: Optional[int] = None
    """Context length the model is made for (config.json's); none: data.seq_len. Export writes at least the trained
    length."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE frequency scaling (Hugging Face's rope_scaling); with model.rope_theta, how the context is extended."""

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections carry biases (Qwen2)."""
        return self.architecture == "qwen2"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def problems(self) -> List[str]:
        found = _positive(self, "model", ["vocab_size", "hidden_size", "num_layers", "num_heads",
                                          "num_kv_heads", "intermediate_size"])
        if found:
            return found
        if self.hidden_size % self.num_heads:
            found.append(f"model.num_heads ({self.num_heads}) must divide model.hidden_size "
                         f"({self.hidden_size}); choose a divisor such as "
                         f"{_nearest_divisor(self.hidden_size, self.num_heads)}")
        elif self.head_dim % 2:
            found.append(f"model.hidden_size / model.num_heads = {self.head_dim} must be even for RoPE; "
                         "change model.num_heads or model.hidden_size")
        if self.num_heads % self.num_kv_heads:
            found.append(f"model.num_kv_heads ({self.num_kv_heads}) must divide model.num_heads "
                         f"({self.num_heads}); choose a divisor such as "
                         f"{_nearest_divisor(self.num_heads, self.num_kv_heads)}")
        if self.rope_theta <= 0:
            found.append(f"model.rope_theta ({self.rope_theta}) must be > 0; Llama uses 10000 or 500000")
        if self.init_from is not None and not self.init_from.strip():
            found.append("model.init_from is empty; pass a .safetensors file, a Hugging Face model directory or a "
                         "DeepSpeed checkpoint DIR[:TAG], or leave it unset")
        if self.architecture not in ARCHITECTURES:
            found.append(f"model.architecture ({self.architecture!r}) must be one of {', '.join(ARCHITECTURES)}")
        if self.max_position_embeddings is not None and self.max_position_embeddings <= 0:
            found.append(f"model.max_position_embeddings ({self.max_position_embeddings}) must be a positive integer")
        return found + self.rope_scaling.problems()


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed into fixed-length sequences."""

    source: str = "corpus"
    """corpus: the bundled public-domain text, byte tokens; synthetic: random tokens; tokens: a token file; jsonl,
    parquet, text: your documents (JSON lines, a Parquet column, or one plain-text file per document), tokenized once
    by `longtrain prepare-data` (or by `longtrain train` when they are not yet)."""
    path: Optional[str] = None
    """For source=tokens: a flat binary (.bin) or .npy file of token ids; for jsonl, parquet and text: a file, a glob
    (quoted: 'data/*.jsonl') or a directory of them."""
    token_dtype: str = "uint16"
    text_field: str = "text"
    """jsonl and parquet: the field (column) that holds each document's text."""
    tokenizer: Optional[str] = None
    """jsonl, parquet, text: a Hugging Face tokenizer.json or a directory holding one (with its tokenizer_config.json,
    which says whether each document gets BOS and EOS); default: model.init_from's directory's."""
    packing: str = "auto"
    """documents: whole documents packed into each sequence (one longer than a sequence is cut into sequence-length
    pieces), attention never crossing a document, RoPE positions restarting at each one, no document's first token
    predicted from another; stream: one token stream cut into windows; auto: documents for jsonl, parquet and text,
    stream otherwise."""
    document_attention: str = "auto"
    """The attention kernel of packing=documents: flex (PyTorch FlexAttention with a block mask built from the
    document boundaries: skips masked blocks; CUDA), sdpa_mask (SDPA with a dense sequence x sequence mask: any
    device, for tests and small sequences), per_document (the causal kernel, cuDNN's on CUDA, once per document:
    faster than flex where documents are long, slower where they are short; bf16 on CUDA; any device), varlen
    (FlashAttention-4's variable-length kernel, every document in one call: the fastest on an H200; needs
    train.attention_kernel's package), auto: varlen where train.attention_kernel=fa4, flex on other CUDA workers,
    sdpa_mask elsewhere."""
    cache_dir: Optional[str] = None
    """Where prepared text sources go, one directory per content hash of the source files and the tokenizer
    (default $LONGTRAIN_DATA_CACHE, else ~/.cache/longtrain/data)."""
    prepared: Optional[str] = None
    """Set on the driver by `longtrain train` (and printed by `longtrain prepare-data`): the prepared directory of a
    jsonl, parquet or text source that the workers read. Leave it unset."""
    seq_len: int = 256
    micro_batch_size: int = 8
    """Sequences per worker per forward pass."""
    holdout_fraction: float = 0.05
    """Tail of the token stream kept out of training, for evaluation."""

    def problems(self) -> List[str]:
        found = _positive(self, "data", ["seq_len", "micro_batch_size"])
        if self.source not in DATA_SOURCES:
            found.append(f"data.source ({self.source!r}) must be one of {', '.join(DATA_SOURCES)}")
        if self.source == "tokens" and not self.path:
            found.append("data.path is required when data.source=tokens; set data.path=/path/to/tokens.bin")
        found += self._document_problems()
        if self.token_dtype not in TOKEN_DTYPES:
            found.append(f"data.token_dtype ({self.token_dtype!r}) must be one of {', '.join(TOKEN_DTYPES)}")
        if self.seq_len > 0 and self.seq_len % TOKEN_BLOCK:
            lower = max(TOKEN_BLOCK, self.seq_len // TOKEN_BLOCK * TOKEN_BLOCK)
            found.append(f"data.seq_len ({self.seq_len}) must be a multiple of {TOKEN_BLOCK} (the token block); "
                         f"use {lower} or {lower + TOKEN_BLOCK}")
        if not 0.0 <= self.holdout_fraction < 0.5:
            found.append(f"data.holdout_fraction ({self.holdout_fraction}) must be in [0, 0.5)")
        return found

    @property
    def packs_documents(self) -> bool:
        """Sequences are packed from whole documents with document masking (packing=documents, or auto on a text
        source)."""
        return self.packing == "documents" or (self.packing == "auto" and self.source in TEXT_SOURCES)

    def _document_problems(self) -> List[str]:
        found = []
        if self.source in TEXT_SOURCES and not self.path:
            found.append(f"data.path is required when data.source={self.source}; set data.path to a file, a quoted "
                         "glob or a directory")
        if self.packing not in PACKINGS:
            found.append(f"data.packing ({self.packing!r}) must be one of {', '.join(PACKINGS)}")
        elif self.packing == "documents" and self.source not in TEXT_SOURCES:
            found.append(f"data.packing=documents needs a source of documents (data.source=jsonl, parquet or text); "
                         f"data.source={self.source} is one token stream without document boundaries: use "
                         "data.packing=stream")
        if self.document_attention not in DOCUMENT_ATTENTION:
            found.append(f"data.document_attention ({self.document_attention!r}) must be one of "
                         f"{', '.join(DOCUMENT_ATTENTION)}")
        if not self.text_field:
            found.append("data.text_field is empty; name the JSON field or Parquet column that holds the text")
        return found


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to `min_lr_ratio * lr`."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    schedule_steps: Optional[int] = None
    """Steps the cosine decays over (default: train.max_steps; past its end the lr stays at its floor). A resume
    that changes train.max_steps keeps the run's schedule by setting this to the schedule it had."""

    def problems(self) -> List[str]:
        found = []
        if self.schedule_steps is not None and self.schedule_steps < 1:
            found.append(f"optim.schedule_steps ({self.schedule_steps}) must be >= 1, or unset to follow "
                         "train.max_steps")
        if self.lr <= 0:
            found.append(f"optim.lr ({self.lr}) must be > 0; a typical value is 3e-4")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            found.append(f"optim.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]")
        if self.warmup_steps < 1:
            found.append(f"optim.warmup_steps ({self.warmup_steps}) must be >= 1: DeepSpeed's WarmupCosineLR always "
                         "warms up (it refuses 0); use 1 for the shortest warm-up")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                found.append(f"optim.{key} ({getattr(self, key)}) must be in [0, 1)")
        if self.grad_clip < 0:
            found.append(f"optim.grad_clip ({self.grad_clip}) must be >= 0 (0 disables clipping)")
        return found


@dataclass
class OffloadConfig:
    """DeepSpeed's ZeRO-Offload (Ren et al., arXiv 2101.06840) and ZeRO-Infinity parameter offload to pinned host
    memory: what does not fit next to the activations goes to the host."""

    optimizer: bool = False
    """fp32 master weights and gradients, a bf16 copy and Adam's moments of the trainable parameters in host memory
    (18 bytes per parameter in bf16, split over the data-parallel ranks; on a GPU each pinned buffer is a power-of-two
    block: `planner.offload_host`), stepped by DeepSpeed's CPU Adam; ZeRO 1-3."""
    params: bool = False
    """bf16 parameters in pinned host memory, gathered to the GPU module by module (ZeRO-3 only); the model is
    built under deepspeed.zero.Init, so no worker holds the whole model on its host."""

    @property
    def any(self) -> bool:
        return self.optimizer or self.params


@dataclass
class TrainConfig:
    """The training loop and its DeepSpeed engine."""

    max_steps: int = 200
    """Optimizer steps in the whole run (a resumed run continues up to this number)."""
    stop_at_step: Optional[int] = None
    """Stop early at this step with a checkpoint, keeping the LR schedule of max_steps (time-boxed jobs); resume
    later with resume=RUN_DIR."""
    reschedule: bool = False
    """A resume in place that changes the learning-rate schedule: false keeps the run's schedule when only
    max_steps changed (and refuses a change of optim.lr, warmup_steps, min_lr_ratio or schedule_steps); true
    re-shapes it from the resumed step on (the lr jumps)."""
    grad_accum_steps: int = 1
    zero_stage: int = 2
    precision: str = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    seed: int = 1234
    log_every_steps: int = 10
    max_failures: int = 0
    """Times Ray restarts the worker group after a worker dies (it resumes from the latest checkpoint)."""
    activation_checkpointing: str = "none"
    """DeepSpeed's own activation checkpointing of every layer instead of a plan: `deepspeed` keeps each layer's
    input on the GPU, `deepspeed_cpu` in host memory (with Ulysses: DeepSpeed's long-sequence recipe). The
    baseline a plan is measured against; not with plan.path. `alst`: DeepSpeed's Arctic Long Sequence Training
    recipe on one GPU or more (arXiv 2506.13996): ZeRO-3 with the optimizer offloaded or a frozen LoRA base, every
    layer checkpointed with its input in host memory, DeepSpeed's TiledMLP and TiledFusedLogitsLoss (GPU only)."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    """Optimizer and parameter offload to pinned host memory (DeepSpeed ZeRO-Offload / ZeRO-Infinity)."""
    tiled_mlp: bool = False
    """Run every MLP through DeepSpeed's TiledMLP: forward in sequence tiles of hidden_size tokens without saving
    its intermediates, recomputed tile by tile in backward, so no tensor scales with tokens x intermediate_size
    (one more MLP forward per step). Set by train.activation_checkpointing=alst."""
    elementwise: str = "eager"
    """The layer's RMSNorm, RoPE and SwiGLU: eager (op by op), or compiled (autograd functions fused by
    torch.compile on CUDA, uncompiled on CPU; SwiGLU then recomputes silu(gate) in backward instead of saving it, and
    plans count that)."""
    attention_kernel: str = "sdpa"
    """Causal attention: sdpa (PyTorch's fused kernels: cuDNN's or FlashAttention-2 on a GPU, a flash kernel on CPU)
    or fa4 (FlashAttention-4, the flash-attn-4 package, on Hopper or Blackwell GPUs in bf16/fp16: 1.14x cuDNN's
    causal rate at 128K tokens on an H200; packed documents then take its variable-length kernel), or auto (the
    faster of the two at data.seq_len by the hardware profile's measured rates, `spec.attention_choice`; SDPA where
    the profile measured no other)."""
    allocator: str = "caching"
    """The device allocator of the workers: caching (PyTorch's) or planned (MEMO's executor: step 2 of a run is
    traced, its requests laid out in one buffer, and later steps get those offsets back, so the holes the caching
    allocator leaves between live tensors at long context, 3-25% of the peak, are not there; CUDA workers only)."""
    deepspeed_extra: Dict[str, Any] = field(default_factory=dict)
    """Escape hatch: keys merged last into the generated DeepSpeed config (see README)."""
    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is NaN or infinite: stop (the run ends with one line naming the step; no
    checkpoint is written after it) or skip (the update is dropped, as DeepSpeed's ZeRO 1-3 optimizers drop a step
    with non-finite gradients, and training goes on)."""

    def problems(self) -> List[str]:
        found = _positive(self, "train", ["max_steps", "grad_accum_steps", "log_every_steps"])
        if self.zero_stage not in (0, 1, 2, 3):
            found.append(f"train.zero_stage ({self.zero_stage}) must be 0, 1, 2 or 3")
        if self.precision not in PRECISIONS:
            found.append(f"train.precision ({self.precision!r}) must be one of {', '.join(PRECISIONS)}")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            found.append(f"train.stop_at_step ({self.stop_at_step}) must be in 1..train.max_steps ({self.max_steps})")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            found.append(f"train.activation_checkpointing ({self.activation_checkpointing!r}) must be one of "
                         f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        if self.offload.params and self.zero_stage != 3:
            found.append(f"train.offload.params needs train.zero_stage=3 (ZeRO-Infinity offloads the partitioned "
                         f"parameters), not {self.zero_stage}; set train.zero_stage=3")
        if self.offload.optimizer and self.zero_stage == 0:
            found.append("train.offload.optimizer needs train.zero_stage 1, 2 or 3 (ZeRO-Offload moves the "
                         "partitioned optimizer); set train.zero_stage=2")
        if self.activation_checkpointing == "alst" and self.zero_stage != 3:
            found.append(f"train.activation_checkpointing=alst is DeepSpeed's ALST recipe, which runs ZeRO-3, not "
                         f"{self.zero_stage}; set train.zero_stage=3")
        if self.max_failures < 0:
            found.append(f"train.max_failures ({self.max_failures}) must be >= 0 (-1 is not supported)")
        if self.attention_kernel not in ATTENTION_KERNELS:
            found.append(f"train.attention_kernel ({self.attention_kernel!r}) must be one of "
                         f"{', '.join(ATTENTION_KERNELS)}")
        if self.elementwise not in ELEMENTWISE:
            found.append(f"train.elementwise ({self.elementwise!r}) must be one of {', '.join(ELEMENTWISE)}")
        if self.allocator not in ALLOCATORS:
            found.append(f"train.allocator ({self.allocator!r}) must be one of {', '.join(ALLOCATORS)}")
        if self.on_nonfinite not in ON_NONFINITE:
            found.append(f"train.on_nonfinite ({self.on_nonfinite!r}) must be one of {', '.join(ON_NONFINITE)}")
        elif self.on_nonfinite == "skip" and self.zero_stage == 0:
            found.append("train.on_nonfinite=skip needs train.zero_stage 1, 2 or 3 (their optimizers drop a step with "
                         "non-finite gradients; ZeRO-0's applies it); raise the stage or use on_nonfinite=stop")
        return found


@dataclass
class CheckpointConfig:
    """When DeepSpeed checkpoints are written into the run directory, and how many are kept."""

    every_steps: int = 100
    """0 writes only the final checkpoint."""
    keep_last: int = 2
    """Complete checkpoints kept; the one a run resumed from is kept as well, until the run ends."""
    at_end: bool = True
    trust_pickles: bool = False
    """Load checkpoint files (resume=, model.init_from) that hold Python objects other than tensors and DeepSpeed's
    own, with a full unpickle, which can run code: only for a source you trust. Off: such a file is refused."""

    def problems(self) -> List[str]:
        found = []
        if self.every_steps < 0:
            found.append(f"checkpoint.every_steps ({self.every_steps}) must be >= 0 (0: only at the end)")
        if self.keep_last < 1:
            found.append(f"checkpoint.keep_last ({self.keep_last}) must be >= 1")
        return found


EVAL_FILLERS = ("data", "repeated")


@dataclass
class EvalConfig:
    """`longtrain eval`: perplexity by position and passkey retrieval (did the long context take?)."""

    length: int = 0
    """Tokens per held-out sequence for perplexity by position; 0: the length the (shortest-trained) model was
    trained at for a run directory, data.seq_len otherwise (and during training)."""
    sequences: int = 4
    """Held-out sequences averaged (the data's holdout split, of `length` tokens each)."""
    first_bucket: int = 0
    """End of the first position bucket; buckets double from there (0-1K, 1K-2K, 2K-4K, ...); 0: length / 32
    rounded down to a power of two."""
    lengths: List[int] = field(default_factory=list)
    """Passkey prompt lengths in tokens; empty: [eval.length as resolved]."""
    depths: List[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where in the filler the passkey sits, as a fraction of the context (0: start, 1: just before the question)."""
    trials: int = 5
    """Random passkeys per (length, depth) cell."""
    digits: int = 5
    filler: str = "data"
    """data: text from the eval data's holdout split; repeated: the classic repeated sentence."""
    seed: int = 0
    every_steps: int = 0
    """During training: evaluate each checkpoint whose step is a multiple of this on the driver (rows of kind
    long_context_eval in metrics.jsonl, PNGs in RUN_DIR/eval); 0: never. A multiple of checkpoint.every_steps."""

    def problems(self) -> List[str]:
        found = []
        if self.length < 0 or self.sequences < 1 or self.first_bucket < 0:
            found.append(f"eval.length ({self.length}) and eval.first_bucket ({self.first_bucket}) must be >= 0 and "
                         f"eval.sequences ({self.sequences}) >= 1")
        if self.lengths and min(self.lengths) < 1:
            found.append(f"eval.lengths ({list(self.lengths)}) must be positive token counts, e.g. [4096, 32768]")
        bad = [d for d in self.depths if not 0.0 <= d <= 1.0]
        if not self.depths or bad:
            found.append(f"eval.depths ({list(self.depths)}) must be fractions in [0, 1], e.g. [0, 0.5, 1]")
        if self.trials < 1 or not 1 <= self.digits <= 12:
            found.append(f"eval.trials ({self.trials}) must be >= 1 and eval.digits ({self.digits}) in 1..12")
        if self.filler not in EVAL_FILLERS:
            found.append(f"eval.filler ({self.filler!r}) must be one of {', '.join(EVAL_FILLERS)}")
        if self.every_steps < 0:
            found.append(f"eval.every_steps ({self.every_steps}) must be >= 0 (0: not during training)")
        return found

    def training_problems(self, checkpoint_every: int, lora: bool, covered: int) -> List[str]:
        """eval.every_steps evaluates checkpoints (the driver loads them), so it needs them at those steps."""
        if self.every_steps <= 0:
            return []
        found = []
        if checkpoint_every <= 0 or self.every_steps % checkpoint_every:
            found.append(f"eval.every_steps ({self.every_steps}) evaluates checkpoints: make it a multiple of "
                         f"checkpoint.every_steps ({checkpoint_every}, which must be > 0)")
        if lora:
            found.append("eval.every_steps with model.lora: the checkpoints hold adapters only (merging is not "
                         "built); set eval.every_steps=0")
        longest = max([self.length, *self.lengths])
        if longest > covered:
            found.append(f"eval.lengths / eval.length ({longest}) beyond what the model covers ({covered}: "
                         "model.max_position_embeddings, else data.seq_len); lower them")
        return found


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class ClusterConfig:
    """Where the workers run: a local Ray started on loopback, or an existing cluster."""

    address: str = "local"
    """local: start a private Ray on 127.0.0.1; auto or ray://HOST:10001: connect to a running cluster."""
    num_workers: int = 2
    use_gpu: Optional[bool] = None
    """None: use GPUs when the driver sees CUDA."""
    cpus_per_worker: int = 1
    gpus_per_worker: int = 1
    placement_strategy: str = "PACK"
    """How Ray places the workers on nodes: PACK (fill nodes in turn), SPREAD, STRICT_PACK (one node),
    STRICT_SPREAD (one worker per node)."""

    def problems(self) -> List[str]:
        found = _positive(self, "cluster", ["num_workers", "cpus_per_worker", "gpus_per_worker"])
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            found.append(f"cluster.placement_strategy ({self.placement_strategy!r}) must be one of "
                         f"{', '.join(PLACEMENT_STRATEGIES)}")
        if not (self.address in ("local", "auto") or self.address.startswith("ray://")
                or ":" in self.address):
            found.append(f"cluster.address ({self.address!r}) must be local, auto, ray://HOST:PORT or HOST:PORT")
        return found


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class MetricsConfig:
    """How throughput and MFU are measured and reported."""

    hardware_profile: str = "auto"
    """A name in profiles/hardware/ (h100_sxm, h200, a100_80g, a800, cpu) or auto: detected from the device."""
    warmup_steps: int = 3
    """Steps excluded from the summary's throughput and MFU (compilation, allocator warm-up)."""
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers the driver writes each logged step to: tensorboard (event files in the run directory's
    `tensorboard/`), wandb, mlflow (each only when its package is installed; a missing one is skipped with one
    note); [] for none."""
    eval_every_steps: int = 0
    """Compute the loss on the holdout split (data.holdout_fraction) every this many steps and at the last step;
    0: never."""
    eval_batches: int = 2
    """Holdout micro-batches per rank each evaluation averages over."""
    memory_snapshot_steps: int = 0
    """Record the CUDA caching allocator over this many steps from the start (or the resume) and write
    memory_snapshot_rank{R}.pickle into the run directory (PyTorch's memory viewer reads it); 0: off. CUDA workers."""

    def problems(self) -> List[str]:
        problems = [f"metrics.{key} ({getattr(self, key)}) must be >= 0"
                    for key in ("warmup_steps", "eval_every_steps", "memory_snapshot_steps") if getattr(self, key) < 0]
        if self.eval_batches <= 0:
            problems.append(f"metrics.eval_batches ({self.eval_batches}) must be a positive integer")
        unknown = sorted(set(self.trackers) - set(TRACKERS))
        if unknown:
            problems.append(f"metrics.trackers: unknown {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
        return problems


@dataclass
class ParallelConfig:
    """How the sequence is split across GPUs (DeepSpeed Ulysses); the rest of the workers are data parallel."""

    sp_degree: int = 1
    """GPUs that share one sequence (Ulysses sequence parallel); 1 disables it."""

    def problems(self) -> List[str]:
        return _positive(self, "parallel", ["sp_degree"])


@dataclass
class PlanConfig:
    """What `longtrain plan` may use and how long it may search."""

    gpu_memory_fraction: float = 0.9
    """Share of the device memory the plan may fill (the rest: CUDA context, NCCL and allocator slack)."""
    host_memory_fraction: float = 0.8
    """Share of a node's host memory that swapped activations may use (split evenly over its GPUs)."""
    allow_approximate: bool = False
    """Let the planner pick approximate techniques when exact ones (swap, recompute) do not fit: int8 swaps and
    Mesa int8 compressed layers (`planner.cost_model.PLANNER_COMPRESSION`), chosen per layer by the MIP. A job that
    fits exactly gets none. A `compression` section is planned for its layers whatever this says."""
    time_limit_seconds: float = 5.0
    host_memory_gib: Optional[float] = None
    """Host memory of each node the job runs on; none: the hardware profile's (measured by `longtrain profile
    hardware`, or its datasheet value when planning for another machine: the plan says which). Offloaded
    optimizer states and parameters come out of it first, swapped activations get the rest."""
    """Per MIP; the best solution found so far is kept when the limit is hit."""
    path: Optional[str] = None
    """Plan file `longtrain train` executes (made by `longtrain plan`); none: every activation is stored."""

    def problems(self) -> List[str]:
        found = []
        for key in ("gpu_memory_fraction", "host_memory_fraction"):
            if not 0.0 < getattr(self, key) <= 1.0:
                found.append(f"plan.{key} ({getattr(self, key)}) must be in (0, 1]")
        if self.time_limit_seconds <= 0:
            found.append(f"plan.time_limit_seconds ({self.time_limit_seconds}) must be > 0")
        if self.host_memory_gib is not None and self.host_memory_gib <= 0:
            found.append(f"plan.host_memory_gib ({self.host_memory_gib}) must be > 0 (or unset: the profile's)")
        return found


@dataclass
class TokenElimConfig:
    """LeMo token elimination (approximate: changes the forward): in each sparse layer only the most informative
    `block_size`-token blocks enter the attention block; the rest ride the residual stream."""

    enabled: bool = False
    keep_ratio: float = 0.4
    """Share of each sequence's blocks kept in every sparse layer (LeMo's end-to-end script keeps 40%)."""
    block_size: int = 64
    dense_first_layers: int = 2
    """Leading layers that stay dense (informativeness is not yet contextual there)."""
    dense_last_layers: int = 1
    predictors: Optional[str] = None
    """Block-score predictors made by `longtrain train-predictors` (none: exact scores, one more attention pass)."""

    def keep_ratios(self, num_layers: int) -> Dict[int, float]:
        """Per-layer keep ratios of the sparse layers (all but the dense first and last ones), enabled or not."""
        return {index: self.keep_ratio for index in range(self.dense_first_layers, num_layers - self.dense_last_layers)}

    def problems(self) -> List[str]:
        found = _positive(self, "token_elim", ["block_size"])
        if not 0.0 < self.keep_ratio <= 1.0:
            found.append(f"token_elim.keep_ratio ({self.keep_ratio}) must be in (0, 1]; LeMo uses 0.4")
        for key in ("dense_first_layers", "dense_last_layers"):
            if getattr(self, key) < 0:
                found.append(f"token_elim.{key} ({getattr(self, key)}) must be >= 0")
        return found


@dataclass
class CompressionConfig:
    """Approximate activation compression chosen by hand, per layer: exact forward, approximate backward (Mesa int8
    saved inputs, S2A 4-bit SiLU codes, WTA-CRS sampled weight gradients; see orchestrator/memory/compressed.py)."""

    layers: Any = "all"
    """all, none, or a list of layer indices the settings below apply to."""
    linear_inputs: str = "none"
    """none or int8 (Mesa): saved inputs of q/k/v (stored once), gate/up (once) and down."""
    norm_inputs: str = "none"
    """none or int8 (Mesa): saved inputs of both RMSNorms."""
    silu: str = "none"
    """none, int8 (Mesa) or int4 (S2A: 4-bit bins, value and derivative tables) for the SwiGLU gate."""
    wta_crs_keep_ratio: float = 1.0
    """Share of token rows kept for linears' weight gradients (WTA-CRS, unbiased); 1 keeps all (exact)."""
    range_decay: float = 0.5
    """Decay of the int8/int4 running per-group ranges (Mesa: 0.9, which lagged the fast-growing activations of
    early training here: 4-5% loss gap after 100 steps on the debug model; 0.5: within 1%)."""
    range_groups: int = 8
    """Channel groups per tensor, each with its own int8 range."""

    @property
    def is_active(self) -> bool:
        chosen = self.wta_crs_keep_ratio < 1 or {self.linear_inputs, self.norm_inputs, self.silu} != {"none"}
        return chosen and self.layers not in ("none", [])

    def layer_indices(self, num_layers: int) -> List[int]:
        """`layers` ("all", "none" or a list of indices) as indices."""
        if self.layers == "all":
            return list(range(num_layers))
        if self.layers in ("none", None):
            return []
        return sorted(int(i) for i in self.layers)

    def problems(self, num_layers: int = 0) -> List[str]:
        found = _positive(self, "compression", ["range_groups"])
        for key, allowed in (("linear_inputs", ("none", "int8")), ("norm_inputs", ("none", "int8")),
                             ("silu", ("none", "int8", "int4"))):
            if getattr(self, key) not in allowed:
                found.append(f"compression.{key} ({getattr(self, key)!r}) must be one of {', '.join(allowed)}")
        if not 0.0 < self.wta_crs_keep_ratio <= 1.0:
            found.append(f"compression.wta_crs_keep_ratio ({self.wta_crs_keep_ratio}) must be in (0, 1]; "
                         "the paper uses 0.3")
        if not 0.0 <= self.range_decay < 1.0:
            found.append(f"compression.range_decay ({self.range_decay}) must be in [0, 1); Mesa uses 0.9")
        layers = self.layers
        if not (layers in ("all", "none") or (isinstance(layers, list) and all(
                isinstance(i, int) and 0 <= i < max(num_layers, 1) for i in layers))):
            found.append(f"compression.layers ({layers!r}) must be all, none or a list of layer indices in "
                         f"0..{num_layers - 1}")
        return found


@dataclass
class RunConfig:
    """Naming and placement of the run directory (checkpoints, metrics JSONL, logs)."""

    name: str = "default"
    root: str = "runs"
    dir: Optional[str] = None
    """Explicit run directory; default: ROOT/NAME-YYYYmmdd-HHMMSS."""

    def problems(self) -> List[str]:
        if not RUN_NAME.fullmatch(self.name or ""):
            return [f"run.name ({self.name!r}) may hold only letters, digits, '.', '_' and '-', not starting with "
                    "'.' or '-', up to 100 characters: it names the run directory and resume=auto matches it"]
        return []


@dataclass
class JobConfig:
    """One training job: the only thing a user writes."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    token_elim: TokenElimConfig = field(default_factory=TokenElimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: Optional[str] = None
    """auto (latest complete checkpoint of the newest run of this name), a run directory, or CHECKPOINT_DIR[:TAG]."""

    def __post_init__(self) -> None:
        found = []
        for section in (self.run, self.model, self.data, self.optim, self.train, self.checkpoint,
                        self.cluster, self.parallel, self.metrics, self.plan, self.token_elim, self.eval):
            found += section.problems()
        found += self.compression.problems(self.model.num_layers)
        found += self.eval.training_problems(self.checkpoint.every_steps, self.model.lora.enabled,
                                             self.model.max_position_embeddings or self.data.seq_len)
        found += self._cross_section_problems()
        if found:
            raise ConfigError("; ".join(found))

    def _cross_section_problems(self) -> List[str]:
        found = []
        if self.data.source == "corpus" and self.model.vocab_size < 256:
            found.append(f"model.vocab_size ({self.model.vocab_size}) must be >= 256 for data.source=corpus "
                         "(byte tokens); set model.vocab_size=256")
        found += self._parallel_problems() + self._token_elim_problems() + self._document_problems()
        if self.train.activation_checkpointing != "none" and self.plan.path:
            found.append(f"train.activation_checkpointing={self.train.activation_checkpointing} and plan.path "
                         f"({self.plan.path}) both decide what layers keep; set one of them")
        found += self._memory_feature_problems()
        if self.optim.warmup_steps >= self.train.max_steps > 0:
            found.append(f"optim.warmup_steps ({self.optim.warmup_steps}) must be < train.max_steps "
                         f"({self.train.max_steps}); lower the warm-up or train longer")
        if (self.compression.silu == "int4" and self.compression.is_active and self.plan.path
                and self.model.intermediate_size % 2):
            found.append(f"compression.silu=int4 under plan.path needs an even model.intermediate_size "
                         f"({self.model.intermediate_size}): the plan splits the gate's 4-bit codes, two a byte, by "
                         "token; use compression.silu=int8 or an even model.intermediate_size")
        return found

    def _memory_feature_problems(self) -> List[str]:
        """LoRA, offload, the tiled MLP and the ALST recipe against the rest of the job."""
        lora, train, found = self.model.lora, self.train, self.model.lora.problems()
        if train.activation_checkpointing == "alst" and not (lora.enabled or train.offload.optimizer):
            found.append("train.activation_checkpointing=alst trains a frozen LoRA base or offloads the optimizer "
                         "(ALST's recipe); set model.lora.rank (e.g. 16) or train.offload.optimizer=true")
        if lora.enabled and lora.dropout > 0 and self.plan.path:
            found.append(f"model.lora.dropout ({lora.dropout}) saves a dropped copy of every adapted input, which "
                         "the plan does not manage; set model.lora.dropout=0 with plan.path")
        tiled = train.tiled_mlp or train.activation_checkpointing == "alst"
        if tiled and (self.compression.is_active or self.plan.allow_approximate or self.token_elim.enabled):
            found.append("train.tiled_mlp (also set by activation_checkpointing=alst) does not compose with "
                         "compression, plan.allow_approximate or token_elim yet: the tiled MLP keeps nothing of its "
                         "own for backward; turn one of them off")
        return found

    def _token_elim_problems(self) -> List[str]:
        elim, found = self.token_elim, []
        if not elim.enabled or elim.block_size <= 0:
            return found
        if self.data.seq_len % elim.block_size:
            found.append(f"data.seq_len ({self.data.seq_len}) must be a multiple of token_elim.block_size "
                         f"({elim.block_size}); change either")
        if elim.dense_first_layers + elim.dense_last_layers >= self.model.num_layers:
            found.append(f"token_elim.dense_first_layers ({elim.dense_first_layers}) + token_elim.dense_last_layers "
                         f"({elim.dense_last_layers}) leave no sparse layer of model.num_layers "
                         f"({self.model.num_layers}); lower them or set token_elim.enabled=false")
        if self.parallel.sp_degree > 1:
            found.append(f"token_elim.enabled=true does not run with parallel.sp_degree ({self.parallel.sp_degree}) "
                         "> 1 yet (blocks are chosen per whole sequence); set parallel.sp_degree=1")
        return found

    def _document_problems(self) -> List[str]:
        data, found = self.data, []
        if data.source in TEXT_SOURCES and not data.tokenizer and not self.model.init_from:
            found.append(f"data.tokenizer is required for data.source={data.source}: set it to a Hugging Face "
                         "tokenizer.json (or its directory), or set model.init_from to a model directory holding one")
        if data.packs_documents and self.token_elim.enabled:
            found.append("token_elim.enabled=true does not run with data.packing=documents yet (its blocks are scored "
                         "and kept across document boundaries); set token_elim.enabled=false or data.packing=stream")
        return found

    def _parallel_problems(self) -> List[str]:
        return self.parallel_dims().problems(self.model.num_heads, self.model.num_kv_heads)

    def parallel_dims(self) -> ParallelDims:
        """The job's parallel sizes (world, sp, dp, tokens per rank): the one place they are computed."""
        return ParallelDims.from_job(self)


def _positive(section: Any, prefix: str, keys: List[str]) -> List[str]:
    return [f"{prefix}.{key} ({getattr(section, key)}) must be a positive integer"
            for key in keys if getattr(section, key) <= 0]


def _nearest_divisor(total: int, wanted: int) -> int:
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), d))
