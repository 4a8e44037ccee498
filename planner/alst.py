"""The ALST recipe's step time and memory (`train.activation_checkpointing=alst`), from the same cost model, so
`longtrain plan` can put the baseline beside a plan and answer its longest sequence too.

ALST (Arctic Long Sequence Training, arXiv 2506.13996) as DeepSpeed 0.19.8's parts run it: every layer keeps only
its input, in host memory (DeepSpeed's `checkpoint_in_cpu`, copied on a side stream), and runs its whole forward
again in backward, attention included; the MLP is tiled (DeepSpeed's TiledMLP), the loss too (TiledFusedLogitsLoss:
each chunk's logits, their fp32 copy and cross-entropy's saved log-softmax and gradient, about 16 bytes a logit).
- GPU peak: the static bytes (ZeRO-3: weights / GPUs; optimizer offloaded or a frozen LoRA base) + the larger of
  one layer's backward, its replayed activations (the tiled inventory: attention's and the norms', nothing of the
  MLP) with its working set, the same as a plan's whole-layer checkpoint (`schedule.layer_block_buffers(checkpoint=
  True)`), and the loss's chunk at the head; + the layer inputs DeepSpeed's offload engine holds on the GPU
  (`DEEPSPEED_INPUTS_ON_GPU`), alive at the head and through the last layer's backward.
- Host: every layer's input but the last (never offloaded, `DEEPSPEED_INPUTS_ON_GPU`), hidden x 2 bytes a token,
  each pinned on its own by DeepSpeed's offload engine (`activation_checkpointing/offload_activations.py:178-180`),
  so a power-of-two block on a GPU (`planner.offload_host.pinned_block_bytes`), plus the offloaded optimizer.
- Time: every layer's forward twice and its backward once (the tiled MLP's extra forward in its backward), the head
  once for the logits and once for their input gradient (the loss runs its backward inside its forward, the logits
  made once), once more for the weight gradient if the head trains (not with LoRA), the offloaded optimizer's step; the copies to the host hidden
  on the engine's side stream, the copies back not: each is made when its layer's backward starts.
"""

from dataclasses import dataclass, replace

from planner import whole_job
from planner.cost_model import CostModel, calibrated_peak_bytes
from planner.layout import solve_layout
from planner.offload_host import pinned_block_bytes
from planner.schedule import layer_block_buffers
from spec.activations import LOSS_CHUNK_TOKENS
from spec.config import JobConfig
from spec.hardware import HardwareProfile
from spec.units import GIB

TILED_LOSS_BYTES_PER_LOGIT = 16
"""DeepSpeed's TiledFusedLogitsLoss chunk: bf16 logits 2, their fp32 copy 4, cross-entropy's saved log-softmax 4,
its fp32 gradient 4 and the bf16 one 2."""
DEEPSPEED_INPUTS_ON_GPU = 2
"""Layer inputs that DeepSpeed 0.19.8's checkpoint offload engine (`_ActivationOffloadEngine(keep_last_count=1)`,
`max_fwd_stash_count=2`) keeps on the GPU until backward: the newest (never offloaded: the first backward needs
it) and the last one offloaded (its forward stash drops ids <= newest - 2, so one stays; backward restores it
from there without a copy). Missing from the model, the ALST peak at 256K on a lent H200 was 4.6 GiB (10%) above
it: two inputs are 4 GiB there."""


@dataclass
class AlstPrediction:
    step_seconds: float
    mfu: float
    peak_gpu_gib: float
    gpu_budget_gib: float
    host_gib: float
    host_budget_gib: float

    @property
    def fits(self) -> bool:
        return self.peak_gpu_gib <= self.gpu_budget_gib and self.host_gib <= self.host_budget_gib

    def binding(self) -> str:
        """The constraint that is tightest (as a share of its budget), in words."""
        gpu, host = self.peak_gpu_gib / self.gpu_budget_gib, self.host_gib / self.host_budget_gib
        if gpu >= host:
            return f"GPU memory ({self.peak_gpu_gib:.1f} of {self.gpu_budget_gib:.1f} GiB)"
        return f"host memory (layer inputs {self.host_gib:.1f} of {self.host_budget_gib:.1f} GiB per GPU)"


def predict_alst(job: JobConfig, profile: HardwareProfile) -> AlstPrediction:
    precision = "bf16" if profile.device_kind == "cuda" else "fp32"
    tiled = replace(job, train=replace(job.train, tiled_mlp=True))
    cost = CostModel(tiled, profile, precision)
    layers = cost.layers()
    static = cost.static_memory(job.train.zero_stage)
    largest = max(layers, key=lambda layer: layer.token_wise_bytes + layer.skeletal_bytes)
    replay = solve_layout(layer_block_buffers(largest, checkpoint=True), job.plan.time_limit_seconds).arena_bytes
    loss = min(LOSS_CHUNK_TOKENS, cost.tokens_per_gpu) * job.model.vocab_size * TILED_LOSS_BYTES_PER_LOGIT
    on_gpu = static.total - static.head_and_loss - static.adapter_activations
    input_bytes = cost.tokens_per_gpu * job.model.hidden_size * cost.element_bytes
    held = min(DEEPSPEED_INPUTS_ON_GPU, job.model.num_layers)
    activations = max(replay + static.adapter_activations / job.model.num_layers, loss) + held * input_bytes
    peak = calibrated_peak_bytes(profile, on_gpu, activations)
    fetched = (job.model.num_layers - held) * input_bytes / cost.pcie_bytes_per_second()
    head_passes = 2 + (not job.model.lora.enabled)  # a frozen head has no weight gradient
    step = (sum(2 * layer.forward_seconds + layer.backward_seconds for layer in layers)
            + head_passes * cost.head_seconds()
            + fetched + whole_job.optimizer_step_seconds(cost)) * job.train.grad_accum_steps
    cuda = profile.device_kind == "cuda"
    inputs = (job.model.num_layers - 1) * pinned_block_bytes(int(input_bytes), cuda)  # the newest is not offloaded
    host_static = whole_job.host_static_bytes(job, cost.element_bytes, cuda)
    return AlstPrediction(
        step_seconds=step, mfu=cost.step_flops_per_gpu() / (step * profile.peak_tflops(precision) * 1e12),
        peak_gpu_gib=peak / GIB, gpu_budget_gib=profile.device_memory_gib * job.plan.gpu_memory_fraction,
        host_gib=(inputs + host_static) / GIB, host_budget_gib=whole_job.host_budget_bytes(job, profile) / GIB)


def alst_summary(job: JobConfig, profile: HardwareProfile, prediction: AlstPrediction) -> str:
    """What `longtrain plan` prints for an ALST job (there is no plan file: DeepSpeed decides)."""
    host = whole_job.host_memory(job, profile)
    p = prediction
    return "\n".join([
        f"ALST recipe (DeepSpeed: ZeRO-3, every layer's input in host memory and recomputed, TiledMLP, "
        f"TiledFusedLogitsLoss) for {job.model.num_layers} layers x hidden {job.model.hidden_size}, seq_len "
        f"{job.data.seq_len:,} on {job.cluster.num_workers} x {profile.name}",
        f"  step time   {p.step_seconds:.3f} s   MFU {p.mfu:.1%} (model FLOPs, causal attention halved, peak of the "
        "profile)",
        f"  GPU peak    {p.peak_gpu_gib:.2f} GiB of {p.gpu_budget_gib:.2f} GiB budget",
        f"  host        {p.host_gib:.2f} GiB of {p.host_budget_gib:.2f} GiB per GPU (host memory {host.gib:g} GiB per "
        f"node: {host.source})",
        f"  fits        {'yes' if p.fits else 'no'}; binding: {p.binding()}",
    ])
