"""Cost model of one decoder layer and of the whole job on one GPU: time, saved bytes, static memory.

Why this granularity: the planner decides per layer (a token fraction alpha, a few binaries), so it needs, per
layer and sequence length, (1) forward, backward and recompute times from FLOPs and the profile's achieved rates,
(2) the bytes of every saved activation per token, split into MEMO's classes, and (3) the memory that does not
depend on the plan (weights, gradients, optimizer states by ZeRO stage, LM head and loss buffers).

Saved-activation classes (MEMO): *skeletal* tensors are kept for every token because recomputing them would
repeat the quadratic attention (layer input, attention output, its log-sum-exp); *token-wise* tensors (norm outputs,
q/k/v, MLP intermediates) are, per layer, swapped to host for a fraction alpha of the tokens and recomputed from the
layer input for the rest. Times use the causal-halved attention FLOPs (what the kernel executes); for packed
documents (data.packing=documents) the share of them the document mask leaves, at the rate of the documents'
FLOP-weighted mean length, both from the prepared data's packing summary (`spec.prepared`).
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from spec.config import MODEL_PRESETS, CompressionConfig, JobConfig, ModelConfig
from spec.flops import (attention_forward_flops_per_token, attention_projection_params, attention_training_flops,
                        block_scoring_flops_per_token, layer_matmul_params, matmul_training_flops_per_token,
                        parameter_count, training_flops_per_token)
from spec.prepared import document_attention_stats
from planner import whole_job
from spec import attention_choice
from spec.hardware import HardwareProfile, interpolate_log
from spec.activations import (LOSS_CHUNK_TOKENS, ZERO_BUCKET_ELEMENTS, SavedTensor, compressed_saved_tensors,
                              kept_blocks, layer_saved_tensors, sparse_saved_tensors)

DEFAULT_MATMUL_EFFICIENCY = 0.75
"""Achieved / peak matmul rate assumed when a profile has no measurement (H100 measured 743/989 = 0.75)."""
DEFAULT_ATTENTION_EFFICIENCY = 0.55
SCORING_TO_ATTENTION_RATE = 0.42
"""Token elimination's block scoring rate (q.k FLOPs per second) over the attention forward + backward rate at the
same length, for profiles that did not measure the scoring: on a lent H200 the kernel ran 85.4 / 374.7 ms per
Llama-7B layer at 64K / 128K (206 / 188 TFLOP/s; `longtrain bench --modes token_elim --trace`) against SDPA's
470 / 460 (profiles/runs/h200_2026-12-03_token-elim-trace/)."""
DEFAULT_LAYER_OVERHEAD = 1.2
"""Without measured layer rates: layer time / (matmul time + attention time), one factor on both (norms, RoPE,
SwiGLU and copies are memory-bound extras)."""
BACKWARD_TO_FORWARD = 2.0
CUDA_WORKSPACE_BYTES = 1.5 * 2**30
"""cuBLAS / flash workspaces and NCCL buffers the caching allocator holds besides tensors."""


PLANNER_COMPRESSION = CompressionConfig(linear_inputs="int8", silu="int8")
"""What the planner may give a layer when exact techniques do not fit (plan.allow_approximate): Mesa int8 on the
linears' inputs and the SwiGLU gate: one code path for both, the cheapest backward (S2A int4 and WTA-CRS@0.7 also
stay within 2% on the corpus loss test; a job asks for them in its compression section)."""
@dataclass
class LayerCost:
    """One layer on one GPU for one micro-batch: seconds and bytes."""

    forward_seconds: float
    backward_seconds: float
    recompute_seconds: float
    """Recomputing every token's token-wise tensors (the linear part of the forward, no attention)."""
    skeletal_bytes: float
    token_wise_bytes: float
    tensors: List[SavedTensor]
    tokens: int
    element_bytes: int = 2
    sequences: int = 1
    """Sequences per micro-batch; tokens = sequences x tokens of one sequence on this GPU."""
    keep_share: float = 1.0
    """Share of the tokens the attention block sees (below 1: a token-eliminated layer)."""
    mlp_tile_bytes: float = 0.0
    """A tiled MLP's intermediates of one tile (whatever the sequence); 0: the MLP is not tiled."""
    replay_seconds: float = 0.0
    """Replaying the layer's forward when it is checkpointed whole: the forward, less a tiled MLP's (the replay
    skips it, `orchestrator.memory.layer_replay`); 0: the forward's."""
    exchange_seconds: float = 0.0
    """Ulysses' all-to-all of one pass (q, k, v to heads and the output back; in backward the same bytes as
    gradients), already in forward_seconds and backward_seconds once each; 0 without sequence parallelism."""
    attention_kernel: str = "sdpa"
    """train.attention_kernel: its backward's buffers beside dq differ (`schedule.gqa_expanded_bytes_per_token`)."""

    @property
    def checkpoint_seconds(self) -> float:
        return self.replay_seconds or self.forward_seconds


def largest_layer(layers: List[LayerCost]) -> LayerCost:
    """The layer whose one-layer working set (the level-1 block, shared by all layers) is largest."""
    return max(layers, key=lambda layer: layer.token_wise_bytes + layer.skeletal_bytes)


@dataclass
class StaticMemory:
    """Per-GPU bytes that do not depend on the activation plan."""

    parameters: float
    gradients: float
    optimizer_states: float
    buffers: float
    head_and_loss: float
    embedding_activations: float
    """The two hidden-size tensors outside the layers (the last layer's output, saved by the final norm, and the
    norm's output, saved by the loss): from the end of the forward to the head's backward, so a plan lays them out
    with the head's buffers (`head_interval`), not beside every layer's backward."""
    adapter_activations: float = 0.0
    """LoRA: what the adapters save whole on the GPU in every layer (`spec.activations.lora_adapter_bytes_per_token`)."""

    @property
    def head_interval(self) -> float:
        """What lives only around the LM head: its loss chunk and the two tensors outside the layers. Counted at
        every moment they over-predicted a 256K plan whose peak is in a middle layer's backward by 4 GiB (65.87
        predicted, 61.62 measured on an H200; profiles/runs/h200_2026-12-02_bench-arena-duplex.md)."""
        return self.head_and_loss + self.embedding_activations

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer_states + self.buffers + self.head_and_loss
                + self.embedding_activations + self.adapter_activations)

    def as_gib(self) -> Dict[str, float]:
        """In GiB; the LoRA entry only when there is one (plan files of other jobs stay as they were)."""
        return {k: v / 2**30 for k, v in vars(self).items() if k != "adapter_activations" or v}


class CostModel:
    """Times and bytes of a job on a hardware profile (per GPU, per micro-batch)."""

    def __init__(self, job: JobConfig, profile: HardwareProfile, precision: str = "bf16"):
        job = attention_choice.resolved(job, profile)  # train.attention_kernel=auto: the kernel the profile picks
        self.job, self.model, self.profile = job, job.model, profile
        self.precision = precision
        self.element_bytes = 2 if precision == "bf16" else 4
        self.dims = job.parallel_dims()
        self.world_size, self.sp_degree = self.dims.world_size, self.dims.sp_degree
        self.tokens_per_gpu = self.dims.tokens_per_rank
        self.overhead = fitted_layer_overhead(profile) or LayerOverhead()
        self.documents = document_attention_stats(job.data)
        """Packed documents' attention share and effective length (None: one causal sequence)."""

    def matmul_tflops(self) -> float:
        measured = measured_matmul_tflops(self.profile, self.precision)
        return measured or self.profile.peak_tflops(self.precision) * DEFAULT_MATMUL_EFFICIENCY

    def attention_tflops(self, seq_len: int, kernel: Optional[str] = None) -> float:
        """Causal attention forward + backward of `kernel` (default: the job's train.attention_kernel)."""
        measured, kernel = self.profile.measured, kernel or self.job.train.attention_kernel
        if self.precision == measured.rates_precision and measured.attention_tflops_by_kernel.get(kernel):
            return interpolate_log(measured.attention_tflops_by_kernel[kernel], seq_len)
        table = measured.attention_fwd_bwd_tflops_by_seq_len if self.precision == measured.rates_precision else {}
        sdpa = (interpolate_log(table, seq_len)
                or self.profile.peak_tflops(self.precision) * DEFAULT_ATTENTION_EFFICIENCY)
        return sdpa * measured.attention_kernel_speedup.get(kernel, 1.0)

    def scoring_tflops(self, seq_len: int) -> float:
        """Token elimination's block scoring kernel, q.k FLOPs per second at this length: the profile's measured row
        (its own kernel time, so no layer overhead factor applies), else SCORING_TO_ATTENTION_RATE x SDPA's attention
        rate (the job's attention kernel does not score)."""
        measured = self.profile.measured
        if self.precision == measured.rates_precision and measured.token_scoring_tflops_by_seq_len:
            return interpolate_log(measured.token_scoring_tflops_by_seq_len, seq_len)
        return self.attention_tflops(seq_len, "sdpa") * SCORING_TO_ATTENTION_RATE

    def layer(self, keep_share: float = 1.0) -> LayerCost:
        """One layer; `keep_share` < 1: a token-eliminated layer whose attention block sees that share of the
        tokens (its projections scale with it, attention with its square; exact block scoring adds q and k
        projections of every token and about an attention forward's time, once: recomputation reuses the choice)."""
        seq, tokens, model = self.job.data.seq_len, self.tokens_per_gpu, self.model
        kept_seq = round(keep_share * seq)
        projections = attention_projection_params(model)
        matmul_forward = 2.0 * (layer_matmul_params(model) - (1 - keep_share) * projections) * tokens
        attention_forward = attention_forward_flops_per_token(model, kept_seq) * keep_share * tokens
        attention_length = kept_seq
        if self.documents is not None:  # token elimination does not run with packed documents
            attention_forward *= self.documents["attention_share"]
            attention_length = max(self.documents["effective_length"], 1)
        calibration, overhead = self.profile.calibration, self.overhead
        # The layer's extras (the overhead factor's share, norms, SwiGLU, RoPE) run over every token, also in a
        # token-eliminated layer, whose scoring and gathers add to them: traced on a lent H200 at 64K, 18 ms a
        # sparse layer against 16 ms a dense one (profiles/runs/h200_2026-12-03_token-elim-trace/)
        dense_matmul_forward = 2.0 * layer_matmul_params(model) * tokens
        matmul_seconds = ((matmul_forward + (overhead.matmul_factor - 1) * dense_matmul_forward)
                          / (self.matmul_tflops() * 1e12) * calibration.matmul_time_factor)
        attention_seconds = (attention_forward / (self.attention_tflops(attention_length) * 1e12)
                             * overhead.attention_factor * calibration.attention_time_factor)
        elementwise_seconds = (overhead.forward_seconds_per_token(model, self.element_bytes) * tokens
                               * calibration.matmul_time_factor)
        scoring_seconds = 0.0
        if keep_share < 1 and not self.job.token_elim.predictors:
            kv = model.num_kv_heads * model.head_dim
            projections = 2.0 * model.hidden_size * (model.hidden_size + kv) * tokens  # q and k of every token
            scoring_seconds = (projections / (self.matmul_tflops() * 1e12) * overhead.matmul_factor
                               + block_scoring_flops_per_token(model, seq) * tokens / (self.scoring_tflops(seq) * 1e12))
        tensors = layer_saved_tensors(model, self.element_bytes, self.job.train.elementwise == "compiled")
        if keep_share < 1:
            tensors = sparse_saved_tensors(tensors, model, self.element_bytes, keep_share)
        exchange = self.exchange_seconds(keep_share)
        if model.lora.enabled or self.job.train.tiled_mlp:
            return whole_job.layer_cost(self, tensors, matmul_seconds, attention_seconds, scoring_seconds, keep_share,
                                        exchange, elementwise_seconds)
        per_token = matmul_seconds + elementwise_seconds
        return LayerCost(
            forward_seconds=per_token + attention_seconds + scoring_seconds + exchange,
            backward_seconds=BACKWARD_TO_FORWARD * (per_token + attention_seconds) + exchange,
            recompute_seconds=per_token,
            skeletal_bytes=sum(t.bytes_per_token for t in tensors if t.skeletal) * tokens,
            token_wise_bytes=sum(t.bytes_per_token for t in tensors if not t.skeletal) * tokens,
            tensors=tensors, tokens=tokens, element_bytes=self.element_bytes,
            sequences=self.job.data.micro_batch_size, keep_share=keep_share, exchange_seconds=exchange,
            attention_kernel=self.job.train.attention_kernel)

    def exchange_bytes(self, keep_share: float = 1.0) -> float:
        """Bytes one GPU sends in one pass of Ulysses' all-to-all in one layer: its tokens of q, k and v (to every
        head group) and of the attention output (back), all but the 1/sp share that stays on this GPU; a
        token-eliminated layer exchanges its kept tokens only. 0 without sequence parallelism."""
        sp = self.sp_degree
        if sp == 1:
            return 0.0
        model = self.model
        width = 2 * model.num_heads * model.head_dim + 2 * model.num_kv_heads * model.head_dim
        return self.tokens_per_gpu * keep_share * width * self.element_bytes * (sp - 1) / sp

    def exchange_seconds(self, keep_share: float = 1.0) -> float:
        """`exchange_bytes` over the profile's all-to-all bus bandwidth (nccl-tests' convention: bytes x (n-1)/n
        per second); 0 without sequence parallelism or without a figure in the profile (`alltoall_source` says)."""
        rate = self.profile.measured.alltoall_busbw_gbps
        if self.sp_degree == 1 or not rate:
            return 0.0
        return self.exchange_bytes(keep_share) / (rate * 1e9)

    def alltoall_source(self) -> str:
        """Where the all-to-all bandwidth of this plan comes from, in words ('' without sequence parallelism)."""
        if self.sp_degree == 1:
            return ""
        measured, name = self.profile.measured, self.profile.name
        rate = measured.alltoall_busbw_gbps
        if not rate:
            return (f"not counted: profile {name} has no all-to-all bandwidth; measure it with `longtrain profile "
                    "hardware` on a machine with at least 2 GPUs")
        how = (f"derived from measured runs, not measured (profile {name}, measured.derived says how)"
               if "alltoall_busbw_gbps" in measured.derived else f"measured (profile {name})")
        return f"{rate:g} GB/s bus bandwidth, {how}"

    def keep_shares(self) -> Dict[int, float]:
        """Each token-eliminated layer's kept share of the tokens (the job's token_elim section, rounded to whole
        blocks as the runtime keeps them); empty when token elimination is off."""
        elim = self.job.token_elim
        if not elim.enabled:
            return {}
        blocks = self.job.data.seq_len // elim.block_size
        return {index: kept_blocks(ratio, blocks) / blocks
                for index, ratio in elim.keep_ratios(self.model.num_layers).items()}

    def layers(self) -> List[LayerCost]:
        """Every layer's cost in order (dense layers share one LayerCost)."""
        shares = self.keep_shares()
        by_share = {share: self.layer(share) for share in {1.0, *shares.values()}}
        return [by_share[shares.get(index, 1.0)] for index in range(self.model.num_layers)]

    def compressed_layer(self, settings, keep_share: float = 1.0) -> LayerCost:
        """`layer(keep_share)` for a layer compressed with these settings: its token-wise tensors are the compact
        forms (the layer input's int8 codes, when norms are compressed, count as one more: the plan keeps the input
        exact); a token-eliminated layer's attention-block forms cover its kept rows only."""
        plain = self.layer(keep_share)
        tensors = compressed_saved_tensors(self.model, self.element_bytes, settings)
        if keep_share < 1:
            tensors = sparse_saved_tensors(tensors, self.model, self.element_bytes, keep_share)
        exact = {t.name: t for t in plain.tensors if t.skeletal}
        tensors = [exact[t.name] if t.skeletal else t for t in tensors]
        if settings.norm_inputs == "int8":
            tensors.append(SavedTensor("layer_input_codes", self.model.hidden_size, False))
        token_wise = sum(t.bytes_per_token for t in tensors if not t.skeletal) * self.tokens_per_gpu
        return replace(plain, token_wise_bytes=token_wise, tensors=tensors)

    def compressed_layers(self, settings) -> List[LayerCost]:
        """`layers()` with every layer compressed with these settings (the MIP picks which ones are)."""
        shares = self.keep_shares()
        by_share = {share: self.compressed_layer(settings, share) for share in {1.0, *shares.values()}}
        return [by_share[shares.get(index, 1.0)] for index in range(self.model.num_layers)]

    def static_memory(self, zero_stage: int) -> StaticMemory:
        """Weights, gradients and Adam states by ZeRO stage (mixed precision: bf16 copies + fp32 master, m, v)."""
        params = parameter_count(self.model)
        n = self.world_size
        low = self.element_bytes
        master = 0 if self.precision == "fp32" else 4
        optimizer = (master + 8) * params
        parameters = low * params / (n if zero_stage >= 3 else 1)
        gradients = low * params / (n if zero_stage >= 2 else 1)
        optimizer_states = optimizer / (n if zero_stage >= 1 else 1)
        buckets = 2 * min(ZERO_BUCKET_ELEMENTS, params) * low if zero_stage >= 1 else 0
        workspace = CUDA_WORKSPACE_BYTES if self.profile.device_kind == "cuda" else 0
        if self.model.lora.enabled or self.job.train.offload.any:  # frozen base, adapters, offloaded states
            parameters, gradients, optimizer_states, buckets = whole_job.trained_states(self, zero_stage)
        buffers = buckets + workspace
        return StaticMemory(parameters=parameters, gradients=gradients, optimizer_states=optimizer_states,
                            buffers=buffers, head_and_loss=self.head_and_loss_bytes(),
                            embedding_activations=2 * self.tokens_per_gpu * self.model.hidden_size * low,
                            adapter_activations=whole_job.adapter_activation_bytes(self))

    def head_and_loss_bytes(self) -> float:
        """Segmented LM head + cross-entropy: one chunk's logits (low precision + fp32 + fp32 gradient)."""
        chunk = min(LOSS_CHUNK_TOKENS, self.tokens_per_gpu)
        return chunk * self.model.vocab_size * (self.element_bytes + 8)

    def step_flops_per_gpu(self) -> float:
        """Model FLOPs of one optimizer step on one GPU (causal-halved; packed documents: their attention), for MFU."""
        tokens = self.tokens_per_gpu * self.job.train.grad_accum_steps
        if self.documents is not None:
            squares = self.documents["attention_share"] * self.job.data.seq_len * tokens  # share x S^2 per S tokens
            return matmul_training_flops_per_token(self.model) * tokens + attention_training_flops(self.model, squares)
        return training_flops_per_token(self.model, self.job.data.seq_len) * tokens

    def head_seconds(self) -> float:
        flops = 3 * 2.0 * self.model.hidden_size * self.model.vocab_size * self.tokens_per_gpu
        return flops / (self.matmul_tflops() * 1e12)

    def pcie_bytes_per_second(self) -> float:
        gbps = self.profile.measured.pcie_pinned_gbps_each_way or default_pcie_gbps(self.profile)
        return gbps * 1e9


def measured_matmul_tflops(profile: HardwareProfile, precision: str) -> float:
    """The profile's measured matmul rate in this precision; 0 when it has none."""
    rate = profile.measured.matmul_bf16_tflops if precision == "bf16" else profile.measured.matmul_fp32_tflops
    return rate or 0.0


def calibrated_peak_bytes(profile: HardwareProfile, static_bytes: float, arena_bytes: float) -> float:
    """A plan's peak: static memory plus the activation arena, with the profile's fitted memory calibration."""
    calibration = profile.calibration
    return static_bytes + calibration.peak_memory_factor * arena_bytes + calibration.peak_memory_offset_gib * 2**30


@dataclass(frozen=True)
class LayerOverhead:
    """What a layer costs beyond its matmuls and attention at their measured rates, from the profile's measured
    layer rates (`fitted_layer_overhead`). Why two terms: the extras (norms, RoPE, SwiGLU, residual adds, layout
    copies) are memory-bound passes over each token's activations, so their time grows with the tokens, not with
    the attention's tokens x sequence; one factor on the whole layer, fitted at 16K-64K, over-priced a 256K layer's
    attention by that factor (Llama-3-8B on a lent H200: +19% at 256K, +25% at 320K). Without measured layer rates
    (datasheet profiles) one factor on both parts, DEFAULT_LAYER_OVERHEAD, as before."""

    matmul_factor: float = DEFAULT_LAYER_OVERHEAD
    attention_factor: float = DEFAULT_LAYER_OVERHEAD
    """The layer's attention time / the attention kernel's measured time at the same length (in place: the
    model's head-major views, its GQA)."""
    seconds_per_token: float = 0.0
    """The extras' forward + backward seconds per token of one layer of `reference_bytes_per_token`."""
    reference_bytes_per_token: float = 1.0
    """The measured layer's saved activations per token (bf16): the extras' traffic scales with them."""

    def forward_seconds_per_token(self, model: ModelConfig, element_bytes: int) -> float:
        """The extras' forward share (a third: backward reads and writes about twice a forward's bytes, as its
        matmuls do twice a forward's FLOPs) for this model's layer, scaled by its activations per token."""
        if not self.seconds_per_token:
            return 0.0
        per_token = sum(t.bytes_per_token for t in layer_saved_tensors(model, 2))
        return self.seconds_per_token / (1 + BACKWARD_TO_FORWARD) * per_token / self.reference_bytes_per_token


def fitted_layer_overhead(profile: HardwareProfile) -> Optional[LayerOverhead]:
    """The layer's extras from the profile's measured layer rates (measured on its `layer_shape`, Llama-7B when it
    names none): per measured length, seconds per token = matmuls + a x attention + c, with the matmuls and the
    attention at the profile's measured rates; a (attention in place against the kernel alone) and c (per-token
    extras) by least squares over the lengths (two or more), c alone with a = 1 from one. None without
    measurements."""
    measured = profile.measured
    model = ModelConfig(**{**MODEL_PRESETS["llama-7b"], **measured.layer_shape})
    matmul_tflops = measured_matmul_tflops(profile, measured.rates_precision)
    if not (measured.layer_fwd_bwd_tflops_by_seq_len and matmul_tflops):
        return None
    rows = []  # (attention seconds, seconds left after the matmuls), per token, forward + backward
    for seq, layer_tflops in sorted(measured.layer_fwd_bwd_tflops_by_seq_len.items()):
        matmul = 2.0 * layer_matmul_params(model)
        attention = attention_forward_flops_per_token(model, int(seq))
        attention_rate = measured.attention_rate("sdpa", seq) or matmul_tflops
        layer_seconds = 3 * (matmul + attention) / (layer_tflops * 1e12)
        rows.append((3 * attention / (attention_rate * 1e12), layer_seconds - 3 * matmul / (matmul_tflops * 1e12)))
    attention_factor, extras = 1.0, sum(left - a for a, left in rows) / len(rows)
    if len({a for a, _ in rows}) > 1:
        mean_a, mean_left = (sum(a for a, _ in rows) / len(rows), sum(left for _, left in rows) / len(rows))
        slope = (sum((a - mean_a) * (left - mean_left) for a, left in rows)
                 / sum((a - mean_a) ** 2 for a, _ in rows))
        if slope > 0 and mean_left - slope * mean_a >= 0:
            attention_factor, extras = slope, mean_left - slope * mean_a
    if extras < 0:  # the layer ran faster than its parts: no extras, the attention in place takes the rest
        attention_factor, extras = sum(left for _, left in rows) / sum(a for a, _ in rows), 0.0
    reference = sum(t.bytes_per_token for t in layer_saved_tensors(model, 2))
    return LayerOverhead(matmul_factor=1.0, attention_factor=attention_factor, seconds_per_token=extras,
                         reference_bytes_per_token=reference)


def default_pcie_gbps(profile: HardwareProfile) -> float:
    """Without a measurement: a PCIe Gen4 x16 link's achieved pinned rate (Gen5 measured 55 GB/s on H100)."""
    return 25.0
