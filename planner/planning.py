"""Make a plan for a job on a hardware profile: cost model -> MIP 1 (policy) -> MIP 2 (layout) -> Plan.

When no policy fits, say why (the smallest GPU footprint any policy reaches, and what it is made of) and search
the smallest change that fits, in order of cost to the user: a higher ZeRO stage, int8 compression, sequence
parallelism over the same GPUs, more GPUs, and the longest sequence that fits as configured. A policy whose laid-out
plan peaks above the GPU budget (the policy's estimate leaves out fraction rounding, buffer alignment and the
profile's memory calibration) is solved again under a budget lowered by the excess; a plan still above it is refused
the same way, never written.
"""

import copy
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

from spec.config import TOKEN_BLOCK, JobConfig
from spec.errors import LongtrainError
from planner import whole_job
from planner.cost_model import CostModel, calibrated_peak_bytes, largest_layer
from spec.hardware import HardwareProfile
from planner.layout import Buffer, LayoutResult, solve_layout
from spec.plan import Plan, hash_inputs, parse_compression_spec, plan_inputs
from planner.policy import (SWAP_HIDDEN_FRACTION, PolicyInputs, PolicyResult, given_copies, policy_inputs,
                            solve_policy)
from planner.schedule import keeps_everything, layer_block_buffers, step_buffers
from spec.activations import FRACTION_DECIMALS
from spec.units import GIB


class PlanInfeasible(LongtrainError):
    """No policy fits the budgets; the message says why and what would fit."""


@dataclass
class PlanOutcome:
    plan: Plan
    cost: CostModel
    policy: PolicyResult
    layer_block: LayoutResult
    step_layout: LayoutResult
    seconds: float


def training_precision(profile: HardwareProfile) -> str:
    return "bf16" if profile.device_kind == "cuda" else "fp32"


def make_plan(job: JobConfig, profile: HardwareProfile,
              swap_hidden_fraction: Optional[float] = None, explain: bool = True) -> PlanOutcome:
    """swap_hidden_fraction: None for `planner.policy.SWAP_HIDDEN_FRACTION` (the bench sets it to calibrate it).
    Raises PlanInfeasible when no policy fits, or when the laid-out plan's peak is above the GPU budget; with
    `explain`, its message says why and searches for the change that fits (several solves: a search that only asks
    whether a job fits, like `plan --max-seq`, turns it off)."""
    started = time.perf_counter()
    check_host_static(job, profile)
    solved = _solve(job, profile, SWAP_HIDDEN_FRACTION if swap_hidden_fraction is None else swap_hidden_fraction)
    if not solved[1].feasible:
        raise PlanInfeasible(explain_infeasible(job, profile, solved[2]) if explain else "no policy fits")
    plan, block, step, solved = _fitted_layout(job, profile, solved)
    if _over_budget(plan):
        raise PlanInfeasible(explain_over_budget(job, profile, plan) if explain else "the laid-out plan is over budget")
    return PlanOutcome(plan=plan, cost=solved[0], policy=solved[1], layer_block=block, step_layout=step,
                       seconds=time.perf_counter() - started)


def check_host_static(job: JobConfig, profile: HardwareProfile) -> None:
    """The offloaded optimizer and parameters must fit the host before any activation goes there: one line with
    the host memory the job needs, and where the machine's figure came from."""
    static = whole_job.host_static_bytes(job, 2 if training_precision(profile) == "bf16" else 4,
                                         profile.device_kind == "cuda")
    budget = whole_job.host_budget_bytes(job, profile)
    if static <= budget:
        return
    host = whole_job.host_memory(job, profile)
    gpus = min(profile.devices_per_node, job.cluster.num_workers)
    needed = static * gpus / job.plan.host_memory_fraction / GIB
    raise PlanInfeasible(
        f"does not fit the host memory: the offloaded {_offloaded(job)} need {static / GIB:.1f} GiB per GPU "
        f"({whole_job.trainable_parameter_count(job.model) / 1e9:.2f}B trainable parameters, "
        f"{static / whole_job.trainable_parameter_count(job.model):.1f} bytes each in DeepSpeed's host buffers) but "
        f"{host.gib:g} GiB of "
        f"host memory ({host.source}) x plan.host_memory_fraction={job.plan.host_memory_fraction} over {gpus} "
        f"GPU(s) leaves {budget / GIB:.1f} GiB; it needs a node with at least {needed:.0f} GiB, more nodes "
        "(cluster.num_workers), or LoRA (model.lora.rank) instead of full fine-tuning")


def _offloaded(job: JobConfig) -> str:
    offload = job.train.offload
    parts = ["optimizer states"] * offload.optimizer + ["parameters"] * offload.params
    return " and ".join(parts)


TIGHTEN_ATTEMPTS = 3
TIGHTEN_MARGIN_BYTES = 2**20


def _fitted_layout(job: JobConfig, profile: HardwareProfile, solved):
    """The laid-out plan of a feasible policy. The policy's GPU estimate leaves out what only the layout knows
    (fractions rounded for the plan file, buffers aligned) and the profile's memory calibration, so a policy that
    fills its budget can lay out a little above it: the policy is then solved again with its budget lowered by the
    excess (a few times at most). Returns (plan, layer block, step layout, solved) of the last attempt."""
    cost, _, inputs, first_block = solved
    plan, block, step = _lay_out(job, profile, solved)
    for _ in range(TIGHTEN_ATTEMPTS):
        if not _over_budget(plan):
            break
        excess = ((plan.predicted["peak_gpu_gib"] - plan.predicted["gpu_budget_gib"]) * GIB + TIGHTEN_MARGIN_BYTES
                  + 10 ** -FRACTION_DECIMALS * sum(inputs.token_wise_bytes))  # what rounding the keeps may add
        inputs = replace(inputs, gpu_budget_bytes=inputs.gpu_budget_bytes
                         - excess / max(profile.calibration.peak_memory_factor, 1e-6))
        policy = solve_policy(inputs, job.plan.time_limit_seconds)
        if not policy.feasible:
            break
        policy.gpu_budget_bytes = solved[2].gpu_budget_bytes  # the plan reports the job's own budget
        solved = (cost, policy, inputs, first_block)
        plan, block, step = _lay_out(job, profile, solved)
    return plan, block, step, solved


def _lay_out(job: JobConfig, profile: HardwareProfile, solved) -> Tuple[Plan, LayoutResult, LayoutResult]:
    """The plan of a feasible policy: its layer block and step laid out in the arena, and the runtime arena."""
    cost, policy, inputs, block = solved
    _round_fractions(policy)
    decisions = policy.decisions
    factors = [inputs.int8_factor if d.swap_codec == "int8" else 1.0 for d in policy.decisions]
    plain = cost.layers()
    compact = cost.compressed_layers(parse_compression_spec(inputs.compression_spec)) \
        if inputs.compression_spec != "none" else plain
    compressed = [d.activation_compression != "none" for d in policy.decisions]
    layers = [compact[i] if compressed[i] else plain[i] for i in range(len(plain))]
    block_of = dict(layer=largest_layer(plain))  # the block `solved` laid out for the MIP
    if keeps_everything(decisions):
        block_of = dict(layer=largest_layer(plain), plain=True)
        block = solve_layout(layer_block_buffers(**block_of), job.plan.time_limit_seconds)
    elif any(compressed):  # the working set the MIP counted: the largest of the layers' own, compressed or not
        needed = [inputs.compressed_block_bytes[i] if compressed[i] else inputs.layer_block_bytes[i]
                  for i in range(len(plain))]
        i = needed.index(max(needed))
        block_of = dict(layer=plain[i], compact=compact[i] if compressed[i] else None)
        block = solve_layout(layer_block_buffers(**block_of), job.plan.time_limit_seconds)
    halves = tuple(solve_layout(layer_block_buffers(**block_of, part=part), job.plan.time_limit_seconds).arena_bytes
                   for part in ("forward", "backward"))
    forward_bytes, backward_bytes, block = _block_halves(job, decisions, plain, inputs, block, halves)
    looked_up = [not bytes_kept for bytes_kept in inputs.input_bytes]
    step = solve_layout(step_buffers(layers, decisions, forward_bytes, cost.static_memory(job.train.zero_stage).head_interval, factors,
                                     head_reuses_block=True, backward_block_bytes=backward_bytes,
                                     looked_up=looked_up), job.plan.time_limit_seconds)
    plan = _assemble(job, profile, cost, policy, block, step)
    # compressed layers keep their compact forms in the caching allocator: the arena regions hold plain roles
    partly_kept = {d.layer for d in policy.decisions
                   if 0 < d.keep_fraction < 1 and d.activation_compression == "none"}
    plan.runtime_arena = runtime_arena(step, partly_kept, job.plan.time_limit_seconds)
    return plan, block, step


def _block_halves(job: JobConfig, decisions, plain, inputs: PolicyInputs, block: LayoutResult,
                  halves: Tuple[int, int]):
    """(forward bytes, backward bytes, the block the plan reports) of the level-1 block: the layers' block laid out
    per half (`halves`: its forward's buffers, its backward's), and for checkpointed layers the largest forward and
    backward halves of their replay (the plan reports the largest checkpointed layer's whole block when there is
    one)."""
    replayed = [i for i, d in enumerate(decisions) if d.checkpoint_layer]
    if not replayed:
        return halves[0], halves[1], block
    split = len(replayed) < len(decisions)
    forward = max([halves[0]] * split + [inputs.checkpoint_forward_block_bytes[i] for i in replayed])
    backward = max([halves[1]] * split + [inputs.checkpoint_block_bytes[i] for i in replayed])
    largest = max(replayed, key=lambda index: inputs.checkpoint_block_bytes[index])
    return forward, backward, solve_layout(layer_block_buffers(plain[largest], checkpoint=True),
                                           job.plan.time_limit_seconds)


def _over_budget(plan: Plan) -> bool:
    return plan.predicted["peak_gpu_gib"] > plan.predicted["gpu_budget_gib"]


def explain_over_budget(job: JobConfig, profile: HardwareProfile, plan: Plan) -> str:
    """The policy fitted its estimate, but the laid-out buffers (with the profile's memory calibration) do not."""
    predicted = plan.predicted
    static = sum(v for k, v in predicted["static_gib"].items() if k not in ("head_and_loss", "embedding_activations"))
    arena = plan.arena_bytes / GIB
    calibrated = predicted["peak_gpu_gib"] - static - arena
    calibration = f", the profile's memory calibration {calibrated:+.2f}" if abs(calibrated) >= 0.005 else ""
    return (f"does not fit on {profile.name}: the laid-out plan peaks at {predicted['peak_gpu_gib']} GiB per GPU "
            f"(weights, gradients, optimizer and buffers {static:.2f}, activation arena {arena:.2f}{calibration} "
            "GiB) but "
            f"plan.gpu_memory_fraction={job.plan.gpu_memory_fraction} leaves {predicted['gpu_budget_gib']} GiB; "
            f"{suggest_fix(job, profile, laid_out=True, peak_gib=predicted['peak_gpu_gib'])}")


def _round_fractions(policy: PolicyResult) -> None:
    """The plan file's fractions, rounded once here so the layout is computed from what the runtime will read."""
    for d in policy.decisions:
        d.swap_fraction = round(d.swap_fraction, FRACTION_DECIMALS)
        d.recompute_fraction = round(min(d.recompute_fraction, 1 - d.swap_fraction), FRACTION_DECIMALS)
        d.keep_fraction = round(max(0.0, 1 - d.swap_fraction - d.recompute_fraction), FRACTION_DECIMALS) + 0.0


def _solve(job: JobConfig, profile: HardwareProfile,
           swap_hidden_fraction: float = SWAP_HIDDEN_FRACTION) -> Tuple[CostModel, PolicyResult, PolicyInputs, LayoutResult]:
    """Exact techniques first; approximate ones (int8 swaps, compressed layers) only if those do not fit and
    plan.allow_approximate says they may be used."""
    cost = CostModel(job, profile, training_precision(profile))
    block = solve_layout(layer_block_buffers(largest_layer(cost.layers())), job.plan.time_limit_seconds)
    inputs = replace(policy_inputs(cost, job.train.zero_stage, block.arena_bytes, False, job.plan.time_limit_seconds),
                     swap_hidden_fraction=swap_hidden_fraction)
    policy = solve_policy(inputs, job.plan.time_limit_seconds)
    if not policy.feasible and job.plan.allow_approximate:
        inputs = replace(policy_inputs(cost, job.train.zero_stage, block.arena_bytes, True, job.plan.time_limit_seconds),
                         swap_hidden_fraction=swap_hidden_fraction)
        policy = solve_policy(inputs, job.plan.time_limit_seconds)
    return cost, policy, inputs, block


def _assemble(job, profile, cost: CostModel, policy: PolicyResult, block: LayoutResult,
              step: LayoutResult) -> Plan:
    precision = training_precision(profile)
    inputs = plan_inputs(job, profile, precision)
    static = cost.static_memory(job.train.zero_stage)
    checkpointed = sum(d.checkpoint_layer for d in policy.decisions)
    static.adapter_activations *= 1 - checkpointed / len(policy.decisions)  # a checkpointed layer's are replayed
    static_bytes = static.total - static.head_interval  # in the arena, at the head
    step_seconds = policy.micro_batch_seconds * job.train.grad_accum_steps + whole_job.optimizer_step_seconds(cost)
    host_static = whole_job.host_static_bytes(job, cost.element_bytes, profile.device_kind == "cuda")
    mfu = cost.step_flops_per_gpu() / (step_seconds * profile.peak_tflops(precision) * 1e12)
    predicted = {
        "step_seconds": round(step_seconds, 6), "mfu": round(mfu, 4),
        "mfu_convention": "model FLOPs, causal attention halved"
                          + (" and summed over packed documents" if cost.documents else "") + ", peak of the profile",
        "peak_gpu_gib": round(calibrated_peak_bytes(profile, static_bytes, step.arena_bytes) / GIB, 3),
        "gpu_budget_gib": round(policy.gpu_budget_bytes / GIB, 3),
        "host_gib": round((policy.host_bytes + host_static) / GIB, 3),
        "host_budget_gib": round((policy.host_budget_bytes + host_static) / GIB, 3),
        "swap_gb_per_step": round(policy.swap_bytes_per_micro_batch * job.train.grad_accum_steps / 1e9, 3),
        "tokens_per_second_per_gpu": round(cost.tokens_per_gpu * job.train.grad_accum_steps / step_seconds, 1),
        "static_gib": {k: round(v, 3) for k, v in static.as_gib().items()},
    }
    host = whole_job.host_memory(job, profile)
    predicted["host_memory"] = {"node_gib": host.gib, "source": host.source,
                                "offloaded_gib": round(host_static / GIB, 3)}
    if cost.sp_degree > 1:
        predicted["alltoall"] = {"seconds_per_step": round(_alltoall_seconds(cost, policy) * job.train.grad_accum_steps,
                                                           6), "source": cost.alltoall_source()}
    entry = lambda b: {"name": b.name, "layer": b.layer, "size_bytes": b.size_bytes,  # noqa: E731
                       "offset_bytes": b.offset_bytes, "start": b.start, "end": b.end}
    return Plan(
        inputs=inputs, inputs_hash=hash_inputs(inputs),
        layers=list(policy.decisions),
        layout=[entry(b) for b in step.buffers], layer_block_layout=[entry(b) for b in block.buffers],
        arena_bytes=step.arena_bytes, lower_bound_bytes=step.lower_bound_bytes,
        layer_block={"arena_bytes": block.arena_bytes, "lower_bound_bytes": block.lower_bound_bytes,
                     "greedy_arena_bytes": block.greedy_arena_bytes, "solver": block.solver, "status": block.status},
        predicted=predicted,
        solver={"policy": {"name": policy.solver, "status": policy.status, "seconds": round(policy.solve_seconds, 3)},
                "layout": {"name": step.solver, "status": step.status, "seconds": round(step.solve_seconds, 3),
                           "greedy_arena_bytes": step.greedy_arena_bytes}},
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )


def _alltoall_seconds(cost: CostModel, policy: PolicyResult) -> float:
    """Ulysses' all-to-all in one micro-batch: a pass in each forward and backward, one more in a split layer's
    backward and in a checkpointed layer's replay (`planner.policy`)."""
    total = 0.0
    for layer, decision in zip(cost.layers(), policy.decisions):
        passes = 2 + (not decision.is_plain) + decision.checkpoint_layer
        total += passes * layer.exchange_seconds
    return total


def runtime_arena(step: LayoutResult, layers: set, time_limit_seconds: float) -> dict:
    """Offsets of the long-lived buffers the runtime copies into its own arena: the kept token-wise share of each
    layer that keeps part of its tokens (alive from its forward to its backward, the ones that fragment the
    caching allocator; a layer that keeps everything keeps autograd's own tensors, no copy)."""
    kept = [Buffer(b.name, b.layer, b.size_bytes, b.start, b.end) for b in step.buffers
            if b.name == "kept_token_wise" and b.layer in layers]
    if not kept:
        return {}
    layout = solve_layout(kept, time_limit_seconds)
    return {"arena_bytes": layout.arena_bytes, "lower_bound_bytes": layout.lower_bound_bytes,
            "packing": "token-wise roles in inventory order, each aligned to 512 bytes",
            "buffers": [{"name": b.name, "layer": b.layer, "size_bytes": b.size_bytes,
                         "offset_bytes": b.offset_bytes} for b in layout.buffers]}


def gpu_floor_bytes(inputs: PolicyInputs) -> Tuple[float, float, float]:
    """(floor, kept, working set): a lower bound of the GPU memory any policy needs (everything swapped, recomputed
    or checkpointed), what of it the layers keep beyond what the host budget takes (their inputs, or with no layer
    checkpointable their inputs and attention outputs) and the working set it counts (a layer's, or the head's)."""
    kept = least_kept_bytes(inputs)
    block = max(inputs.block_bytes, inputs.head_bytes)
    on_gpu = max(0.0, sum(kept) - inputs.host_budget_bytes)
    held = min(sum(kept), on_gpu + 2 * max(kept))  # all kept on the GPU, or the rest with copies in flight
    return inputs.static_bytes + block + held, on_gpu, block


def least_kept_bytes(inputs: PolicyInputs) -> List[float]:
    """What each layer keeps at the least: its input if it may be replayed whole (not a token-eliminated layer),
    else its skeletal tensors (input, attention output)."""
    replayable = bool(inputs.checkpoint_block_bytes)
    return [inputs.input_bytes[i] if replayable and not (inputs.sparse and inputs.sparse[i])
            else inputs.skeletal_bytes[i] for i in range(inputs.num_layers)]


def explain_infeasible(job: JobConfig, profile: HardwareProfile, inputs: PolicyInputs) -> str:
    """Why no policy fits: what the host cannot take of the layer inputs (and, where no layer may be checkpointed,
    the attention outputs) stays on the GPU."""
    static = CostModel(job, profile, training_precision(profile)).static_memory(job.train.zero_stage)
    floor, on_gpu, _ = gpu_floor_bytes(inputs)
    what = "layer inputs" if inputs.checkpoint_block_bytes else "layer inputs and attention outputs"
    kept = sum(least_kept_bytes(inputs))
    host_note = (f"; the {kept / GIB:.1f} GiB of {what} exceed the host "
                 f"budget of {inputs.host_budget_bytes / GIB:.1f} GiB per GPU, so {on_gpu / GIB:.1f} GiB stay on "
                 "the GPU" if on_gpu else "")
    why = (f"does not fit on {profile.name}: each GPU needs at least {floor / GIB:.1f} GiB with every activation "
           f"swapped or recomputed (weights {static.parameters / GIB:.1f}, gradients {static.gradients / GIB:.1f}, "
           f"optimizer {static.optimizer_states / GIB:.1f} GiB under ZeRO-{job.train.zero_stage} on "
           f"{job.cluster.num_workers} GPU(s); one layer's working set {inputs.block_bytes / GIB:.1f} GiB; "
           f"buffers and LM head {(static.buffers + static.head_and_loss) / GIB:.1f} GiB{host_note}) but "
           f"plan.gpu_memory_fraction={job.plan.gpu_memory_fraction} leaves {inputs.gpu_budget_bytes / GIB:.1f} GiB")
    return f"{why}; {suggest_fix(job, profile)}"


def suggest_fix(job: JobConfig, profile: HardwareProfile, laid_out: bool = False,
                peak_gib: Optional[float] = None) -> str:
    """The cheapest change that fits. laid_out: a change must fit once laid out (not only in the policy's
    estimate); peak_gib: the laid-out peak of the job as it is, which a larger budget fraction may cover first."""
    candidates = ([_budget_change(job, profile, peak_gib)] if peak_gib else []) + _candidate_changes(job)
    for label, change in candidates:
        changed = change(copy.deepcopy(job))
        if changed is not None and _fits(changed, profile, laid_out):
            return f"it fits with {label}"
    longest = _longest_fitting_seq_len(job, profile, laid_out)
    if longest:
        return f"no single change fits; the longest sequence that fits as configured is data.seq_len={longest}"
    return "nothing fits even at the shortest sequence: use more GPUs (cluster.num_workers) or a smaller model"


def _candidate_changes(job: JobConfig) -> List[Tuple[str, Callable[[JobConfig], Optional[JobConfig]]]]:
    sp, workers = job.parallel.sp_degree, job.cluster.num_workers
    candidates = []
    if job.train.zero_stage < 3:
        candidates.append(("train.zero_stage=3", lambda j: _set(j, ("train", "zero_stage", 3))))
    if not job.plan.allow_approximate:
        candidates.append(("plan.allow_approximate=true (int8 activations, Mesa int8 compressed layers)",
                           lambda j: _set(j, ("plan", "allow_approximate", True))))
    if not job.train.offload.optimizer:
        stage = max(job.train.zero_stage, 1)  # ZeRO-Offload needs a ZeRO stage
        also = "" if stage == job.train.zero_stage else " train.zero_stage=1"
        candidates.append((f"train.offload.optimizer=true{also} (optimizer states and gradients in host memory)",
                           lambda j: _set(j, ("train.offload", "optimizer", True), ("train", "zero_stage", stage))))
    if workers % (2 * sp) == 0:
        candidates.append((f"parallel.sp_degree={2 * sp} (same GPUs)",
                           lambda j: _set(j, ("parallel", "sp_degree", 2 * sp))))
    for factor in (2, 4, 8):
        candidates.append((f"cluster.num_workers={workers * factor} parallel.sp_degree={sp * factor} "
                           f"train.zero_stage=3 ({workers * factor} GPUs)",
                           lambda j, f=factor: _set(j, ("cluster", "num_workers", workers * f),
                                                    ("parallel", "sp_degree", sp * f), ("train", "zero_stage", 3))))
    return _with_smaller_micro_batches(job, candidates)


def _with_smaller_micro_batches(job: JobConfig, candidates: List) -> List:
    """A smaller micro batch alone first (same GPUs, same tokens per step), then the other changes, then each of
    them with a micro batch of 1: activations scale with the micro batch, so a job that inherits a large one
    (e.g. the default job's 8) is otherwise told that nothing fits."""
    smaller = _micro_batch_changes(job)
    if not smaller:
        return candidates
    single_label, single = smaller[-1]
    combined = [(f"{single_label} and {label}", lambda j, change=change: single(j) and change(j))
                for label, change in candidates]
    return smaller + candidates + combined


def _micro_batch_changes(job: JobConfig) -> List[Tuple[str, Callable[[JobConfig], Optional[JobConfig]]]]:
    """A smaller micro batch with more accumulation steps (same tokens per optimizer step, same GPUs), largest
    first: activations scale with the micro batch, so this is the first thing to try."""
    mb, accum = job.data.micro_batch_size, job.train.grad_accum_steps
    changes = []
    smaller = mb // 2
    while smaller >= 1:
        steps = accum * mb // smaller if mb % smaller == 0 else None
        label = (f"data.micro_batch_size={smaller} train.grad_accum_steps={steps} (same tokens per step)" if steps
                 else f"data.micro_batch_size={smaller}")
        sets = [("data", "micro_batch_size", smaller)] + ([("train", "grad_accum_steps", steps)] if steps else [])
        changes.append((label, lambda j, sets=sets: _set(j, *sets)))
        smaller //= 2
    return changes


MAX_GPU_MEMORY_FRACTION = 0.95
"""The largest budget fraction suggested: the rest is for the CUDA context, NCCL and allocator slack."""


def _budget_change(job: JobConfig, profile: HardwareProfile, peak_gib: float):
    """plan.gpu_memory_fraction raised, in hundredths, to cover the laid-out peak (no change above the cap)."""
    needed = math.ceil(peak_gib / profile.device_memory_gib * 100 + 1e-9) / 100
    if needed > MAX_GPU_MEMORY_FRACTION:
        return "", lambda j: None
    return f"plan.gpu_memory_fraction={needed}", lambda j: _set(j, ("plan", "gpu_memory_fraction", needed))


def _set(job: JobConfig, *changes) -> Optional[JobConfig]:
    """The job with (section, key, value) changes; a section may be dotted (`train.offload`)."""
    for section, key, value in changes:
        target = job
        for part in section.split("."):
            target = getattr(target, part)
        setattr(target, key, value)
    if job.parallel_dims().problems(job.model.num_heads, job.model.num_kv_heads):
        return None  # Ulysses cannot split this model or sequence that way
    return job


def _fits(job: JobConfig, profile: HardwareProfile, laid_out: bool = False) -> bool:
    solved = _solve(job, profile)
    if not solved[1].feasible:
        return False
    return not laid_out or not _over_budget(_fitted_layout(job, profile, solved)[0])


def _longest_fitting_seq_len(job: JobConfig, profile: HardwareProfile, laid_out: bool = False) -> int:
    unit = TOKEN_BLOCK * job.parallel.sp_degree
    low, high = 0, job.data.seq_len // unit
    while low < high:
        middle = (low + high + 1) // 2
        trial = copy.deepcopy(job)
        trial.data.seq_len = middle * unit
        low, high = (middle, high) if _fits(trial, profile, laid_out) else (low, middle - 1)
    return low * unit


def predict_decisions(job: JobConfig, profile: HardwareProfile, decisions: List) -> Plan:
    """A plan with these per-layer decisions (e.g. a plan file that ran, made by an older planner), predicted and
    laid out by today's cost model: the time, peak and host the MIP would report had it chosen them, so measured
    runs can be set against the model as it is now. Exact plans only (no int8 swap, no compressed layer)."""
    decisions = [copy.deepcopy(d) for d in decisions]
    if any(d.swap_codec != "none" or d.activation_compression != "none" for d in decisions):
        raise LongtrainError("predict_decisions takes exact plans only (no int8 swap or compressed layer)")
    cost = CostModel(job, profile, training_precision(profile))
    block = solve_layout(layer_block_buffers(largest_layer(cost.layers())), job.plan.time_limit_seconds)
    inputs = policy_inputs(cost, job.train.zero_stage, block.arena_bytes, False, job.plan.time_limit_seconds)
    p = inputs
    stalls, moved = given_copies(p, decisions)
    extra = sum(p.replay_seconds[i] if d.checkpoint_layer else p.recompute_seconds[i] * d.recompute_fraction
                for i, d in enumerate(decisions))
    policy = PolicyResult(feasible=True, status="given", solver="none", solve_seconds=0.0, decisions=decisions,
                          micro_batch_seconds=sum(p.forward_seconds) + sum(p.backward_seconds) + 3 * p.head_seconds
                          + extra + stalls,
                          host_bytes=sum(moved), swap_bytes_per_micro_batch=2 * sum(moved),
                          gpu_budget_bytes=p.gpu_budget_bytes, host_budget_bytes=p.host_budget_bytes)
    return _lay_out(job, profile, (cost, policy, inputs, block))[0]
