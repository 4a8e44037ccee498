"""Measure activation-memory strategies side by side on one GPU: a stack of Llama-shaped decoder layers, forward
and backward, for each sequence length and each mode, in one process.

Why layers only: the strategies differ in what the layers keep for backward; the embedding, LM head and
optimizer are the same for all of them, so leaving them out isolates the difference (the H100 baseline probe of
2026-11-23 measured the same thing). Modes:
  store_all           plain autograd (runs until it does not fit)
  full_recompute      torch.utils.checkpoint around every layer
  deepspeed_cpu_ckpt  DeepSpeed activation checkpointing with checkpoint_in_cpu
  save_on_cpu         torch.autograd.graph.save_on_cpu(pin_memory=True): every saved tensor to pinned host memory
  longtrain           the planner's plan for this shape on this GPU's profile, run by the token-wise runtime,
                      kept activations in the plan's static arena
  longtrain_no_arena  the same plan with every buffer from the caching allocator (to measure fragmentation)
  mesa_int8           store_all with Mesa int8 saved inputs (linears, norms, SiLU): approximate backward
  s2a_int4            store_all with S2A 4-bit SwiGLU gate codes
  wta_crs             store_all with WTA-CRS weight gradients from 70% of the token rows (issue 19's target)
  compressed          all three at once
  compressed_swap     all three, their compact forms swapped to host by the token-wise runtime (every token, or
                      --policy), to measure the host bytes against `longtrain --policy 0/1/0`
  token_elim          store_all with LeMo token elimination in every layer (40% of the 64-token blocks kept)
  longtrain_token_elim  the planner's plan for this shape with that token elimination (sparse layers cost less),
                      run by the token-wise runtime with its arena; recomputation reuses the kept blocks
"""

import gc
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch._dynamo.utils import counters
from torch import nn

from spec.config import JobConfig
from orchestrator.memory.ds_checkpointing import deepspeed_layer_runner
from launch.measure.calibration import bench_job, not_in_bench_bytes, predict
from orchestrator.memory import replay_allocator, tokenwise
from orchestrator import attention, elementwise
from orchestrator.model import DecoderLayer, rope_tables
from spec.flops import attention_forward_flops_per_token, layer_matmul_params
from spec.hardware import HardwareProfile
from spec.plan import LayerPlan
from planner.planning import PlanInfeasible, make_plan
from spec.units import GIB

COMPRESSION_MODES = {
    "mesa_int8": dict(linear_inputs="int8", norm_inputs="int8", silu="int8"),
    "s2a_int4": dict(silu="int4"),
    "wta_crs": dict(wta_crs_keep_ratio=0.7),
    "compressed": dict(linear_inputs="int8", norm_inputs="int8", silu="int4", wta_crs_keep_ratio=0.3),
}
"""Approximate techniques measured on their own (no recompute or swap), against store_all: memory and speed."""
SWAP_ALL = (0.0, 1.0, 0.0)
"""compressed_swap's token-wise policy unless --policy says otherwise: every token's compact forms to host."""
TOKEN_ELIM = dict(enabled=True, keep_ratio=0.4, dense_first_layers=0, dense_last_layers=0)
"""The bench's token elimination (both modes): LeMo's end-to-end keep ratio in every layer."""


class LayerStack(nn.Module):
    def __init__(self, job: JobConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(job.model) for _ in range(job.model.num_layers))


@dataclass
class BenchRow:
    mode: str
    seq_len: int
    status: str
    step_seconds: float = 0.0
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    mfu_full_attention: float = 0.0
    peak_allocated_gib: float = 0.0
    peak_reserved_gib: float = 0.0
    host_gib: float = 0.0
    after_forward_gib: float = 0.0
    """Allocated when the forward has finished (what every strategy keeps for backward, weights included)."""
    predicted_step_seconds: float = 0.0
    """longtrain rows: the planner's step time for these layers (LM head and optimizer left out)."""
    predicted_peak_gib: float = 0.0
    """longtrain rows: the planner's peak for what the bench allocates (no optimizer, embedding or LM head)."""
    alloc_retries: int = 0
    """Times the caching allocator freed its cache and retried in the timed steps (each one synchronises the
    device, so a plan at the memory limit loses its copy overlap)."""
    inactive_split_peak_gib: float = 0.0
    """The most the timed steps held in free pieces of split cached blocks (the allocator's holes between live
    tensors); reserved - allocated beyond it is whole cached segments that no request of the moment fits."""
    note: str = ""
    trace: str = ""
    """With `--trace`: the top device operations of one more step, by self device time (torch.profiler)."""

    def add_note(self, text: str) -> None:
        """One more remark on the row, after those it has ("; " between them)."""
        self.note = (self.note + "; " if self.note else "") + text


@dataclass(frozen=True)
class BenchOptions:
    """What `longtrain bench`'s flags change in the measurement (the defaults: none of them given)."""

    plan_fraction: Optional[float] = None
    """Overrides the plan's GPU budget fraction (`--plan-fraction`)."""
    swap_hidden_fraction: Optional[float] = None
    """The plans the bench makes use this instead of planner.policy.SWAP_HIDDEN_FRACTION (`--swap-hidden`), to
    calibrate it."""
    hand_policy: Optional[LayerPlan] = None
    """One layer's decision for every layer instead of the planner's plan (`--policy K/S/R[/host]`)."""
    trace: bool = False
    """Profile one extra step of every row that ran (`--trace`)."""
    trace_dir: Optional[str] = None
    """Where `--trace` keeps each traced step's Chrome trace (gzip), next to the report."""
    elementwise: str = "eager"
    """The layers' RMSNorm, RoPE and SwiGLU (`--elementwise`, train.elementwise): eager or compiled."""
    attention_kernel: str = "sdpa"
    """The layers' causal attention (`--attention-kernel`, train.attention_kernel): sdpa, fa4, or auto (the profile's
    pick at each row's length)."""

    def job_overrides(self) -> List[str]:
        """The job keys these flags stand for: the plan is made for the layer that runs."""
        return [f"train.elementwise={self.elementwise}", f"train.attention_kernel={self.attention_kernel}"]


def layer_flops_per_token(job: JobConfig, causal_halved: bool) -> float:
    per_layer = 2 * layer_matmul_params(job.model) + attention_forward_flops_per_token(
        job.model, job.data.seq_len, causal_halved)
    return 3.0 * per_layer * job.model.num_layers


def run_mode(mode: str, job: JobConfig, profile: HardwareProfile, repeats: int,
             options: BenchOptions = BenchOptions()) -> BenchRow:
    """One row: median step time over `repeats` after one warm-up step; OOM and errors become the status."""
    row = BenchRow(mode, job.data.seq_len, "ok")
    try:
        _measure(mode, job, profile, repeats, row, options)
    except torch.cuda.OutOfMemoryError as error:
        row.status = "OOM"
        row.add_note(str(error).split(". GPU")[0][:120])
    except PlanInfeasible as error:
        row.status, row.note = "does not fit", str(error)[:200]
    except Exception as error:  # one failing mode must not stop the comparison; the row says what happened
        first_line = str(error).splitlines()[0] if str(error) else ""
        full = first_line.find(replay_allocator.OUT_OF_MEMORY)  # the replay allocator's (a RuntimeError)
        if full >= 0:
            row.status = "OOM"
            row.add_note(first_line[full:full + 120])
        else:
            row.status, row.note = "failed", f"{type(error).__name__}: {first_line[:160]}"
    finally:
        gc.collect()
        replay = replay_allocator.installed()
        if replay is not None and replay.layout is not None:
            try:
                replay.drop()
            except RuntimeError:  # a failed step's tensors still alive: the next row's layout says so if it fails
                row.add_note("its arena not returned (tensors still alive)")
        torch.cuda.empty_cache()
    return row


def _measure(mode: str, job: JobConfig, profile: HardwareProfile, repeats: int, row: BenchRow,
             options: BenchOptions) -> None:
    torch.manual_seed(0)
    stack = LayerStack(job).cuda().to(torch.bfloat16)
    elementwise.install(stack, options.elementwise, torch.device("cuda"))
    kernel = attention.resolved_kernel(job, profile, torch.device("cuda"), torch.bfloat16).train.attention_kernel
    if kernel != options.attention_kernel:
        row.add_note(f"attention {kernel} (auto)")
    attention.install(stack, kernel, False, torch.device("cuda"), torch.bfloat16)
    step, parts = _mode_step(mode, stack, job, profile, row, options)
    seq = job.data.seq_len
    x = torch.randn(1, seq, job.model.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_tables(torch.arange(seq, device="cuda"), job.model.head_dim, job.model.rope_theta,
                           torch.bfloat16)
    grad = torch.randn_like(x)
    step(x, cos, sin, grad)  # warm-up
    torch.cuda.synchronize()
    replay = replay_allocator.installed()
    if replay is not None:
        step = _replayed(step, replay, row, (x, cos, sin, grad))
    replay_before = replay.counters() if replay is not None else None
    torch.cuda.reset_peak_memory_stats()
    parts.arena_fallbacks()  # the warm-up's
    retries_before = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    graphs_before = counters["stats"]["unique_graphs"]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(x, cos, sin, grad)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    compiled = counters["stats"]["unique_graphs"] - graphs_before
    if compiled:  # torch.compile traced something after the warm-up: a timed step paid for compiling it
        row.add_note(f"{compiled} graph(s) compiled in the timed steps")
    row.step_seconds = statistics.median(times)
    row.tokens_per_second = seq / row.step_seconds
    peak = profile.peak_tflops("bf16") * 1e12
    row.mfu = layer_flops_per_token(job, True) * row.tokens_per_second / peak
    row.mfu_full_attention = layer_flops_per_token(job, False) * row.tokens_per_second / peak
    row.peak_allocated_gib = torch.cuda.max_memory_allocated() / GIB
    row.peak_reserved_gib = torch.cuda.max_memory_reserved() / GIB
    stats = torch.cuda.memory_stats()
    row.alloc_retries = stats.get("num_alloc_retries", 0) - retries_before
    row.inactive_split_peak_gib = stats.get("inactive_split_bytes.all.peak", 0) / GIB
    fragmented = fragmentation_note(row, replayed=replay is not None)
    if fragmented:
        row.add_note(fragmented + _steady_fragmentation(step, x, cos, sin, grad))
    row.host_gib = parts.host_bytes() / GIB
    if replay is not None:  # the timed steps' requests the layout covers that missed their offsets (goal: none)
        now = replay.counters()
        row.note += (f"; replay fallbacks {now.fallbacks - replay_before.fallbacks} "
                     f"({(now.fallback_bytes - replay_before.fallback_bytes) / GIB:.2f} GiB; "
                     f"{now.mismatches - replay_before.mismatches} other size or stream, "
                     f"{now.overlaps - replay_before.overlaps} bytes still held)")
    missed = parts.arena_fallbacks()
    if missed is not None:  # the timed steps' kept slices that missed their planned regions (the goal is none)
        row.note += f"; arena fallbacks {missed[0]}" + (f" ({missed[1] / GIB:.2f} GiB)" if missed[0] else "")
    if options.trace:
        row.trace = _trace_one_step(step, x, cos, sin, grad, options.trace_dir, mode)


def _replayed(step, replay: "replay_allocator.ReplayAllocator", row: BenchRow, args: tuple):
    """`--allocator planned`: trace one more step, lay its requests out, and run later steps at those offsets."""
    row.add_note(replay.lay_out(lambda: step(*args)).describe())

    def replayed_step(*step_args):
        with replay.window():
            step(*step_args)

    return replayed_step


def fragmentation_note(row: BenchRow, replayed: bool = False) -> str:
    """'reserved - allocated 26.1 GiB (26%): holes at most 3.1 GiB, the rest whole cached segments' (issue 20's
    measure: the goal is 2% of the allocated peak), or '' within it."""
    spare = row.peak_reserved_gib - row.peak_allocated_gib
    if row.peak_allocated_gib <= 0 or spare <= 0.02 * row.peak_allocated_gib:
        return ""
    if replayed:  # no split blocks: the layout's arena above the live peak, and the exact-size cache's free blocks
        return f"reserved - allocated {spare:.1f} GiB ({spare / row.peak_allocated_gib:.0%})"
    holes = min(row.inactive_split_peak_gib, spare)
    return (f"reserved - allocated {spare:.1f} GiB ({spare / row.peak_allocated_gib:.0%}): holes at most "
            f"{holes:.1f} GiB, the rest whole cached segments")


def _steady_fragmentation(step, x, cos, sin, grad) -> str:
    """'; from an emptied cache 1.2 GiB (1%)': reserved - allocated of one more step after the cache is returned.
    Why: the timed steps start from what the warm-up reserved (torch.compile's and the kernels' first calls, other
    sizes), so their spare mixes warm-up leftovers with what a steady step itself leaves unused."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step(x, cos, sin, grad)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
    return f"; from an emptied cache {reserved - allocated:.1f} GiB ({(reserved - allocated) / allocated:.0%})"


def _trace_one_step(step, x, cos, sin, grad, trace_dir: Optional[str], mode: str) -> str:
    """The top device operations of one step, and whether its host copies hid under compute."""
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    from launch.measure.trace import describe, load_events, timeline_summary

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        step(x, cos, sin, grad)
        torch.cuda.synchronize()
    table = trace.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=48)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        trace.export_chrome_trace(str(path))
        timeline = describe(timeline_summary(load_events(path)))
        if trace_dir:
            import gzip
            import shutil

            saved = Path(trace_dir) / f"trace_{mode}_{x.shape[1]}.json.gz"
            with path.open("rb") as source, gzip.open(saved, "wb") as target:
                shutil.copyfileobj(source, target)
            timeline += f"\nChrome trace (open in Perfetto): {saved}"
    return table + "\n" + timeline


@dataclass
class _StepParts:
    """How a mode runs the stack: the call around each layer, the context around the forward, and the host bytes
    it holds (the defaults are plain autograd, store_all)."""

    wrap: Callable = lambda layer, x, cos, sin: layer(x, cos, sin)  # noqa: E731
    context: Callable = nullcontext
    host_bytes: Callable[[], float] = lambda: 0.0  # noqa: E731
    arena_fallbacks: Callable[[], Optional[Tuple[int, int]]] = lambda: None  # noqa: E731
    """(slice sets, bytes) that missed the plan's arena since the last call (`KeptArena.step_fallbacks`); None
    without an arena."""


def _store_all(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
               options: BenchOptions) -> _StepParts:
    return _StepParts()


def _full_recompute(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
                    options: BenchOptions) -> _StepParts:
    from torch.utils.checkpoint import checkpoint

    return _StepParts(wrap=lambda layer, x, cos, sin: checkpoint(layer, x, cos, sin, use_reentrant=False))


def _deepspeed_cpu_ckpt(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
                        options: BenchOptions) -> _StepParts:
    return _StepParts(wrap=deepspeed_layer_runner(job.model.num_layers, in_cpu=True))


def _save_on_cpu(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
                 options: BenchOptions) -> _StepParts:
    return _StepParts(context=lambda: torch.autograd.graph.save_on_cpu(pin_memory=True), host_bytes=_pinned_bytes)


def _compression(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow, options: BenchOptions,
                 settings: Dict) -> _StepParts:
    from spec.config.schema import CompressionConfig
    from orchestrator.memory import compressed

    compressed.apply(stack, compressed.Config(CompressionConfig(**settings), seed=0), range(len(stack.layers)))
    row.note = ", ".join(f"{key}={value}" for key, value in settings.items())
    return _StepParts()


def _compressed_swap(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
                     options: BenchOptions) -> _StepParts:
    from spec.config.schema import CompressionConfig
    from orchestrator.memory import compressed

    policy = options.hand_policy or LayerPlan(0, *SWAP_ALL)
    runtime = tokenwise.apply(stack, tokenwise.Config(), _every_layer(policy, len(stack.layers)))
    compressed.apply(stack, compressed.Config(CompressionConfig(**COMPRESSION_MODES["compressed"]), seed=0),
                     range(len(stack.layers)))
    row.note = (f"compressed + keep/swap/recompute {policy.keep_fraction:.2f}/{policy.swap_fraction:.2f}/"
                f"{policy.recompute_fraction:.2f}")
    return _StepParts(host_bytes=lambda: runtime.pool.bytes)


def _token_elim(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
                options: BenchOptions) -> _StepParts:
    from spec.config import TokenElimConfig
    from orchestrator.memory import token_elim

    settings = TokenElimConfig(**TOKEN_ELIM)
    token_elim.apply(stack, settings, sorted(settings.keep_ratios(len(stack.layers))))
    row.note = f"keep ratio {settings.keep_ratio} in every layer, blocks of {settings.block_size} tokens"
    return _StepParts()


def _longtrain(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow, options: BenchOptions,
               use_arena: bool, with_token_elim: bool) -> _StepParts:
    from spec.config import TokenElimConfig
    from orchestrator.memory import token_elim

    if with_token_elim:
        job.token_elim = TokenElimConfig(**TOKEN_ELIM)
    runtime = _apply_longtrain_plan(stack, job, profile, row, use_arena, options)
    if job.token_elim.enabled:
        token_elim.apply(stack, job.token_elim, sorted(job.token_elim.keep_ratios(len(stack.layers))))
        row.note += f"; token_elim keep ratio {job.token_elim.keep_ratio} in every layer"
    if not runtime:
        return _StepParts()
    return _StepParts(host_bytes=lambda: runtime.pool.bytes,
                      arena_fallbacks=lambda: runtime.arena.step_fallbacks() if runtime.arena else None)


MODE_PARTS: Dict[str, Callable[..., _StepParts]] = {
    "store_all": _store_all,
    "full_recompute": _full_recompute,
    "deepspeed_cpu_ckpt": _deepspeed_cpu_ckpt,
    "save_on_cpu": _save_on_cpu,
    "longtrain": partial(_longtrain, use_arena=True, with_token_elim=False),
    "longtrain_no_arena": partial(_longtrain, use_arena=False, with_token_elim=False),
    **{mode: partial(_compression, settings=settings) for mode, settings in COMPRESSION_MODES.items()},
    "compressed_swap": _compressed_swap,
    "token_elim": _token_elim,
    "longtrain_token_elim": partial(_longtrain, use_arena=True, with_token_elim=True),
}
"""Each mode's setup of the stack: (stack, job, profile, row, options) -> how its step runs."""
MODES = tuple(MODE_PARTS)


def _mode_step(mode: str, stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
               options: BenchOptions):
    parts = MODE_PARTS[mode](stack, job, profile, row, options)

    def step(x, cos, sin, grad):
        with parts.context():
            out = x
            for layer in stack.layers:
                out = parts.wrap(layer, out, cos, sin)
        row.after_forward_gib = max(row.after_forward_gib, torch.cuda.memory_allocated() / GIB)
        out.backward(grad)
        x.grad = None
        for p in stack.parameters():
            p.grad = None

    return step, parts


def _pinned_bytes() -> float:
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
    return float(stats.get("allocated_bytes.all.peak", stats.get("allocated_bytes.all.current", 0)))


def _apply_longtrain_plan(stack: LayerStack, job: JobConfig, profile: HardwareProfile, row: BenchRow,
                          use_arena: bool, options: BenchOptions):
    """Plan this shape for this GPU; the stack has no optimizer, so the plan's budget gets the optimizer's share
    back (the baselines use the whole GPU too)."""
    from orchestrator.memory import arena
    from planner.cost_model import CostModel

    hand = options.hand_policy
    if hand is not None:
        row.note = (f"hand policy keep/swap/recompute/skeletal-host: {hand.keep_fraction:.2f}/"
                    f"{hand.swap_fraction:.2f}/{hand.recompute_fraction:.2f}/{hand.offload_skeletal}")
        decisions = _every_layer(hand, len(stack.layers))
        mine = predict(job.data.seq_len, len(decisions), decisions, profile, job.model.preset,
                       options.job_overrides())  # the planner's view of a policy it did not choose
        row.predicted_step_seconds, row.predicted_peak_gib = mine.step_seconds, mine.peak_gib
        return tokenwise.apply(stack, tokenwise.Config(), decisions)
    cost = CostModel(job, profile)
    static = cost.static_memory(0)
    device_bytes = profile.device_memory_gib * GIB
    job.plan.gpu_memory_fraction = options.plan_fraction or min(
        0.95, job.plan.gpu_memory_fraction + static.optimizer_states / device_bytes)
    outcome = make_plan(job, profile, options.swap_hidden_fraction)
    plan = outcome.plan
    groups = {(d.keep_fraction, d.swap_fraction, d.recompute_fraction, d.offload_skeletal) for d in plan.layers}
    row.note = "plan keep/swap/recompute/skeletal-host: " + "; ".join(
        f"{k:.2f}/{s:.2f}/{r:.2f}/{o}" for k, s, r, o in sorted(groups))
    row.predicted_peak_gib = plan.predicted["peak_gpu_gib"] - not_in_bench_bytes(cost, static) / GIB
    row.predicted_step_seconds = outcome.policy.micro_batch_seconds - 3 * cost.head_seconds()

    runtime = tokenwise.apply(stack, tokenwise.Config(), plan.layers)
    kept = arena.apply(stack, arena.Config(plan.runtime_arena), range(len(stack.layers))) if use_arena else None
    if kept is not None:
        row.note += f"; arena {kept.bytes / GIB:.1f} GiB"
    return runtime


def _every_layer(decision: LayerPlan, num_layers: int) -> List[LayerPlan]:
    """One layer's decision (`--policy`) as every layer's."""
    return [replace(decision, layer=index) for index in range(num_layers)]


def longest_trained(rows: List[Dict]) -> Dict[str, int]:
    """The longest sequence each mode ran (0 when it ran none)."""
    longest: Dict[str, int] = {}
    for row in rows:
        longest.setdefault(row["mode"], 0)
        if row["status"] == "ok":
            longest[row["mode"]] = max(longest[row["mode"]], row["seq_len"])
    return longest


def run_bench(num_layers: int, seq_lens: List[int], modes: List[str], profile: HardwareProfile, repeats: int,
              preset: str = "llama-7b", on_row: Optional[Callable[[BenchRow], None]] = None,
              options: BenchOptions = BenchOptions()) -> List[Dict]:
    """Every (sequence length, mode) row; a mode that ran out of memory is not retried at longer sequences."""
    rows, out_of_memory = [], set()
    for seq_len in sorted(seq_lens):
        for mode in modes:
            job = bench_job(num_layers, seq_len, preset, options.job_overrides())
            if mode in out_of_memory:
                row = BenchRow(mode, seq_len, "skipped", note="ran out of memory at a shorter sequence")
            elif mode == "save_on_cpu" and _pinned_need_bytes(job) > HOST_SHARE * _host_bytes():
                row = BenchRow(mode, seq_len, "skipped", note=f"needs ~{_pinned_need_bytes(job) / GIB:.0f} GiB "
                               f"of pinned host memory, over {HOST_SHARE:.0%} of this host's")
            else:
                row = run_mode(mode, job, profile, repeats, options)
            if row.status == "OOM":
                out_of_memory.add(mode)
            rows.append(asdict(row))
            if on_row:
                on_row(row)
    return rows


HOST_SHARE = 0.5
"""save_on_cpu is skipped when it would pin more than this share of host memory (the 2026-11-23 probe's
process died pinning 80 GB at 128K)."""


def _pinned_need_bytes(job: JobConfig) -> float:
    """save_on_cpu copies every saved tensor, the weights included, to pinned memory."""
    from planner.cost_model import layer_saved_tensors

    per_token = sum(t.bytes_per_token for t in layer_saved_tensors(job.model, 2))
    return job.model.num_layers * (per_token * job.data.seq_len + 2 * layer_matmul_params(job.model))


def _host_bytes() -> float:
    import psutil

    return float(psutil.virtual_memory().total)
